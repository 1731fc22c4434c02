"""The settings of one training run: a TOML file, command-line overrides, checked before anything is built.

Why this file exists: a run must be reproducible from its run directory alone, so every setting lives in one
dataclass (`TrainConfig`), is type- and range-checked up front (a typo or a wrong type stops the run before a
tokenizer is trained or a model built, naming the key and the valid ones), and is written back resolved as
`config.toml` in the run directory. Keys keep nanochat's `chat_sft` names where it has one. `model.*` keys are
`fastsft.model.GPTConfig` fields for a model from random init (`model.name = "d20"` starts from a named shape).

Overrides: `--key=value` or `--key value`, dotted for tables (`--model.n_layer=4`), dashes or underscores
(`--seq-len 512`); values are TOML literals (`--num_iterations=100`, `--compile=false`), anything that is not a
TOML literal is a string (`--data=synthetic:spell`), and a bare `--flag` is `true`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_CONFIG = "default.toml"  # packaged in fastsft/configs/, what `fastsft train` runs without --config


@dataclass
class TrainConfig:
    # -- where and what --------------------------------------------------------------------------------------------
    out_dir: str = "runs/default"
    seed: int = 42
    data: str = "synthetic:arithmetic,synthetic:letter-count,synthetic:spell"  # task spec(s), see fastsft.data
    val_data: str = ""  # held-out task spec(s); "" = none
    skip_bad_rows: bool = False
    tokenizer: str = ""  # tokenizer.json or GPT-2 dir; "" = the source checkpoint's, else trained on the data
    tokenizer_vocab_size: int = 4096  # when trained on the data
    source: str = ""  # "" = random init from model.*; a fastsft checkpoint dir; or "nanochat:DIR"
    trust_pickle: bool = False  # nanochat's tokenizer.pkl is a pickle: loaded only when this is true
    model: dict = field(default_factory=dict)  # GPTConfig fields (+ "name") for random init
    # -- batch and length ------------------------------------------------------------------------------------------
    seq_len: int = 2048
    device_batch_size: int = 16  # rows of seq_len tokens per micro-batch
    target_examples_per_step: int = 32  # conversations per optimizer step over all ranks (micro-batches derived)
    target_tokens_per_step: int = 0  # > 0: size the step by real tokens instead of conversations
    max_seqs_per_row: int = 0  # cu_seqlens budget per row; 0 = sized to the data
    # -- length of the run -----------------------------------------------------------------------------------------
    num_epochs: int = 1
    num_iterations: int = -1  # > 0 overrides num_epochs
    # -- optimizer and schedule ------------------------------------------------------------------------------------
    embedding_lr: float = 0.2
    unembedding_lr: float = 0.004
    matrix_lr: float = 0.02
    scalar_lr: float = 0.5
    weight_decay: float = 0.0
    init_lr_frac: float = 0.02  # every group starts at this fraction of its base rate (nanochat chat_sft)
    warmup_ratio: float = 0.0  # share of steps ramping up from 0
    warmdown_ratio: float = 1.0  # share of steps decaying linearly to final_lr_frac (1.0 = the seed's schedule)
    final_lr_frac: float = 0.0
    muon_momentum_warmup_steps: int = 300  # Muon momentum 0.85 -> 0.95 over these steps (0 = none)
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    # -- compute ---------------------------------------------------------------------------------------------------
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32
    compile: str = "auto"  # auto (on for CUDA) | true | false
    loss_layout: str = "fast"  # fused linear cross-entropy layout: fast | low_memory
    activation_memory_budget: float = 1.0  # < 1: the compiled backward recomputes to keep this share of activations
    # the compiled graphs replayed as CUDA graphs (inductor's cudagraph trees): one launch for what the host
    # otherwise launches kernel by kernel, where a small model's step waits on the host (bench/RESULTS.md, run 13);
    # the loss stays outside, behind its graph break. Not yet measured on a GPU, so off
    cuda_graphs: bool = False
    # AdamW's moments: "param" keeps them in the parameter's dtype (bf16 for the bf16 embedding tables on GPUs, as
    # nanochat does: 1.7 GiB less at d20), "fp32" always fp32
    adam_moments: str = "param"
    recompute_mlp: bool = True  # the MLP keeps c_fc's output only, relu^2 is recomputed (d20: -6.4 GiB, +0.9% time)
    fp8: bool = False  # the blocks' projections train with fp8 matmuls (fastsft.fp8; GPUs of compute capability 8.9+)
    attention: str = ""  # pin an attention backend; "" = best available
    loader_thread: bool = True  # render and pack on a background thread
    # -- evaluation, logging, checkpoints --------------------------------------------------------------------------
    eval_every: int = 100  # validation loss every N steps (0 = only at the end)
    eval_steps: int = 20  # micro-batches of val_data per validation, per task
    eval_metrics_every: int = 0  # task metrics (fastsft.eval) every N steps; 0 = before and after only
    eval_metrics: str = ""  # tasks for fastsft.eval ("" = none); e.g. "ARC-Easy,GSM8K" or the val_data tasks
    eval_max_problems: int = 64
    answer_accuracy: bool = True  # teacher-forced exact match of held-out answers before and after
    answer_accuracy_problems: int = 200
    samples: int = 3  # sample answers (greedy) printed at the end
    save_every: int = 0  # checkpoint every N steps (0 = only at the end / on a signal)
    log_every: int = 1
    wandb: str = ""  # project name; "" = off
    tensorboard: bool = False
    profile: int = 0  # profile N steps (torch.profiler trace in out_dir)

    # ---------------------------------------------------------------------------------------------------------------

    def __post_init__(self):
        if isinstance(self.compile, bool):  # compile = true / false in TOML, beside "auto"
            self.compile = "true" if self.compile else "false"
        check_types(self)
        positive = ("seq_len", "device_batch_size", "num_epochs", "tokenizer_vocab_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("target_examples_per_step", "target_tokens_per_step", "max_seqs_per_row", "eval_every",
                        "eval_steps", "eval_metrics_every", "eval_max_problems", "answer_accuracy_problems",
                        "samples", "save_every", "muon_momentum_warmup_steps", "profile", "embedding_lr",
                        "unembedding_lr", "matrix_lr", "scalar_lr", "weight_decay", "grad_clip", "final_lr_frac")
        for name in non_negative:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.num_iterations == 0 or self.num_iterations < -1:
            raise ConfigError(f"num_iterations must be -1 (run num_epochs) or >= 1, got {self.num_iterations}")
        if self.target_examples_per_step == 0 and self.target_tokens_per_step == 0:
            raise ConfigError("set target_examples_per_step or target_tokens_per_step (both are 0)")
        if not 0.0 < self.activation_memory_budget <= 1.0:
            raise ConfigError(f"activation_memory_budget must be in (0, 1], got {self.activation_memory_budget}")
        if self.cuda_graphs and self.compile == "false":
            raise ConfigError("cuda_graphs replays the compiled graphs: it needs compile = auto or true")
        for name in ("init_lr_frac", "warmup_ratio", "warmdown_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")
        if self.init_lr_frac == 0:
            raise ConfigError("init_lr_frac must be > 0")
        if self.warmup_ratio + self.warmdown_ratio > 1.0:
            raise ConfigError(f"warmup_ratio + warmdown_ratio must be <= 1, got {self.warmup_ratio} + "
                              f"{self.warmdown_ratio}")
        choices = dict(device=("auto", "cpu", "cuda"), dtype=("auto", "bfloat16", "float32"),
                       compile=("auto", "true", "false"), loss_layout=("fast", "low_memory"),
                       adam_moments=("param", "fp32"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.data.strip():
            raise ConfigError("data is empty: give a task spec such as synthetic:arithmetic")
        if not self.out_dir:
            raise ConfigError("out_dir is empty")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML (top-level keys, then the [model] table)."""
        lines = [f"{k} = {_toml_value(v)}" for k, v in self.to_dict().items() if not isinstance(v, dict)]
        for k, v in self.to_dict().items():
            if isinstance(v, dict):
                lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
        return "\n".join(lines) + "\n"


