"""Decoder configuration: a frozen dataclass for the Llama family, HF config.json, presets.

A :class:`ModelConfig` describes Llama 2/3/3.1/3.2, Mistral (no sliding window), Qwen2/2.5
(q/k/v bias) and Qwen3 (per-head q/k RMSNorm). :meth:`ModelConfig.from_hf` reads a Hugging Face
``config.json`` dict and rejects what the decoder does not implement with an error naming the
field; :meth:`ModelConfig.to_hf` writes one back.

>>> cfg = get_preset("tiny")
>>> (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
(2, 64, 4, 2, 16)
>>> ModelConfig.from_hf(cfg.to_hf()) == cfg
True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxpo.models.lora import Lora

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_DTYPES = ("float32", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16"}
_REMAT = ("none", "block", "full")
_ATTENTION = ("blockwise", "dense", "pallas", "dot_product")
_HEADS = ("lm", "reward")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (HF ``rope_type: "llama3"``)."""

    factor: float  # divides the low frequencies
    low_freq_factor: float  # wavelengths above original_max / low_freq_factor are scaled
    high_freq_factor: float  # wavelengths below original_max / high_freq_factor are kept
    original_max_position_embeddings: int  # context length the model was pretrained with


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder.

    Parameters are stored in ``param_dtype`` and cast to ``dtype`` for compute; norms, softmax
    and the logits are fp32 whatever ``dtype`` is.
    """

    vocab_size: int  # rows of the embedding and unembedding
    hidden_size: int  # model width D
    intermediate_size: int  # SiLU-gated MLP width F
    num_layers: int  # decoder blocks
    num_heads: int  # query heads H
    num_kv_heads: int  # key/value heads (GQA); divides num_heads
    head_dim: int  # per-head width
    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3 (what to_hf writes)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: RopeScaling | None = None  # llama3 frequency scaling, or None
    max_position_embeddings: int = 4096  # recorded in config.json; not enforced
    tie_word_embeddings: bool = False  # unembedding shares the embedding matrix
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2; HF attention_bias)
    o_bias: bool = False  # bias on the output projection (HF attention_bias for Llama/Qwen3)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    initializer_range: float = 0.02  # std of the normal init of matrices
    bos_token_id: int | None = None  # recorded for tokenizers / generation
    eos_token_id: int | tuple[int, ...] | None = None  # generation stops on any of these
    pad_token_id: int | None = None  # recorded in config.json
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (any spelling, see canonical_dtype)
    param_dtype: str = "float32"  # storage dtype of parameters: float32 | bfloat16
    remat: str = "none"  # per-block rematerialisation: none | block (save matmuls) | full
    # Packed-batch attention: blockwise (flash-style, pure JAX, O(S * block) memory) | dense
    # (reference: [B, S, S] mask, fp32 scores) | pallas (fused kernel; GPU/TPU, CPU interpret)
    # | dot_product (jax.nn on the dense mask).
    attention: str = "blockwise"
    attention_block: int = 512  # blockwise query/key block length (clipped to S)
    pallas_block: int = 128  # pallas query/key block length (clipped to S)
    lora: Lora | None = None  # LoRA adapters on the projections (jaxpo.models.lora), or None
    # lm: next-token logits (a causal LM) | reward: a scalar head `score` [D, 1] instead of the
    # unembedding (a reward model; HF's *ForSequenceClassification with num_labels=1)
    head: str = "lm"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        _check_choice("model_type", self.model_type, tuple(_ARCHITECTURES))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, "ModelConfig.dtype"))
        object.__setattr__(self, "param_dtype",
                           canonical_dtype(self.param_dtype, "ModelConfig.param_dtype"))
        _check_choice("remat", self.remat, _REMAT)
        _check_choice("attention", self.attention, _ATTENTION)
        _check_choice("head", self.head, _HEADS)
        for name in ("attention_block", "pallas_block"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be > 0, got {getattr(self, name)}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", Lora(**self.lora))

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """The end-of-sequence ids as a tuple (empty when none is set)."""
        if self.eos_token_id is None:
            return ()
        return self.eos_token_id if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    def replace(self, **changes: Any) -> ModelConfig:
        """Returns a copy with ``changes``; unknown field names are an error."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Number of parameters (counting a tied embedding once)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        h, kv = self.num_heads, self.num_kv_heads
        attn = d * hd * (2 * h + 2 * kv) + (h + 2 * kv) * hd * self.qkv_bias
        attn += d * self.o_bias + 2 * hd * self.qk_norm
        block = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings or self.head == "reward"
                                     else 2)
        emb += d * (self.head == "reward")  # the scalar head
        return self.num_layers * block + emb + d

    @classmethod
    def from_hf(cls, hf: dict[str, Any], *, source: str = "config.json",
                **overrides: Any) -> ModelConfig:
        """Builds a config from a Hugging Face ``config.json`` dict.

        Args:
          hf: the parsed ``config.json``.
          source: file name used in error messages.
          **overrides: ModelConfig fields to set (``dtype``, ``remat``, ...).

        Returns:
          The config. Unsupported architectures or options raise ``ValueError`` naming the field.
        """
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{source}: field '{field}' = {hf.get(field)!r}: {why}")

        model_type = hf.get("model_type")
        if model_type not in _ARCHITECTURES:
            raise bad("model_type", f"unsupported; jaxpo supports {sorted(_ARCHITECTURES)}")
        archs = hf.get("architectures") or [_ARCHITECTURES[model_type]]
        heads = {_ARCHITECTURES[model_type]: "lm", _reward_architecture(model_type): "reward"}
        if len(archs) != 1 or archs[0] not in heads:
            raise bad("architectures", f"expected {[[a] for a in heads]}")
        head = heads[archs[0]]
        # transformers: num_labels, else len(id2label), else 2
        labels = hf.get("num_labels", len(hf.get("id2label") or {"0": "", "1": ""}))
        if head == "reward" and labels != 1:
            raise bad("num_labels", f"{labels} labels; a reward model has one (a scalar score)")
        if hf.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", "only 'silu' is supported")
        if hf.get("mlp_bias", False):
            raise bad("mlp_bias", "MLP biases are not supported")
        if hf.get("pretraining_tp", 1) != 1:
            raise bad("pretraining_tp", "only 1 is supported")
        sliding = hf.get("sliding_window")
        if model_type == "mistral" and sliding is not None:
            raise bad("sliding_window", "sliding-window attention is not supported; use null")
        if hf.get("use_sliding_window", False):
            raise bad("use_sliding_window", "sliding-window attention is not supported")
        layer_types = hf.get("layer_types")
        if layer_types is not None and any(t != "full_attention" for t in layer_types):
            raise bad("layer_types", "only 'full_attention' layers are supported")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads"):
            if field not in hf:
                raise ValueError(f"{source}: required field '{field}' is missing")

        rope_theta, rope_scaling = _rope_from_hf(hf, bad)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        # Llama and Qwen3 have one attention_bias flag; Qwen2 always has q/k/v bias; Mistral none.
        bias = bool(hf.get("attention_bias", False)) and model_type in ("llama", "qwen3")
        eos = hf.get("eos_token_id")
        fields = {
            "vocab_size": hf["vocab_size"],
            "hidden_size": hf["hidden_size"],
            "intermediate_size": hf["intermediate_size"],
            "num_layers": hf["num_hidden_layers"],
            "num_heads": heads,
            "num_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": head_dim,
            "model_type": model_type,
            "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "rope_theta": rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": hf.get("max_position_embeddings", 4096),
            "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "qkv_bias": True if model_type == "qwen2" else bias,
            "o_bias": False if model_type == "qwen2" else bias,
            "qk_norm": model_type == "qwen3",
            "initializer_range": float(hf.get("initializer_range", 0.02)),
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
            "pad_token_id": hf.get("pad_token_id"),
            "head": head,
        }
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this model (transformers loads it)."""
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("qwen2 requires qkv_bias=True and o_bias=False")
        if self.model_type == "mistral" and (self.qkv_bias or self.o_bias):
            raise ValueError("mistral has no attention biases")
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(f"{self.model_type} has one attention_bias flag: qkv_bias and "
                             "o_bias must be equal")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError("qk_norm is exactly the qwen3 model_type")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling)}
        out = {
            "architectures": [_ARCHITECTURES[self.model_type] if self.head == "lm"
                              else _reward_architecture(self.model_type)],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            out["mlp_bias"] = False
        if self.model_type in ("mistral", "qwen2", "qwen3"):
            out["sliding_window"] = None
        if self.model_type in ("qwen2", "qwen3"):
            out["use_sliding_window"] = False
        if self.head == "reward":  # one scalar: transformers' num_labels=1 regression head
            out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return out


def _reward_architecture(model_type: str) -> str:
    """``LlamaForSequenceClassification`` for ``llama``: the HF class of a reward model."""
    return _ARCHITECTURES[model_type].replace("ForCausalLM", "ForSequenceClassification")


def canonical_dtype(dtype: Any, field: str = "dtype") -> str:
    """``"float32"`` or ``"bfloat16"`` for any spelling of them.

    Accepts ``jnp.float32``, ``np.dtype("float32")``, ``ml_dtypes.bfloat16``, ``"float32"``,
    ``"bfloat16"``, ``"fp32"``, ``"f32"``, ``"bf16"``; anything else is a ``ValueError`` naming
    ``field``.

    >>> canonical_dtype(jnp.bfloat16), canonical_dtype("fp32")
    ('bfloat16', 'float32')
    """
    name = None
    if isinstance(dtype, str):
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    elif dtype is not None:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            pass
    if name not in _DTYPES:
        raise ValueError(f"{field}={dtype!r} is not supported; use float32 or bfloat16 "
                         "(jnp.float32, 'fp32', 'f32', jnp.bfloat16, 'bf16')")
    return name


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ModelConfig.{field}={value!r} is not one of {list(choices)}")


def _rope_from_hf(hf: dict[str, Any], bad) -> tuple[float, RopeScaling | None]:
    """Reads RoPE settings from either ``rope_parameters`` or ``rope_theta``/``rope_scaling``."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = dict(hf.get(field) or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise bad(field, f"rope_type '{rope_type}' is not supported; use 'default' or 'llama3'")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                           "original_max_position_embeddings") if k not in params]
    if missing:
        raise bad(field, f"llama3 rope scaling needs {missing}")
    return theta, RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


_TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 192, "num_layers": 2, "num_heads": 4,
             "num_kv_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "tie_word_embeddings": True}

_PRESETS: dict[str, dict[str, Any]] = {
    # Trains on a 2-core CPU in a minute or two; pass vocab_size= the tokenizer's size.
    "tiny": dict(_TINY),
    "tiny-qwen2": dict(_TINY, model_type="qwen2", qkv_bias=True, rope_theta=1e6),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", qk_norm=True, tie_word_embeddings=False,
                       rope_theta=1e6),
    "llama3-8b": {
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_layers": 32,
        "num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 8192), "max_position_embeddings": 131072,
        "bos_token_id": 128000, "eos_token_id": (128001, 128008, 128009), "param_dtype": "bfloat16",
        "dtype": "bfloat16"},
    "qwen2-7b": {
        "model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
        "num_layers": 28, "num_heads": 28, "num_kv_heads": 4, "head_dim": 128, "qkv_bias": True,
        "rope_theta": 1e6, "max_position_embeddings": 32768, "eos_token_id": 151643,
        "param_dtype": "bfloat16", "dtype": "bfloat16"},
}


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return sorted(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named config, with ``overrides`` (ModelConfig fields) applied.

    >>> get_preset("tiny", vocab_size=100).vocab_size
    100
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {preset_names()}")
    return ModelConfig(**_PRESETS[name]).replace(**overrides)
