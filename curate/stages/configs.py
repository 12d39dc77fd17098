"""The stage configs: what each per-shard stage is given, field by field (the fields' comments), and how
each field enters the cache key (stages.base: no_effect, model_field, keyed). They live apart from the
stages' code, which imports torch and transformers, so that building the command line's options and
checking them stays quick."""

from __future__ import annotations

import importlib.util
from dataclasses import MISSING, dataclass, field

from curate import models
from curate.stages.base import keyed, model_field, no_effect


def _probe_entries(config) -> list[str]:
    """The grad_norms entries a probe config resolves to (its cache key's `modules`)."""
    from curate.stages.probe import Probe

    return Probe(config).describe()["modules"]


ENGINES = ("auto", "hf", "vllm")


@dataclass
class GenerationConfig:
    """How a model samples (the fields' comments), keyed into every generating stage's cache. ValueError for
    an unknown engine, temperature < 0, top_p outside (0, 1] or max_new_tokens < 1."""

    model: str | None = model_field()  # None: the embedded SmolLM2-135M-Instruct
    engine: str = keyed("auto", lambda c: resolve_engine(c))  # auto: vllm when importable and CUDA is present, else hf
    # auto is keyed as what it resolves to here; an explicit device as given (a head node need not have it)
    device: str = keyed("auto", lambda c: models.resolve_device("auto") if c.device == "auto" else c.device)
    temperature: float = 1.0        # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 512
    seed: int = 0
    batch_tokens: int = no_effect(32768)  # hf: rows x (longest prompt + max_new_tokens) per generate call; per-row
    #                                       generators make batching irrelevant (up to float rounding)
    trust_remote_code: bool = False # let the model folder run its own code (--trust-remote-code)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1")


def resolve_engine(cfg: GenerationConfig) -> str:
    """The engine `cfg` runs on: hf or vllm as asked; auto is vllm when importable and the device resolves
    to CUDA (explicit cuda: as given; the workers may have it where this process has not), else hf.
    ValueError for vllm when not installed."""
    has_vllm = importlib.util.find_spec("vllm") is not None
    if cfg.engine == "vllm" and not has_vllm:
        raise ValueError("--engine vllm: vllm is not installed (pip install vllm, on a CUDA machine)")
    if cfg.engine != "auto":
        return cfg.engine
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and models.resolve_device("auto") == "cuda")
    return "vllm" if has_vllm and cuda else "hf"


@dataclass
class TokenizeConfig:
    """Options of the tokenize stage (the fields' comments)."""

    model: str | None = model_field()  # whose tokenizer and chat template (the probe model's)
    max_length: int | None = None     # cut the start of longer examples, keeping the last turns
    trust_remote_code: bool = False   # let the model folder run its own code (--trust-remote-code)
    chat_template: str | None = None  # template text used instead of the tokenizer's (--chat-template FILE)


@dataclass
class ProbeConfig:
    """Options of the probe stage (the fields' comments); ValueError for --modules with --allow-partial."""

    model: str | None = model_field()          # None: the embedded SmolLM2-135M-Instruct
    device: str = no_effect("auto")            # auto: cuda when present; fp32 results agree across devices
    dtype: str = keyed("auto", lambda c: resolved_dtype(c.dtype))  # auto: fp32 (see resolved_dtype)
    batch_tokens: int = no_effect(4096)        # padded tokens per forward/backward (~1.7 MB each for SmolLM2)
    # (): every role the architecture map finds (curate.roles); keyed by the entries it resolves to, so
    # `k q v`, `q k v` and `qkv_proj` on Phi-3 share a cache, and so do a covered model with and without
    # --allow-partial (whose effect is in those entries)
    modules: tuple[str, ...] = keyed((), lambda c: _probe_entries(c))
    trust_remote_code: bool = False   # let the model folder run its own code (--trust-remote-code)
    allow_partial: bool = no_effect(False)  # probe what the map places when some layer matrices are unplaced

    def __post_init__(self):
        if self.modules and self.allow_partial:
            raise ValueError("--allow-partial with --modules: --modules probes exactly what it names (what it "
                             "leaves out is recorded); drop one of them")


def resolved_dtype(dtype: str) -> str:
    """auto is fp32 on every device. bf16 autocast moves SmolLM2's per-module norms by up to ~9% (q/k
    projections; Opacus agrees, so it is bf16 itself, and fp32 attention does not help): enough to flip
    rows near the threshold, so the faster dtype is an explicit choice."""
    return "fp32" if dtype == "auto" else dtype


PREFIX_MODES = ("rl", "all", "none")   # which routed rows carry the annotations


@dataclass
class PrefixConfig:
    """Options of the prefix stage (the fields' comments)."""

    tokenizer: str | None = model_field()  # whose tokens L counts (default: the probe model's)
    trust_remote_code: bool = False   # let the model folder run its own code (--trust-remote-code)
    chat_template: str | None = None  # template text used instead of the tokenizer's (--chat-template)


@dataclass
class RewardConfig:
    """Options of the reward stage (the fields' comments); `reward_model` is required."""

    reward_model: str = model_field(MISSING)  # an AutoModelForSequenceClassification folder
    device: str = no_effect("auto")           # the scores agree across devices up to float rounding
    batch_tokens: int = no_effect(8192)
    trust_remote_code: bool = False   # let the model folder run its own code (--trust-remote-code)


DEFAULT_FEEDBACK = "Incorrect. Please think again."


@dataclass
class RolloutConfig:
    """Options of the rollout stage (the fields' comments). ValueError for samples or turns < 1, or a
    verifier that `verifiers.get` cannot load."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    samples: int = 8                       # K trajectories per prompt
    turns: int = 5                         # T: answers per trajectory at most
    verifier: str = "math"                 # math | exact | recorded | module:function
    feedback: str = DEFAULT_FEEDBACK       # the user message after a wrong answer
    system: str | None = None              # system message put before prompts that have none
    success_threshold: float = 1.0         # a numeric verdict (recorded reward, user score) >= this is a success

    def __post_init__(self):
        if self.samples < 1 or self.turns < 1:
            raise ValueError("samples and turns must be >= 1")
        from curate import verifiers

        verifiers.get(self.verifier, self.success_threshold)   # fail before any generation

    @property
    def recorded(self) -> bool:
        """Whether the verifier is `recorded`: the input's trajectory is replayed, nothing is generated."""
        return self.verifier == "recorded"


@dataclass
class ContinuationConfig:
    """Options of the continuation stage (the fields' comments). ValueError unless stages >= 1 and
    0 <= stage < stages."""

    generation: GenerationConfig = field(default_factory=GenerationConfig)
    stages: int = 1          # T: the prompts are split into T chunks, one per IRFT stage
    stage: int = 0           # t: the chunk generated now (from the model trained after stage t-1)

    def __post_init__(self):
        if self.stages < 1 or not 0 <= self.stage < self.stages:
            raise ValueError(f"need stages >= 1 and 0 <= stage < stages, got stages={self.stages} stage={self.stage}")


@dataclass
class PairScoresConfig:
    """Options of the pair_scores stage (the fields' comments)."""

    model: str | None = model_field()  # π: the generator, whose log-probs make the implicit reward
    ref_model: str | None = model_field(none_is_default=False)     # π_ref; None: the same model as π
    reward_model: str | None = model_field(none_is_default=False)  # an AutoModelForSequenceClassification folder
    device: str = no_effect("auto")    # log-probs agree across devices up to float rounding
    batch_tokens: int = no_effect(8192)
    trust_remote_code: bool = False   # let the model folder run its own code (--trust-remote-code)