class ConfigError(ValueError):
    """A bad key or value in a training config; the message names it."""


# -- types -----------------------------------------------------------------------------------------------------------

_HINTS: dict[str, Any] = {}


def field_types() -> dict[str, type]:
    if not _HINTS:
        _HINTS.update({k: v for k, v in get_type_hints(TrainConfig).items()})
    return _HINTS


def check_types(cfg: TrainConfig) -> None:
    for name, kind in field_types().items():
        value = getattr(cfg, name)
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok:
                setattr(cfg, name, float(value))
        elif kind is str:
            ok = isinstance(value, str)
        else:  # dict
            ok = isinstance(value, dict)
        if not ok:
            raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r} ({type(value).__name__})")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if v is None:
        return '""'
    return repr(v)


# -- loading ---------------------------------------------------------------------------------------------------------


def read_toml(path: str | Path | None) -> tuple[dict, str]:
    """(settings, where they came from): the given file, or the packaged default."""
    if path is None:
        text = resources.files("fastsft.configs").joinpath(DEFAULT_CONFIG).read_text(encoding="utf-8")
        where = f"fastsft/configs/{DEFAULT_CONFIG} (built in)"
    else:
        p = Path(path)
        if not p.is_file():
            builtin = resources.files("fastsft.configs").joinpath(str(path))
            if builtin.is_file():  # a packaged config by name, e.g. --config d20.toml
                return tomllib.loads(builtin.read_text(encoding="utf-8")), f"fastsft/configs/{path} (built in)"
            raise ConfigError(f"config file {path} not found (built-in configs: {', '.join(builtin_configs())})")
        text, where = p.read_text(encoding="utf-8"), str(p)
    try:
        return tomllib.loads(text), where
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None


def builtin_configs() -> list[str]:
    return sorted(p.name for p in resources.files("fastsft.configs").iterdir() if p.name.endswith(".toml"))


def parse_overrides(args: list[str]) -> dict:
    """['--a=1', '--model.n_layer', '4'] -> {'a': 1, 'model': {'n_layer': 4}}; values as TOML literals."""
    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides are --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"  # a bare --flag switches a boolean on
            else:
                value = args[i + 1]
                i += 1
        key = key.replace("-", "_")
        target = out
        *tables, leaf = key.split(".")
        for t in tables:
            target = target.setdefault(t, {})
        target[leaf] = parse_value(value)
        i += 1
    return out


def parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_config(settings: dict, where: str = "config") -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
    try:
        return TrainConfig(**settings)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """The run's config: the file (or the built-in default) with overrides applied, checked."""
    settings, where = read_toml(path)
    extra = parse_overrides(overrides) if isinstance(overrides, list) else (overrides or {})
    if "name" in extra.get("model", {}):
        # A named shape on the command line starts the model table afresh: the file's n_layer, n_embd, ... would
        # otherwise override the shape that was asked for.
        settings = {k: v for k, v in settings.items() if k != "model"}
    if extra:
        where += " + command-line overrides"
    return build_config(merge(settings, extra), where)
