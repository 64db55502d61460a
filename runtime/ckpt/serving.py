"""The deploy-time check that a checkpoint's non-tensor files work: what every instance reads
before it can answer (the model config, the tokenizer, the chat template, the generation
config) is loaded once here, so a broken file fails the deploy with its name instead of every
later load. It builds the model skeleton on the ``meta`` device (no memory) to prove the
config describes a model transformers can build.
"""

from __future__ import annotations

from pathlib import Path

from sllm.errors import CheckpointError

_PROBE = [{"role": "user", "content": "Hello"}]


def check_serving_files(directory: Path) -> None:
    """Raise ``CheckpointError`` naming the file that an instance could not use."""
    from runtime.loader.model import build_skeleton, load_tokenizer

    directory = Path(directory)
    try:
        build_skeleton(directory)
    except CheckpointError:
        raise
    except Exception as exc:  # transformers raises many kinds for a config it cannot build
        raise CheckpointError(
            f"{directory / 'config.json'}: the model config does not build a model "
            f"({type(exc).__name__}: {exc})"
        ) from None
    tokenizer = load_tokenizer(directory)
    try:
        ids = tokenizer("Hello", add_special_tokens=True)["input_ids"]
    except Exception as exc:
        raise CheckpointError(
            f"{directory}: the tokenizer cannot encode text ({type(exc).__name__}: {exc})"
        ) from None
    if not ids:
        raise CheckpointError(f"{directory}: the tokenizer encodes 'Hello' to no tokens")
    if getattr(tokenizer, "chat_template", None):
        try:
            tokenizer.apply_chat_template(_PROBE, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise CheckpointError(
                f"{directory}: the chat template fails to render a user message "
                f"({type(exc).__name__}: {exc})"
            ) from None
    if (directory / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            GenerationConfig.from_pretrained(str(directory))
        except Exception as exc:
            raise CheckpointError(
                f"{directory / 'generation_config.json'}: unreadable ({type(exc).__name__}: {exc})"
            ) from None
