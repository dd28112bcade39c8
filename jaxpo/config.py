"""The run configuration: frozen, typed dataclasses, presets and ``--config.a.b=value`` overrides.

    config = load_config("configs/dpo_tiny.py", ["--config.train.steps=200"])

One dataclass per section (``model``, ``data``, ``loss``, ``reference``, ``optim``, ``mesh``,
``train``), each field commented and checked in ``__post_init__`` with a message that names it.
A preset is a Python file whose ``get_config()`` returns a dict of section overrides (only what
differs from the defaults), e.g. ``{"loss": {"name": "ipo"}, "train": {"steps": 200}}``.
Without a file the defaults below are the run: they are meant for a user's own model and data;
the embedded demo (``jaxpo train`` with no arguments) keeps its own settings in
:mod:`jaxpo.demo`.

This module is a leaf: it imports nothing from jaxpo, so every package can read its section.
Checks that need another package (the model preset exists, the objective gets its reference
and its data kind) run when the run is built (:mod:`jaxpo.train.setup`).

>>> cfg = apply_overrides(Config(), ["--config.loss.beta=0.2", "--config.data.eval_files=a,b"])
>>> cfg.loss.beta, cfg.data.eval_files
(0.2, ('a', 'b'))
>>> TrainConfig(steps=-1)
Traceback (most recent call last):
...
ValueError: config.train.steps=-1 must be >= 0
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The group kinds (docs/architecture.md §1): every record becomes one group of one kind.
KINDS = ("pair", "list", "tree", "unpaired")
LAYOUTS = ("padded", "packed", "share_prefix")
REFERENCE_MODES = ("model", "precomputed", "none")


def _choices(section: str, field: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(
            f"config.{section}.{field}={value!r} is not allowed; choose from {list(allowed)}"
        )


def _at_least(section: str, field: str, value: float, low: float) -> None:
    if value < low:
        raise ValueError(f"config.{section}.{field}={value!r} must be >= {low}")


def _finite(section: str, obj: Any) -> None:
    """Every float field of ``obj`` is finite (a NaN learning rate trains to NaN silently)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config.{section}.{f.name}={value!r} must be a finite number")


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
        value = _parse_scalar(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config.loss.kwargs: {key.strip()}={value!r} must be finite")
        out[key.strip()] = value
    return out


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (docs/lora.md): only low-rank updates ``(alpha/rank)·(x·A)·B`` of the
    targeted projections are trained; the reference is the base model, adapters off."""

    rank: int = 0  # r, the adapters' width; 0 = off (every parameter is trained)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    # Projections adapted: attention q,k,v,o and MLP gate,up,down (comma-separated).
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets",
                               tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        elif not isinstance(self.targets, tuple):
            object.__setattr__(self, "targets", tuple(self.targets))
        _finite("model.lora", self)
        _at_least("model.lora", "rank", self.rank, 0)
        if not self.alpha > 0:
            raise ValueError(f"config.model.lora.alpha={self.alpha!r} must be > 0")
        if not self.targets:
            raise ValueError("config.model.lora.targets is empty; choose from "
                             f"{list(LORA_TARGETS)}")
        for target in self.targets:
            _choices("model.lora", "targets", target, LORA_TARGETS)
        if len(set(self.targets)) < len(self.targets):
            raise ValueError(f"config.model.lora.targets={','.join(self.targets)} names a "
                             "projection twice")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The policy model (and the initial reference)."""

    preset: str = "tiny"  # a jaxpo.models preset, used when path is empty
    path: str = ""  # local Hugging Face model dir (config.json, safetensors, tokenizer.json)
    tokenizer: str = ""  # dir with tokenizer.json (default: path, or the bundled tiny tokenizer)
    # A jaxpo workdir whose newest checkpoint's policy weights start this run (and are its
    # reference in reference.mode=model), e.g. an SFT run before DPO. Empty = path or preset.
    init_from: str = ""
    dtype: str = "float32"  # compute dtype: float32|bfloat16
    param_dtype: str = "float32"  # parameter (and optimiser state) dtype: float32|bfloat16
    remat: str = "none"  # activation rematerialisation: none|block|full
    attention: str = "blockwise"  # tree attention: blockwise|dense|pallas
    attention_block: int = 512  # blockwise/pallas query and key block length (clipped to S)
    logprob_chunk_size: int = 256  # sequence chunk for log-probs without [B, S, V] logits
    # lm: a causal LM (the policy) | reward: a reward model, the decoder with a scalar head
    # read at each response's last token (train it with loss.name=bradley_terry)
    head: str = "lm"
    # LoRA adapters: --config.model.lora.rank=16 trains only them (rank 0 = off).
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        _choices("model", "dtype", self.dtype, ("float32", "bfloat16"))
        _choices("model", "param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _choices("model", "remat", self.remat, ("none", "block", "full"))
        _choices("model", "attention", self.attention, ("blockwise", "dense", "pallas"))
        _choices("model", "head", self.head, ("lm", "reward"))
        _at_least("model", "logprob_chunk_size", self.logprob_chunk_size, 1)
        _at_least("model", "attention_block", self.attention_block, 1)
        if not self.path and not self.preset:
            raise ValueError("config.model: set either model.path (HF dir) or model.preset")
        if self.lora.rank and self.head != "lm":
            raise ValueError(f"config.model.lora.rank={self.lora.rank} adapts a causal LM; "
                             f"config.model.head={self.head!r} is not one (set lora.rank=0)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Preference data: how records become groups and groups become batches."""

    train_files: tuple[str, ...] = ()  # globs ok; empty = the bundled synthetic task
    eval_files: tuple[str, ...] = ()  # held-out files; empty = none (or the synthetic split)
    format: str = "auto"  # record kind: auto (detected per record)|pair|list|tree|unpaired
    layout: str = "share_prefix"  # padded|packed|share_prefix
    on_bad_record: str = "error"  # error|skip (skipped records are counted)
    max_length: int = 512  # longest prompt + response in tokens (longer responses are cut)
    max_prompt_length: int = 0  # prompts longer than this are truncated; 0 = no prompt limit
    truncation_mode: str = "keep_end"  # keep_start|keep_end: which end of a long prompt stays
    # List/tree scores → ψ labels: minmax|winrate|bradley_terry|raw; "" = the objective's own
    # (raw rewards for pro and infonca, minmax otherwise).
    label_mapping: str = ""
    max_record_bytes: int = 16 * 2**20  # a larger record is a bad record (read no further)
    batch_size: int = 8  # groups per global batch
    max_responses: int = 2  # K, responses per group
    max_steps: int = 1  # M, tree depth in steps
    seq_len: int = 0  # S tokens per row; 0 = derived (any group within max_length fits)
    node_slots: int = 0  # N node slots per row; 0 = derived
    rows: int = 0  # R rows per global batch; 0 = derived (from tokens_per_batch)
    # Token budget R·S of a global batch (packed/share_prefix): R = ceil(tokens_per_batch / S).
    # 0 = derived: by jaxpo.data.resolve_batch_shapes from a sample of the data, else R = batch_size.
    tokens_per_batch: int = 0
    shuffle: bool = True  # shuffle records every epoch (seeded by train.seed)
    num_workers: int = 0  # grain worker processes; 0 = in-process

    def __post_init__(self):
        for name in ("train_files", "eval_files"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single path given directly
                object.__setattr__(self, name, tuple(v for v in value.split(",") if v))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        _choices("data", "format", self.format, ("auto", *KINDS))
        _choices("data", "layout", self.layout, LAYOUTS)
        _choices("data", "on_bad_record", self.on_bad_record, ("error", "skip"))
        _choices("data", "truncation_mode", self.truncation_mode, ("keep_start", "keep_end"))
        _choices("data", "label_mapping", self.label_mapping,
                 ("", "minmax", "winrate", "bradley_terry", "raw"))
        _at_least("data", "max_length", self.max_length, 2)
        _at_least("data", "max_prompt_length", self.max_prompt_length, 0)
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"config.data.max_prompt_length={self.max_prompt_length} must be smaller than "
                f"config.data.max_length={self.max_length}"
            )
        _at_least("data", "max_record_bytes", self.max_record_bytes, 1)
        _at_least("data", "batch_size", self.batch_size, 1)
        _at_least("data", "max_responses", self.max_responses, 1)
        _at_least("data", "max_steps", self.max_steps, 1)
        _at_least("data", "seq_len", self.seq_len, 0)
        _at_least("data", "node_slots", self.node_slots, 0)
        _at_least("data", "rows", self.rows, 0)
        _at_least("data", "tokens_per_batch", self.tokens_per_batch, 0)
        _at_least("data", "num_workers", self.num_workers, 0)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The preference objective."""

    # A jaxpo.losses name, or a weighted sum of names: "dpo", "dpo + 0.2*sft" (RPO).
    name: str = "dpo"
    beta: float | None = None  # None = the objective's paper default
    kwargs: str = ""  # extra hyperparameters "label_smoothing=0.1,gamma=0.5"
    modifier: str = ""  # ""|wpo (WPO weights)|ld (LD-DPO; α = kwargs ld_alpha, or alpha)
    # KTO's reference point z0: mismatched (as TRL: each prompt with another example's
    # completion, an extra no-gradient forward) | matched (the batch's own pairs, no extra cost)
    kto_kl: str = "mismatched"

    def __post_init__(self):
        _choices("loss", "modifier", self.modifier, ("", "wpo", "ld"))
        _choices("loss", "kto_kl", self.kto_kl, ("mismatched", "matched"))
        _finite("loss", self)
        if not self.name.strip():
            raise ValueError("config.loss.name is empty; give a jaxpo.losses name, e.g. 'dpo'")
        if self.beta is not None and self.beta < 0:
            raise ValueError(f"config.loss.beta={self.beta!r} must be >= 0")
        parse_kwargs(self.kwargs)

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
        _choices("reference", "mode", self.mode, REFERENCE_MODES)


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
    grad_accum_steps: int = 1  # micro-batches per update (a scan inside the jitted step)

    def __post_init__(self):
        _finite("optim", self)
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
    """Device mesh ("data", "fsdp", "tensor") and the logical-axis rules preset.

    The sizes are checked against the devices when the mesh is made
    (:func:`jaxpo.sharding.mesh_shape`), the one place that knows the device count.
    """

    data: int = -1  # data-parallel size; -1 = the devices left over
    fsdp: int = 1  # parameter-sharding size; -1 = the devices left over
    tensor: int = 1  # tensor-parallel size; -1 = the devices left over
    rules: str = "fsdp"  # logical-axis rules preset: fsdp|dp|fsdp_tp

    def __post_init__(self):
        _choices("mesh", "rules", self.rules, ("fsdp", "dp", "fsdp_tp"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Steps, seeds, logging, checkpoints and evaluation."""

    steps: int = 100  # optimiser updates
    seed: int = 0  # seeds parameters init, data order and dropout-free sampling
    log_every: int = 10  # write metrics every N updates (fetched one log step late)
    checkpoint_every: int = 50  # save every N steps (and at the end, and on SIGTERM)
    keep_checkpoints: int = 3  # keep the last k checkpoints
    eval_every: int = 0  # evaluate on data.eval_files every N steps; 0 = only at the end
    eval_batches: int = 0  # batches per evaluation; 0 = the whole eval set
    peak_flops: float = 0.0  # per device, for mfu; 0 = unknown (mfu omitted)
    # Stop (non-zero exit, last good checkpoint kept) after this many consecutive steps with a
    # non-finite loss or gradient; each such step is skipped and counted.
    max_skipped_steps: int = 10
    # Resume a workdir whose stored config differs in more than the keys that are safe to change
    # (steps, logging, checkpoints, evaluation): see jaxpo.train.loop.SAFE_TO_CHANGE.
    allow_config_change: bool = False

    def __post_init__(self):
        _finite("train", self)
        _at_least("train", "steps", self.steps, 0)
        _at_least("train", "log_every", self.log_every, 1)
        _at_least("train", "checkpoint_every", self.checkpoint_every, 1)
        _at_least("train", "keep_checkpoints", self.keep_checkpoints, 1)
        _at_least("train", "eval_every", self.eval_every, 0)
        _at_least("train", "eval_batches", self.eval_batches, 0)
        _at_least("train", "peak_flops", self.peak_flops, 0.0)
        _at_least("train", "max_skipped_steps", self.max_skipped_steps, 1)


ROLLOUT_BUILDS = ("pairs", "lists", "trees")


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """On-policy training (jaxpo.train.rollout, docs/onpolicy.md): the policy samples responses,
    a reward source scores them, and the scored samples are the training data."""

    enabled: bool = False  # train on the policy's own samples instead of data.train_files
    # Updates per round of samples: 1 = online (fresh samples every update); N > 1 = iterative
    # (a new round every N updates).
    every: int = 1
    # Refresh the reference to the current policy at each round (iterative DPO); None = on
    # when every > 1, off when every = 1 (the reference stays the initial model).
    refresh_reference: bool | None = None
    prompts: tuple[str, ...] = ()  # JSONL/Parquet files with a `prompt` field; empty = train files'
    prompts_per_rollout: int = 16  # prompts sampled per round
    num_samples: int = 4  # K responses sampled per prompt
    temperature: float = 1.0  # sampling temperature (> 0: K greedy samples would be equal)
    top_p: float = 1.0  # nucleus sampling mass
    max_new_tokens: int = 32  # the longest sampled response, in tokens
    # task (the synthetic task's true reward) | module:function (a Python callable
    # (prompts, responses) -> rewards) | rm:<path> (a jaxpo reward model workdir or export)
    reward: str = "task"
    # pairs: best vs worst sample (ties dropped) | lists: the distinct samples, scored |
    # trees: the samples as a tree of word steps, leaves scored (TPO)
    build: str = "pairs"

    def __post_init__(self):
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", tuple(v for v in self.prompts.split(",") if v))
        elif not isinstance(self.prompts, tuple):
            object.__setattr__(self, "prompts", tuple(self.prompts))
        _finite("rollout", self)
        _at_least("rollout", "every", self.every, 1)
        _at_least("rollout", "prompts_per_rollout", self.prompts_per_rollout, 1)
        _at_least("rollout", "num_samples", self.num_samples, 2)
        _at_least("rollout", "max_new_tokens", self.max_new_tokens, 1)
        if not self.temperature > 0:
            raise ValueError(f"config.rollout.temperature={self.temperature!r} must be > 0 (the "
                             "K samples of a prompt must differ to be compared)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"config.rollout.top_p={self.top_p!r} must be in (0, 1]")
        _choices("rollout", "build", self.build, ROLLOUT_BUILDS)
        kind, _, rest = self.reward.partition(":")
        if self.reward == "task" or (kind == "rm" and rest.strip()):
            return
        if not (kind.strip() and rest.strip()) or kind == "rm":
            raise ValueError(
                f"config.rollout.reward={self.reward!r} is not a reward source; write task, "
                "rm:<reward model dir> or module:function")

    @property
    def refreshes_reference(self) -> bool:
        """Whether the reference is the policy at the start of each round."""
        return self.every > 1 if self.refresh_reference is None else self.refresh_reference


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole run: ``Config(model, data, loss, reference, optim, mesh, train, rollout)``."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    reference: ReferenceConfig = ReferenceConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainConfig = TrainConfig()
    rollout: RolloutConfig = RolloutConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (JSON-able: tuples become lists); what checkpoints store."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "loss": LossConfig, "reference": ReferenceConfig,
    "optim": OptimConfig, "mesh": MeshConfig, "train": TrainConfig,
    "rollout": RolloutConfig,
}
# Keys that no longer exist, and what to write instead.
REMOVED: dict[str, str] = {
    "loss.weights": "write the weights in config.loss.name, e.g. --config.loss.name='dpo + 0.2*sft'",
    "train.sft_warmup_steps": ("run the SFT warm-up as its own run (config.loss.name=sft) and "
                               "start from it with --config.model.init_from=<its workdir>"),
}


# ------------------------------------------------------------------------------ overrides


def _coerce(section: str, field: str, annotation: Any, value: Any) -> Any:
    """Converts ``value`` (a string from the command line, or a Python value) to ``annotation``."""
    where = f"config.{section}.{field}"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(section, field, inner, value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(_coerce(section, field, args[0], v) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}={value!r}: expected a boolean (true|false)")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: expected {annotation.__name__}")
        try:
            if annotation is int and isinstance(value, str):
                as_float = float(value)  # accept "1e3" for ints when integral
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            if annotation is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = annotation(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}={value!r}: expected {annotation.__name__}") from None
        if not math.isfinite(out):
            raise ValueError(f"{where}={value!r} must be a finite number")
        return out
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}={value!r}: expected a string")
        return value
    return value


def _unknown(kind: str, name: str, known: Sequence[str]) -> ValueError:
    if name in REMOVED:
        return ValueError(f"config.{name} was removed: {REMOVED[name]}")
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; known: {', '.join(known)}"
    return ValueError(f"unknown config {kind} {name!r}{hint}")


def _nested(annotation: Any) -> type | None:
    """The dataclass of a nested config field (``model.lora``), else None."""
    return annotation if dataclasses.is_dataclass(annotation) else None


def _all_keys() -> list[str]:
    keys = []
    for s, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            inner = _nested(hints[f.name])
            keys += ([f"{s}.{f.name}.{g.name}" for g in dataclasses.fields(inner)] if inner
                     else [f"{s}.{f.name}"])
    return keys


def _replace_nested(where: str, current: Any, fields: Mapping[str, Any]) -> Any:
    """``current`` (a nested section such as ``model.lora``) with ``fields`` applied."""
    hints = typing.get_type_hints(type(current))
    changes = {}
    for name, value in fields.items():
        if name not in hints:
            known = [k for k in _all_keys() if k.startswith(where + ".")]
            raise _unknown("key", f"{where}.{name}", known)
        changes[name] = _coerce(where, name, hints[name], value)
    return dataclasses.replace(current, **changes)


def replace(config: Config, updates: Mapping[str, Mapping[str, Any]]) -> Config:
    """Returns ``config`` with ``{section: {field: value}}`` applied (values coerced, validated)."""
    sections = {}
    for section, fields in updates.items():
        if section not in SECTIONS:
            raise _unknown("section", section, list(SECTIONS))
        if isinstance(fields, SECTIONS[section]):
            sections[section] = fields
            continue
        if not isinstance(fields, Mapping):
            raise TypeError(f"config.{section} must be a dict of field values, got {fields!r}")
        hints = typing.get_type_hints(SECTIONS[section])
        current = sections.get(section, getattr(config, section))
        changes = {}
        for field, value in fields.items():
            if field not in hints:
                known = [k for k in _all_keys() if k.startswith(section + ".")]
                raise _unknown("key", f"{section}.{field}", known)
            if _nested(hints[field]) and isinstance(value, Mapping):  # e.g. model.lora
                changes[field] = _replace_nested(f"{section}.{field}",
                                                 changes.get(field, getattr(current, field)),
                                                 value)
                continue
            changes[field] = _coerce(section, field, hints[field], value)
        sections[section] = dataclasses.replace(current, **changes)
    return dataclasses.replace(config, **sections)


def parse_override(arg: str) -> tuple[str, str, str]:
    """``"--config.train.steps=10"`` → ``("train", "steps", "10")``; a nested field keeps its
    dots: ``"--config.model.lora.rank=8"`` → ``("model", "lora.rank", "8")``."""
    body = arg.removeprefix("--")
    if not body.startswith("config."):
        raise ValueError(f"not a config override: {arg!r} (expected --config.section.field=value)")
    key, sep, value = body[len("config."):].partition("=")
    if not sep:
        raise ValueError(f"config override {arg!r} has no value (expected --config.{key}=value)")
    if key not in _all_keys():
        raise _unknown("key", key, _all_keys())
    section, _, field = key.partition(".")
    return section, field, value


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Applies ``--config.section.field=value`` strings in order."""
    updates: dict[str, dict[str, Any]] = {}
    for arg in overrides:
        section, field, value = parse_override(arg)
        outer, dot, inner = field.partition(".")
        target = updates.setdefault(section, {})
        if dot:  # a nested field: model.lora.rank
            target.setdefault(outer, {})[inner] = value
        else:
            target[field] = value
    return replace(config, updates)


def from_preset_file(path: str | Path) -> Config:
    """Imports ``path`` and applies its ``get_config()`` (a dict of section overrides, or a
    Config) to the defaults."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config={path}: no such file")
    spec = importlib.util.spec_from_file_location(f"jaxpo_preset_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a preset must define get_config()")
    result = module.get_config()
    if isinstance(result, Config):
        return result
    if not isinstance(result, Mapping):
        raise TypeError(
            f"{path}: get_config() must return a dict of section overrides or a Config"
        )
    try:
        return replace(Config(), result)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """The run configuration: a preset file (or the defaults) plus overrides.

    Args:
        path: a ``configs/*.py`` file defining ``get_config()``, or None for the defaults.
        overrides: ``--config.section.field=value`` strings.

    Returns:
        The validated, frozen :class:`Config`.
    """
    config = from_preset_file(path) if path else Config()
    return apply_overrides(config, overrides)


def from_dict(data: Mapping[str, Mapping[str, Any]]) -> Config:
    """Inverse of :meth:`Config.to_dict` (lists become tuples)."""
    return replace(Config(), data)


def differences(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """``{"section.field": (old value, new value)}`` for every field that differs.

    >>> differences(Config(), replace(Config(), {"train": {"steps": 5}}))
    {'train.steps': (100, 5)}
    """
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"lora": {"rank": 8}}}`` → ``{"model.lora.rank": 8}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
