"""The run configuration's schema: frozen, typed dataclasses, one per section, validated in
``__post_init__`` with messages that name the field and the allowed values.

Field names are public interface (``--config.<section>.<field>=value``); the loader is
:mod:`jaxpo.train.config`, which re-exports every name defined here.

>>> TrainConfig(steps=-1)
Traceback (most recent call last):
...
ValueError: config.train.steps=-1 must be >= 0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


def _choices(section: str, field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(
            f"config.{section}.{field}={value!r} is not allowed; choose from {list(allowed)}"
        )


def _at_least(section: str, field: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"config.{section}.{field}={value!r} must be >= {low}")


# ---------------------------------------------------------------------------------------------
# Small string formats used by LossConfig.


def _parse_scalar(text: str) -> Any:
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_kwargs(text: str) -> dict[str, Any]:
    """``"label_smoothing=0.1,gamma=0.5"`` → ``{"label_smoothing": 0.1, "gamma": 0.5}``."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"config.loss.kwargs: {item!r} is not of the form name=value")
        out[key.strip()] = _parse_scalar(value)
    return out


def parse_weights(text: str) -> dict[str, float]:
    """``"dpo:1.0,sft:0.2"`` → ``{"dpo": 1.0, "sft": 0.2}``."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition(":")
        try:
            out[key.strip()] = float(value) if sep else 1.0
        except ValueError:
            raise ValueError(
                f"config.loss.weights: {item!r} is not of the form name:weight"
            ) from None
    return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy model (and the initial reference)."""

    preset: str = "tiny"  # a jaxpo.models preset, used when path is empty
    path: str = ""  # local Hugging Face model dir (config.json, safetensors, tokenizer.json)
    tokenizer: str = ""  # dir with tokenizer.json (default: path, or the bundled tiny tokenizer)
    dtype: str = "float32"  # compute dtype: float32|bfloat16
    param_dtype: str = "float32"  # parameter (and optimiser state) dtype: float32|bfloat16
    remat: str = "none"  # activation rematerialisation: none|block|full
    logprob_chunk_size: int = 256  # sequence chunk for log-probs without [B, S, V] logits

    def __post_init__(self):
        _choices("model", "dtype", self.dtype, ("float32", "bfloat16"))
        _choices("model", "param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _choices("model", "remat", self.remat, ("none", "block", "full"))
        _at_least("model", "logprob_chunk_size", self.logprob_chunk_size, 1)
        if not self.path and not self.preset:
            raise ValueError("config.model: set either model.path (HF dir) or model.preset")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Preference data and how it is batched."""

    train_files: tuple[str, ...] = ()  # globs ok; empty = the bundled synthetic task
    eval_files: tuple[str, ...] = ()  # held-out files; empty = none (or the synthetic split)
    format: str = "auto"  # record kind: auto|pair|list|tree|unpaired
    layout: str = "share_prefix"  # padded|packed|share_prefix
    on_bad_record: str = "error"  # error|skip (skipped records are counted)
    max_length: int = 512  # row length S in tokens (prompt + responses)
    max_prompt_length: int = 0  # prompts longer than this are truncated; 0 = no prompt limit
    truncation_mode: str = "keep_end"  # keep_start|keep_end (prompt truncation)
    batch_size: int = 8  # groups per global batch
    max_responses: int = 2  # K, responses per group
    max_steps: int = 1  # M, tree depth in steps
    node_slots: int = 0  # N node slots per row; 0 = derived
    rows: int = 0  # R rows per global batch; 0 = derived
    shuffle: bool = True  # shuffle records every epoch (seeded by train.seed)
    num_workers: int = 0  # grain worker processes; 0 = in-process

    def __post_init__(self):
        for name in ("train_files", "eval_files"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single path given directly
                object.__setattr__(self, name, tuple(v for v in value.split(",") if v))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        _choices("data", "format", self.format, ("auto", "pair", "list", "tree", "unpaired"))
        _choices("data", "layout", self.layout, ("padded", "packed", "share_prefix"))
        _choices("data", "on_bad_record", self.on_bad_record, ("error", "skip"))
        _choices("data", "truncation_mode", self.truncation_mode, ("keep_start", "keep_end"))
        _at_least("data", "max_length", self.max_length, 2)
        _at_least("data", "max_prompt_length", self.max_prompt_length, 0)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"config.data.max_prompt_length={self.max_prompt_length} must be smaller than "
                f"config.data.max_length={self.max_length}"
            )
        _at_least("data", "batch_size", self.batch_size, 1)
        _at_least("data", "max_responses", self.max_responses, 1)
        _at_least("data", "max_steps", self.max_steps, 1)
        _at_least("data", "node_slots", self.node_slots, 0)
        _at_least("data", "rows", self.rows, 0)
        _at_least("data", "num_workers", self.num_workers, 0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The preference objective(s)."""

    name: str = "dpo"  # a jaxpo.losses name, or "a+b" combination
    beta: float | None = None  # None = the objective's paper default
    weights: str = ""  # e.g. "dpo:1.0,sft:0.2" (overrides name)
    kwargs: str = ""  # extra hyperparameters "label_smoothing=0.1,gamma=0.5"
    modifier: str = ""  # ""|wpo (WPO weights)|ld (LD-DPO; α = kwargs ld_alpha, or alpha)

    def __post_init__(self):
        _choices("loss", "modifier", self.modifier, ("", "wpo", "ld"))
        if not self.name and not self.weights:
            raise ValueError("config.loss.name is empty; give a jaxpo.losses name, e.g. 'dpo'")
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"config.loss.beta={self.beta!r} must be >= 0")
        parse_weights(self.weights)
        parse_kwargs(self.kwargs)

    def objective_weights(self) -> dict[str, float]:
        """``{name: weight}`` from ``weights``, else from ``name`` ("a+b" gives weight 1 each)."""
        if self.weights:
            return parse_weights(self.weights)
        return {part.strip(): 1.0 for part in self.name.split("+") if part.strip()}

    def hyperparameters(self) -> dict[str, Any]:
        """``kwargs`` parsed, plus ``beta`` when set."""
        out = parse_kwargs(self.kwargs)
        if self.beta is not None:
            out["beta"] = self.beta
        return out


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    """Where the reference log-probs come from."""

    mode: str = "model"  # model|precomputed|none
    # For precomputed: the dir written by `jaxpo precompute-ref`; empty = the records carry the
    # reference log-probs (`ref_chosen_logps`/`ref_rejected_logps`, or `ref_logps`).
    cache_dir: str = ""

    def __post_init__(self):
        _choices("reference", "mode", self.mode, ("model", "precomputed", "none"))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optax optimiser chain (see jaxpo.train.optim)."""

    name: str = "adamw"  # adamw|sgd|adafactor
    learning_rate: float = 5e-6  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay (adamw), L2-style for sgd/adafactor
    b1: float = 0.9  # first-moment decay (adamw); momentum for sgd (0 = none)
    b2: float = 0.999  # second-moment decay (adamw)
    eps: float = 1e-8  # adamw denominator epsilon
    schedule: str = "cosine"  # decay after warmup: cosine|linear|constant
    warmup_steps: int = 0  # linear warmup from 0 to learning_rate
    max_grad_norm: float = 1.0  # global-norm clipping; 0 = no clipping
    grad_accum_steps: int = 1  # micro-batches per update (optax.MultiSteps)

    def __post_init__(self):
        _choices("optim", "name", self.name, ("adamw", "sgd", "adafactor"))
        _choices("optim", "schedule", self.schedule, ("cosine", "linear", "constant"))
        _at_least("optim", "learning_rate", self.learning_rate, 0.0)
        _at_least("optim", "weight_decay", self.weight_decay, 0.0)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"config.optim.{name}={value!r} must be in [0, 1)")
        _at_least("optim", "eps", self.eps, 0.0)
        _at_least("optim", "warmup_steps", self.warmup_steps, 0)
        _at_least("optim", "max_grad_norm", self.max_grad_norm, 0.0)
        _at_least("optim", "grad_accum_steps", self.grad_accum_steps, 1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp", "tensor") and the logical-axis rules preset."""

    data: int = -1  # data-parallel size; -1 = the devices left over
    fsdp: int = 1  # parameter-sharding size; -1 = the devices left over
    tensor: int = 1  # tensor-parallel size; -1 = the devices left over
    rules: str = "fsdp"  # logical-axis rules preset: fsdp|dp|fsdp_tp

    def __post_init__(self):
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise ValueError(f"config.mesh.{name}={size} must be a positive size or -1")
        if sum(size == -1 for size in sizes.values()) > 1:
            raise ValueError(f"config.mesh: at most one axis may be -1, got {sizes}")
        _choices("mesh", "rules", self.rules, ("fsdp", "dp", "fsdp_tp"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps, seeds, logging, checkpoints and evaluation."""

    steps: int = 100  # optimiser updates (preference phase)
    seed: int = 0  # seeds parameters init, data order and dropout-free sampling
    log_every: int = 1  # write metrics every N steps
    checkpoint_every: int = 50  # save every N steps (and at the end, and on SIGTERM)
    keep_checkpoints: int = 3  # keep the last k checkpoints
    eval_every: int = 0  # evaluate on data.eval_files every N steps; 0 = only at the end
    eval_batches: int = 0  # batches per evaluation; 0 = the whole eval set
    peak_flops: float = 0.0  # per device, for mfu; 0 = unknown (mfu omitted)
    sft_warmup_steps: int = 0  # SFT phase before the preference objective (embedded default)

    def __post_init__(self):
        _at_least("train", "steps", self.steps, 0)
        _at_least("train", "log_every", self.log_every, 1)
        _at_least("train", "checkpoint_every", self.checkpoint_every, 1)
        _at_least("train", "keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("train", "eval_every", self.eval_every, 0)
        _at_least("train", "eval_batches", self.eval_batches, 0)
        _at_least("train", "peak_flops", self.peak_flops, 0.0)
        _at_least("train", "sft_warmup_steps", self.sft_warmup_steps, 0)


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run: ``Config(model, data, loss, reference, optim, mesh, train)``."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    reference: ReferenceConfig = ReferenceConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON-able: tuples become lists)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "loss": LossConfig, "reference": ReferenceConfig,
    "optim": OptimConfig, "mesh": MeshConfig, "train": TrainConfig,
}
