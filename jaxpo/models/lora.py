"""LoRA adapters: low-rank updates of the decoder's projections, merged or PEFT export.

A targeted projection ``y = x·W`` becomes ``y = x·W + (α/r)·(x·A)·B`` (Hu et al., 2021,
"LoRA: Low-Rank Adaptation of Large Language Models"): ``A`` ``[in..., r]`` starts random and
``B`` ``[r, out...]`` at zero, so an adapted model starts as its base model exactly. ``W`` is
never merged inside the model: the low-rank product is added to the projection's output, so
training holds one copy of the base weights and computes gradients only for ``A`` and ``B``.

The adapters are :class:`flax.nnx.LoRAParam` variables (a subclass of ``nnx.Param``) in
:class:`Adapter` modules beside their projection (``layers.attn.q_lora.a``), stacked on the
layer axis like every layer parameter: ``a`` ``[L, in..., r]`` with ``in`` named as the
projection's input axes (sharded like ``W``'s), ``b`` ``[L, r, out...]`` with ``out`` named as
its output axes; the rank axis (``lora_rank``) has no sharding rule, so it is replicated.
:func:`split` separates them from the base parameters, :func:`combine` puts them back.

Export: :func:`merged` gives the base parameters with ``W + (α/r)·A·B`` (what
:func:`jaxpo.models.export_hf` writes for an adapted model); :func:`export_peft` writes the
adapters as a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

>>> spec = Lora(rank=4, alpha=8.0, targets=("q", "v"))
>>> spec.scale, spec.hf_modules
(2.0, ('q_proj', 'v_proj'))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

RANK = "lora_rank"  # logical name of the adapters' rank axis (no rule: replicated)
# jaxpo's projection names and the Hugging Face modules they are (PEFT's target_modules).
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}
TARGETS = tuple(HF_MODULES)
_BLOCK = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp",
          "down": "mlp"}


@dataclasses.dataclass(frozen=True)
class Lora:
    """Which projections carry adapters, of which rank and scale."""

    rank: int  # r, the adapters' inner width
    alpha: float  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = TARGETS  # projections adapted, from TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"Lora.rank must be > 0, got {self.rank}")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"Lora.targets={list(self.targets)}: choose from {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def hf_modules(self) -> tuple[str, ...]:
        """PEFT's ``target_modules``: the Hugging Face module names of the targets."""
        return tuple(HF_MODULES[t].split(".")[1] for t in self.targets)


