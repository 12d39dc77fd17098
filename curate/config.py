"""Job configuration: one flat dataclass per job whose field docs are the CLI help, loadable from
pipelines/*.yaml and overridable with --set key=value."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from curate import models
from curate.formats.adapters import FORMATS
from curate.returns import ReturnConfig
from curate.schema import METRICS
from curate.stages.configs import (DEFAULT_FEEDBACK, ENGINES, PREFIX_MODES, ContinuationConfig, GenerationConfig,
                                   PairScoresConfig, PrefixConfig, ProbeConfig, RewardConfig, RolloutConfig,
                                   TokenizeConfig)
from curate.ingest.ingest import IngestConfig
from curate.corpus.route import CONTROLS, MODULE_SCALES, STRATIFY, RouteConfig
from curate.corpus.weights import ALL_FAIL, WeightsConfig

FORMAT_CHOICES = ("auto", *FORMATS)


def opt(default, help: str, **kw):
    """A dataclass field with a default whose metadata holds its CLI `help` and further argparse keywords
    (`choices`, `nargs`) for `add_arguments`."""
    return field(default=default, metadata={"help": help, **kw})


# Allowed values of numeric options, checked when a config is built (before any work): (low, high,
# low is exclusive). An option of the same name means the same thing in every job. NaN is never allowed.
RANGES = {
    "workers": (1, None, False), "parse_procs": (0, None, False), "limit": (1, None, False),
    "shard_size": (1, None, False), "max_length": (2, None, False), "batch_tokens": (1, None, False),
    "quantile": (0, 1, False), "samples": (1, None, False), "turns": (1, None, False),
    "temperature": (0, None, False), "top_p": (0, 1, True), "max_new_tokens": (1, None, False),
    "gamma": (0, 1, True), "beta": (0, None, True), "max_weight": (0, None, True),
    "repetition_penalty": (0, None, False), "format_penalty": (None, 0, False), "stages": (1, None, False), "stage": (0, None, False), "bootstrap": (0, None, False), "seed": (0, None, False),
}


def check_ranges(cfg) -> None:
    """ValueError naming the flag when an option has the wrong type (a YAML file or `--set` can give any),
    or a numeric option is NaN, infinite or outside RANGES."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--" + f.name.replace("_", "-")
        _check_type(flag, value, hints[f.name])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise ValueError(f"{flag} must be a finite number, got {value}")
        low, high, open_low = RANGES.get(f.name, (None, None, False))
        if (low is not None and (value <= low if open_low else value < low)) or (high is not None and value > high):
            bounds = " and ".join(([f"{'>' if open_low else '>='} {low}"] if low is not None else [])
                                  + ([f"<= {high}"] if high is not None else []))
            raise ValueError(f"{flag} must be {bounds}, got {value}")


