"""Tiny Llama-style models for tests and demos, made without any model hub.

``build_tiny_llama`` writes a Hugging Face directory (config.json, safetensors weights,
tokenizer.json with a chat template, generation_config.json): random weights from a seed and a
byte-level BPE tokenizer trained offline on a built-in corpus in a fraction of a second. Every
part of the platform (conversion, upload, caching, loading, generation) treats it like a real
checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Serverless functions scale to zero when idle and start when a request comes.",
    "A checkpoint is loaded from the store to the SSD cache, then to DRAM, then to the device.",
    "Tokens are generated one at a time; the key-value cache holds the attention state.",
    "hello world, how are you today? I am fine, thank you very much.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}-_/\\",
]
SPECIAL_TOKENS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>", "<s>"]


@dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    dtype: str = "float32"


# For the vLLM backend's tests: head_dim 64 (128 / 2 heads), a size vLLM's CPU attention has
# kernels for (it refuses the default's 16); a 2,048-token context for streams long enough to
# be moved mid-way by live migration.
VLLM_TINY = TinyConfig(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=2048,
)


def train_tokenizer(vocab_size: int) -> object:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def build_tiny_llama(
    dst: Path,
    *,
    seed: int = 0,
    config: TinyConfig | None = None,
    shards: int = 1,
) -> Path:
    """Write a tiny random Llama HF directory into ``dst`` and return it.

    ``shards > 1`` writes a sharded safetensors checkpoint (with an index json). Transformers 5
    always writes safetensors; tests of ``pytorch_model*.bin`` sources write their own shards.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = config or TinyConfig()
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    raw_tok = train_tokenizer(cfg.vocab_size)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw_tok,
        eos_token="<|end|>",
        bos_token="<s>",
        unk_token="<unk>",
        pad_token="<|end|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    eos_id = int(tokenizer.convert_tokens_to_ids("<|end|>"))  # type: ignore[arg-type]
    bos_id = int(tokenizer.convert_tokens_to_ids("<s>"))  # type: ignore[arg-type]
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model_class: Any = LlamaForCausalLM  # unannotated constructor in some releases
    model = model_class(llama_cfg).to(getattr(torch, cfg.dtype))
    with torch.no_grad():
        for p in model.parameters():
            # std 0.5 (not the 0.02 init) so greedy decoding is decisive, not ties at ~uniform
            p.normal_(0.0, 0.5)
    model.eval()
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        max_shard = max(total // shards + 1, 1024)
        model.save_pretrained(dst, max_shard_size=max_shard)
    else:
        model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    gen_path = dst / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen.update({"eos_token_id": eos_id, "bos_token_id": bos_id, "pad_token_id": eos_id})
    gen_path.write_text(json.dumps(gen, indent=1))
    return dst