class Adapter(nnx.Module):
    """The low-rank update ``(α/r)·(x·A)·B`` of one projection.

    Args:
      in_shape, in_names: the projection's input axes (contracted with ``x``'s last axes).
      out_shape, out_names: its output axes.
      lora: the rank and scale.
      param_dtype: storage dtype of ``A`` and ``B``.
      rngs: ``A`` is drawn from the ``lora`` stream when there is one (so adding adapters does
        not change the base weights a seed gives), else from ``params``.
    """

    def __init__(self, in_shape: tuple[int, ...], in_names: tuple[str, ...],
                 out_shape: tuple[int, ...], out_names: tuple[str, ...], lora: Lora,
                 param_dtype: Any, *, rngs: nnx.Rngs):
        key = rngs.lora() if "lora" in rngs else rngs.params()
        # A ~ N(0, 1/fan_in): x·A has the scale of x's entries, whatever the input width.
        a = jax.random.normal(key, (*in_shape, lora.rank), jnp.float32)
        a = a / math.sqrt(math.prod(in_shape))
        self.a = nnx.LoRAParam(a.astype(param_dtype), out_sharding=(*in_names, RANK),
                               eager_sharding=False)
        self.b = nnx.LoRAParam(jnp.zeros((lora.rank, *out_shape), param_dtype),
                               out_sharding=(RANK, *out_names), eager_sharding=False)
        self.scale = lora.scale
        self.num_in = len(in_shape)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` ``[..., in...]`` -> the update ``[..., out...]`` in ``x.dtype``."""
        a, b = self.a[...].astype(x.dtype), self.b[...].astype(x.dtype)
        return _update(x, a, b, jnp.asarray(self.scale, x.dtype), self.num_in)


def _update(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, num_in: int
            ) -> jax.Array:
    """``(α/r)·(x·A)·B`` of ``x`` ``[B, T, in...]``: ``[B, T, out...]``."""
    xa = jnp.tensordot(x, a, axes=num_in) * scale  # [B, T, r]
    # B's product as a matmul batched over x's leading axis (B broadcast, [B, r, out]): the
    # block remat policy saves only matmuls without batch axes, so this [B, T, out] update,
    # as wide as the projection's own output (which is saved), is recomputed from the thin
    # x·A in the backward pass instead of being saved beside it.
    flat = jnp.broadcast_to(b.reshape(b.shape[0], -1), (xa.shape[0], b.shape[0], b[0].size))
    out = jnp.einsum("btr,bro->bto", xa, flat)  # [B, T, out]
    return out.reshape(*xa.shape[:-1], *b.shape[1:])


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """``(base, adapters)`` of an adapted model's params."""
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    return base, adapters


def combine(base: Any, adapters: Any) -> nnx.State:
    """The adapted model's params from the base params and the adapters."""
    return nnx.merge_state(base, adapters)


def _adapter_paths(lora: Lora) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """``(weight path, adapter path)`` of each target."""
    return [(("layers", _BLOCK[t], t), ("layers", _BLOCK[t], f"{t}_lora")) for t in lora.targets]


def merged(params: nnx.State, lora: Lora) -> nnx.State:
    """The base params with every adapter folded in, ``W + (α/r)·A·B`` (in fp32, cast back to
    ``W``'s dtype): the parameters of the base model that computes what the adapted one does.
    """
    flat = dict(nnx.to_flat_state(params))
    out = {p: v for p, v in flat.items() if not any(str(k).endswith("_lora") for k in p)}
    for weight, adapter in _adapter_paths(lora):
        a = flat[(*adapter, "a")].get_value().astype(jnp.float32)  # [L, in..., r]
        b = flat[(*adapter, "b")].get_value().astype(jnp.float32)  # [L, r, out...]
        delta = jax.vmap(lambda a, b: jnp.tensordot(a, b, axes=1))(a, b)  # [L, in..., out...]
        w = out[weight].get_value()
        out[weight] = out[weight].replace(
            (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype))
    return nnx.from_flat_state(out)


def peft_tensors(params: nnx.State, lora: Lora) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names and layout: per layer ``i`` and target,
    ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and
    ``...lora_B.weight`` ``[out, r]`` (HF's ``nn.Linear`` layout: ``y = x·Aᵀ·Bᵀ``; jaxpo's
    head axes flatten in HF's order, head-major)."""
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(params)}
    out = {}
    for target, (_, adapter) in zip(lora.targets, _adapter_paths(lora)):
        a = np.asarray(flat[(*adapter, "a")])  # [L, in..., r]
        b = np.asarray(flat[(*adapter, "b")])  # [L, r, out...]
        a = a.reshape(a.shape[0], -1, lora.rank)  # [L, in, r]
        b = b.reshape(b.shape[0], lora.rank, -1)  # [L, r, out]
        for i in range(a.shape[0]):
            name = f"base_model.model.model.layers.{i}.{HF_MODULES[target]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return out


def peft_config(lora: Lora, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for ``lora`` (a plain LoRA: no dropout, no bias, no
    rsLoRA, no DoRA)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
        "lora_alpha": lora.alpha, "target_modules": sorted(lora.hf_modules),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def export_peft(model: nnx.Module, path: str, *, base_model_name_or_path: str | None = None,
                dtype: Any = None) -> list[str]:
    """Writes the adapters of an adapted :class:`~jaxpo.models.Transformer` as a PEFT LoRA
    adapter directory (``PeftModel.from_pretrained(base, path)`` loads it).

    Args:
      model: the adapted model (``model.config.lora`` set).
      path: output directory (created).
      base_model_name_or_path: what ``adapter_config.json`` names as the base model.
      dtype: tensor dtype in the file; default the adapters' dtype.

    Returns:
      The files written: ``adapter_config.json``, ``adapter_model.safetensors``.
    """
    lora = model.config.lora
    tensors = peft_tensors(nnx.state(model, nnx.LoRAParam), lora)
    if dtype is not None:
        tensors = {k: v.astype(jnp.dtype(dtype)) for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(peft_config(lora, base_model_name_or_path), f, indent=2, sort_keys=True)
    # PEFT (and transformers) write format "pt" in the header metadata.
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    return ["adapter_config.json", "adapter_model.safetensors"]