def _check_type(flag: str, value, hint) -> None:
    """`value` matches the field's type hint (int, float, str, bool, list[str], each maybe None); an int
    is a float too, a bool is neither."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    if value is None:
        if type(None) in typing.get_args(hint):
            return
        raise ValueError(f"{flag} needs a value")
    for kind in allowed:
        if typing.get_origin(kind) is list:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return
        elif kind is bool:
            if isinstance(value, bool):
                return
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return
        elif isinstance(value, kind) and not isinstance(value, bool):
            return
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ValueError(f"{flag} must be {names}, got {value!r}")


class Section:
    """A stage's config section of a job: `cfg.NAME()` builds `cls` from the job's options by keyword
    (RunOptions.section); `derived` maps a field to a function of the job config for values that are not
    an option of the same name (a template read from its file, a renamed option)."""

    def __init__(self, cls, **derived):
        self.cls, self.derived = cls, derived

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, cfg, owner=None):
        if cfg is None:
            return self
        return lambda: cfg.section(self.cls, **{k: f(cfg) for k, f in self.derived.items()})


def sections(cls) -> dict[str, Section]:
    """The stage sections of a job config class, by name."""
    return {name: s for klass in reversed(cls.__mro__) for name, s in vars(klass).items() if isinstance(s, Section)}


def _template(cfg) -> str | None:
    return models.read_chat_template(cfg.chat_template)


@dataclass
class RunOptions:
    """Options every job has: what it reads, how its shards run and what it may trust. A job's stage
    configs are built from its options by keyword (`section`)."""

    input: list[str] = field(default_factory=list, metadata={"help": "input files or folders (read recursively)", "nargs": "+"})
    work: str | None = opt(None, "cache folder for stage shards (default: OUT/.work)")
    format: str = opt("auto", "input format, detected per record by default", choices=FORMAT_CHOICES)
    limit: int | None = opt(None, "use only the first N unique records")
    workers: int | None = opt(None, "run shards on a local dask cluster of N processes (CUDA: one per GPU, pinned)")
    scheduler: str | None = opt(None, "run shards on an existing dask cluster (tcp://host:8786)")
    force: bool = opt(False, "recompute every stage, ignoring the cache")
    skip_bad_files: bool = opt(False, "skip input files that cannot be read (listed in the manifest) instead of failing")
    parse_procs: int | None = opt(None, "helper processes parsing JSON lines in ingest (default: one per CPU when the input has 12 MiB or more; 0: none)")
    trust_remote_code: bool = opt(False, "allow a model folder's own Python code to run (off: only built-in architectures)")
    tools: str | None = opt(None, "JSON file of function schemas for every record without its own `tools` (e.g. tau-bench's airline_tools.json; skipped as input)")
    split: str | None = opt(None, "split of a Hugging Face DatasetDict input to read: NAME, or 'all' (default: train; the splits not read are listed in the manifest's skipped_files)")

    def __post_init__(self):
        check_ranges(self)

    @property
    def work_dir(self) -> Path:
        """Absolute, so the shard paths recorded in state.json work from any directory (curate route)."""
        return (Path(self.work) if self.work else Path(self.out) / ".work").resolve()

    @property
    def out_dir(self) -> Path:
        """The output folder, absolute."""
        return Path(self.out).resolve()

    def section(self, cls, **given):
        """The config dataclass `cls` (a stage's, or one nested in it) built by keyword: each field from
        `given`, else a nested config built the same way, else this job's option of the same name.
        TypeError naming the field when the job has no such option: a stage never silently keeps a
        default the user cannot set, and reordering a config's fields cannot misplace a value."""
        hints = typing.get_type_hints(cls)
        options = {f.name for f in dataclasses.fields(self)}
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in given:
                values[f.name] = given[f.name]
            elif dataclasses.is_dataclass(hints[f.name]):
                values[f.name] = self.section(hints[f.name])
            elif f.name in options:
                values[f.name] = getattr(self, f.name)
            else:
                raise TypeError(f"{cls.__name__}.{f.name}: {type(self).__name__} has no option {f.name!r} "
                                "and the caller gave no value for it")
        return cls(**values)

    ingest = Section(IngestConfig, inputs=lambda c: list(c.input))


@dataclass
class PrismConfig(RunOptions):
    """`curate prism`: tokenize and probe every record's per-module gradient norms, score their concentration
    and route each demonstration to OUT/sft/ or OUT/rl/."""

    out: str = opt("routed", "output folder: sft/, rl/, quarantine/, manifest.json")
    model: str | None = opt(None, "probe model: local HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    shard_size: int = opt(256, "records per shard (the unit of caching, resume and parallelism)")
    max_length: int | None = opt(2048, "tokens per example; longer ones lose the start of their context")
    chat_template: str | None = opt(None, "Jinja chat template file (.jinja, or JSON with a chat_template key) used instead of the model's, e.g. for a base model without one")
    device: str = opt("auto", "where the probe runs", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "probe matmul precision (auto: fp32, exact; tf32: fp32 with TF32 CUDA matmuls; bf16/fp16: autocast, tensor-core norms, faster on GPUs, ~1e-2 error)", choices=("auto", "fp32", "tf32", "bf16", "fp16"))
    batch_tokens: int = opt(4096, "padded tokens per probe batch (memory: ~1.7 MB a token for SmolLM2 in fp32)")
    modules: list[str] = field(default_factory=list, metadata={
        "help": "what the probe measures in every layer: PRISM roles (q k v o gate up down; router expert_gate "
                "expert_up expert_down shared_* for MoE) and/or module names (e.g. qkv_proj); default: every "
                "role of the architecture map, which must cover every weight matrix of the layers", "nargs": "+"})
    allow_partial: bool = opt(False, "probe the roles the architecture map places even where some weight matrices of the layers are left out (listed in the manifest)")
    metric: str = opt("gini", "concentration metric used as the routing score", choices=METRICS)
    quantile: float = opt(0.5, "split at this quantile of the corpus score")
    threshold: float | None = opt(None, "split at this fixed score instead of a quantile")
    reverse: bool = opt(False, "send high scores to sft and low to rl")
    seed: int = opt(0, "seed of the random control metric, the threshold's bootstrap and the length fit")
    stratify: str = opt("none", "take the quantile within each group: every source (input file) or format split at its own median", choices=STRATIFY)
    control: str = opt("none", "length: route on the score's residual after a robust fit on log n_loss_tokens (see README, Routing diagnostics)", choices=CONTROLS)
    module_scale: str = opt("none", "numel: divide each module's gradient norm by sqrt(d_out * d_in) before the concentration metric", choices=MODULE_SCALES)
    bootstrap: int = opt(200, "bootstrap resamples of the threshold (its interval and each row's route_confidence; 0: none)")
    prefix: str = opt("rl", "Prefix-RFT annotations (demo, demo_len_tokens, cut_points) on these rows", choices=PREFIX_MODES)
    prefix_tokenizer: str | None = opt(None, "tokenizer whose tokens demo_len_tokens and cut_points count (default: the probe model's)")
    reward_model: str | None = opt(None, "AutoModelForSequenceClassification folder: adds rm_score to every row")

    tokenize = Section(TokenizeConfig, chat_template=_template)
    probe = Section(ProbeConfig, modules=lambda c: tuple(c.modules))
    route = Section(RouteConfig)
    reward = Section(RewardConfig)
    # --chat-template belongs to the probe model: a separate --prefix-tokenizer keeps its own template
    prefix_rft = Section(PrefixConfig, tokenizer=lambda c: c.prefix_tokenizer or c.model,
                         chat_template=lambda c: None if c.prefix_tokenizer else _template(c))


@dataclass
class SamplingOptions(RunOptions):
    """Options of the jobs that sample from a model (drift, irft); each adds its own defaults of
    max_new_tokens, device, batch_tokens and seed."""

    temperature: float = opt(1.0, "sampling temperature (0: greedy)")
    top_p: float = opt(1.0, "nucleus sampling mass")
    engine: str = opt("auto", "generation engine (auto: vllm if installed and on CUDA, else hf)", choices=ENGINES)

    generation = Section(GenerationConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.scheduler and self.generates() and "auto" in (self.device, self.engine):
            # both are keyed into the samples' cache: resolved here, they could name what the workers did not run
            raise ValueError("--scheduler: give --device (cpu or cuda) and --engine (hf or vllm) explicitly; auto "
                             "would be resolved on this machine, not on the workers that sample")

    def generates(self) -> bool:
        """Whether the job samples from a model (drift with a recorded reward does not)."""
        return True


@dataclass
class DriftConfig(SamplingOptions):
    """`curate drift`: K multi-turn rollouts per prompt from a fixed reference policy, DRIFT returns and
    per-group importance weights, written as weighted SFT data to OUT/sft/."""

    out: str = opt("drift", "output folder: sft/, quarantine/, manifest.json")
    model: str | None = opt(None, "reference policy: local HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    shard_size: int = opt(64, "records per shard (the unit of caching, resume and parallelism)")
    samples: int = opt(8, "K: trajectories sampled per prompt")
    turns: int = opt(5, "T: answers per trajectory at most (feedback after each wrong one)")
    verifier: str = opt("math", "math | exact | recorded (the input's reward; nothing generated) | module:function")
    feedback: str = opt(DEFAULT_FEEDBACK, "user message appended after a wrong answer")
    system: str | None = opt(None, "system message put before prompts that have none (e.g. an answer-format instruction)")
    max_new_tokens: int = opt(512, "tokens per answer at most")
    device: str = opt("auto", "where the policy runs", choices=("auto", "cpu", "cuda"))
    batch_tokens: int = opt(32768, "hf engine: padded prompt + new tokens per generate batch")
    gamma: float = opt(0.9, "return gamma^(t*-1) when first solved at turn t*")
    format_penalty: float = opt(-0.1, "added to the return per turn without a parseable answer")
    repetition_penalty: float = opt(0.5, "lambda: subtract lambda x (1 - distinct answers / answers)")
    success_threshold: float = opt(1.0, "a numeric verdict (recorded reward, user score) at least this is a success")
    beta: float = opt(0.1, "weights exp(R/beta) / group mean of exp(R/beta)")
    all_fail: str = opt("keep", "a prompt group with no success: keep (uniform-ish weights) or drop", choices=ALL_FAIL)
    max_weight: float | None = opt(None, "clip weights above this (counted in the manifest)")
    seed: int = opt(0, "sampling seed (each record, sample and turn derives its own)")

    rollout = Section(RolloutConfig)
    returns = Section(ReturnConfig)
    weights = Section(WeightsConfig)

    def generates(self) -> bool:
        """A recorded reward samples nothing."""
        return self.verifier != "recorded"


@dataclass
class IrftConfig(SamplingOptions):
    """`curate irft`: for each demonstration, the generator's own reply, log-probs under the policy and
    the reference, implicit rewards and optional reward-model scores; DPO pairs in OUT/pairs/."""

    out: str = opt("irft", "output folder: pairs/, stage_index/, quarantine/, manifest.json")
    model: str | None = opt(None, "generator and policy pi: local HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    ref_model: str | None = opt(None, "reference pi_ref of the implicit reward (default: --model, the stage-start model)")
    reward_model: str | None = opt(None, "AutoModelForSequenceClassification folder: adds rm_score_chosen/rejected")
    shard_size: int = opt(64, "records per shard (the unit of caching, resume and parallelism)")
    stages: int = opt(1, "T: split the prompts into T chunks by id hash, one per IRFT stage")
    stage: int = opt(0, "t: build the pairs of this chunk (with --model: the checkpoint trained after stage t-1)")
    beta: float = opt(0.1, "implicit reward beta * (log pi - log pi_ref)")
    max_new_tokens: int = opt(256, "tokens per generated reply at most")
    device: str = opt("auto", "where the models run", choices=("auto", "cpu", "cuda"))
    batch_tokens: int = opt(16384, "padded tokens per generate / scoring batch")
    seed: int = opt(0, "sampling seed (each record derives its own)")

    continuation = Section(ContinuationConfig)
    pair_scores = Section(PairScoresConfig)




def add_arguments(parser: argparse.ArgumentParser, cls=PrismConfig, only: tuple[str, ...] | None = None) -> None:
    """One --flag per dataclass field, its help and choices from the field's metadata."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag = "--" + f.name.replace("_", "-")
        kw = {k: v for k, v in f.metadata.items() if k in ("help", "choices", "nargs")}
        if f.default not in (None, False, dataclasses.MISSING, "") and "help" in kw:
            kw["help"] = f"{kw['help']} (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=kw["help"])
            continue
        base = _scalar_type(f, cls)
        if kw.get("nargs") == "+":  # `--input a --input b` reads both (argparse would keep only b)
            kw["action"] = "extend"
        parser.add_argument(flag, type=base, default=argparse.SUPPRESS, required=f.name == "input" and only is None, **kw)


def _scalar_type(f: dataclasses.Field, cls=PrismConfig):
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = args[0]
    if typing.get_origin(base) is list:
        base = typing.get_args(base)[0]
    return base


def from_args(ns: argparse.Namespace, cls=PrismConfig) -> RunOptions:
    """The job config `cls` from parsed flags: the namespace's attributes that are fields of `cls` (flags
    not given keep their defaults). ValueError from its type and range checks."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def pipeline_job(path: str | Path) -> str:
    """The `job:` key of a pipelines/*.yaml file (prism when absent)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    return data.get("job", "prism")


def _yaml_value(text: str):
    """A `--set` value as YAML reads it; "nan"/"inf" (which YAML keeps as text) as the floats they name,
    so that the range check refuses them like the command line's flags."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(value)
    return value


def load_yaml(path: str | Path, overrides: list[str] = (), cls=PrismConfig) -> RunOptions:
    """A pipelines/*.yaml file (top-level keys are the fields) with key=value overrides on top."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        data[key.strip().replace("-", "_")] = _yaml_value(value)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"job"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(names)}")
    if isinstance(data.get("input"), str):
        data["input"] = [data["input"]]
    return cls(**{k: v for k, v in data.items() if k in names})
