"""The Llama-family decoder (Flax NNX), its layers stacked and run with ``jax.lax.scan``.

The decoder blocks are one :class:`Block` whose parameters carry a leading layer axis ``[L, ...]``
(logical name ``layers``, replicated by every sharding preset); :meth:`Transformer.hidden` and
:meth:`Transformer.decode` scan over it, so a model traces and compiles one block whatever its
depth, and ``remat`` is applied to the scan body, once per layer.

>>> from flax import nnx
>>> from jaxpo.models.config import get_preset
>>> model = Transformer(get_preset("tiny", vocab_size=64, num_layers=1), rngs=nnx.Rngs(0))
>>> tokens = jnp.zeros((2, 5), jnp.int32)
>>> nnx.eval_shape(lambda m, t: m(t), model, tokens).shape  # model(tokens) without computing
(2, 5, 64)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpo.models.attention import Attention, Cache, RMSNorm, TreeLayout, param, tree_mask
from jaxpo.models.config import ModelConfig
from jaxpo.models.lora import Adapter
from jaxpo.sharding.logical import constrain

_ACTIVATION = ("batch", "length", "embed")
LAYERS = "layers"  # logical name of the stacked layer axis

# Per-block rematerialisation: "block" keeps the projection outputs and recomputes the rest
# (norms, RoPE, softmax, SiLU); "full" keeps only each block's input.
_REMAT_POLICIES = {
    "block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class MLP(nnx.Module):
    """SiLU-gated MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.up = param(rngs, (d, f), ("embed", "mlp"), cfg)
        self.down = param(rngs, (f, d), ("mlp", "embed"), cfg)
        if cfg.lora is not None:  # low-rank updates of the targeted projections
            shapes = {"gate": (d, "embed", f, "mlp"), "up": (d, "embed", f, "mlp"),
                      "down": (f, "mlp", d, "embed")}
            for name, (n_in, in_name, n_out, out_name) in shapes.items():
                if name in cfg.lora.targets:
                    setattr(self, f"{name}_lora", Adapter((n_in,), (in_name,), (n_out,),
                                                          (out_name,), cfg.lora,
                                                          cfg.param_dtype, rngs=rngs))

    def _project(self, name: str, x: jax.Array) -> jax.Array:
        y = x @ getattr(self, name)[...].astype(x.dtype)
        adapter = getattr(self, f"{name}_lora", None)
        return y if adapter is None else y + adapter(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = self._project("gate", x)  # [B, T, F]
        up = self._project("up", x)
        return self._project("down", jax.nn.silu(gate) * up)  # [B, T, D]


class Block(nnx.Module):
    """Pre-norm decoder block: attention then MLP, each with a residual."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array | TreeLayout,
                 cache: Cache | None = None, cache_index: jax.Array | None = None,
                 ) -> tuple[jax.Array, Cache | None]:
        h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index)
        x = constrain(x + h, _ACTIVATION)
        x = constrain(x + self.mlp(self.mlp_norm(x)), _ACTIVATION)
        return x, cache


def stack_blocks(blocks: list[Block]) -> Block:
    """One :class:`Block` whose parameters are those of ``blocks`` stacked on a leading
    ``layers`` axis ``[L, ...]`` (the logical name is prepended to each parameter's names)."""
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.split(block)[1] for block in blocks[1:]]
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *states)
    for _, var in nnx.to_flat_state(stacked):
        var.set_metadata(out_sharding=(LAYERS, *var.get_metadata()["out_sharding"]))
    return nnx.merge(graphdef, stacked)


class Transformer(nnx.Module):
    """Decoder-only transformer of the Llama family, configured by a :class:`ModelConfig`.

    Parameters (logical axes in brackets): ``embed`` ``[V, D]`` (vocab, embed); the blocks,
    stacked on a leading ``L`` axis (``layers``): ``layers.attn.q`` ``[L, D, H, hd]``,
    ``layers.attn.k``/``layers.attn.v`` ``[L, D, K, hd]``, ``layers.attn.o`` ``[L, H, hd, D]``,
    ``layers.mlp.gate``/``layers.mlp.up`` ``[L, D, F]``, ``layers.mlp.down`` ``[L, F, D]``,
    ``layers.attn_norm.scale``/``layers.mlp_norm.scale`` ``[L, D]`` (and the optional biases
    and q/k norms); ``norm.scale`` ``[D]``; ``lm_head`` ``[V, D]`` when embeddings are untied;
    a reward model (``head="reward"``) has ``score`` ``[D, 1]`` (embed) and no ``lm_head``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        # Built block by block, drawing from `rngs` in the order the unstacked model did (a
        # seed gives the weights it always gave), then stacked. Init traces every block once;
        # the forward and backward passes trace one.
        self.layers = stack_blocks([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg)
        if cfg.head == "reward":  # a reward model: one scalar per position, no unembedding
            self.score = param(rngs, (cfg.hidden_size, 1), ("embed", None), cfg)
        elif not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                 cfg)

    def unembedding(self) -> jax.Array:
        """The output projection ``[V, D]`` in the compute dtype (the embedding when tied)."""
        if self.config.head != "lm":
            raise ValueError(f"a model with head={self.config.head!r} has no next-token "
                             "distribution (it is a reward model: see Transformer.reward)")
        table = self.embed if self.config.tie_word_embeddings else self.lm_head
        return table[...].astype(self.config.dtype)

    def reward(self, hidden: jax.Array) -> jax.Array:
        """A reward model's fp32 scalar output ``[...]`` at each hidden state ``[..., D]``
        (``head="reward"``); a response's reward is the value at its last token."""
        score = self.score[...].astype(hidden.dtype)[:, 0]  # [D]
        return jnp.einsum("...d,d->...", hidden, score, preferred_element_type=jnp.float32)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)  # [B, S, D]
        return constrain(x, _ACTIVATION)

    def hidden(self, tokens: jax.Array, positions: jax.Array, segment: jax.Array,
               node_pre: jax.Array, node_last: jax.Array) -> jax.Array:
        """Hidden states after the final norm for a packed batch.

        Args:
          tokens: int32 ``[B, S]``.
          positions: RoPE positions ``[B, S]`` (depth in the tree).
          segment: group slot ``[B, S]``, 1-based, 0 = padding.
          node_pre: preorder number of each token's node ``[B, S]``.
          node_last: largest preorder number in that node's subtree ``[B, S]``.

        Returns:
          ``[B, S, D]`` in the compute dtype; a token sees only itself and its ancestors.
          (Padding tokens, segment 0, are not meaningful: the attention paths differ there.)
        """
        mask = TreeLayout(segment, node_pre, node_last)  # blockwise / pallas: mask per block
        if self.config.attention in ("dense", "dot_product"):
            mask = tree_mask(*mask)  # [B, S, S], built once for all layers
        graphdef, stacked = nnx.split(self.layers)

        def layer(x, params, positions, mask):  # one block: [B, S, D] -> [B, S, D]
            return nnx.merge(graphdef, params)(x, positions, mask)[0]

        if self.config.remat != "none":  # per layer, inside the scan body
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[self.config.remat],
                                   prevent_cse=False)  # scan already keeps the body apart
        x, _ = jax.lax.scan(lambda x, params: (layer(x, params, positions, mask), None),
                            self._embed(tokens), stacked)
        return self.norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits ``[..., V]`` of hidden states ``[..., D]``."""
        return jnp.einsum("...d,vd->...v", hidden, self.unembedding(),
                          preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Causal logits: ``tokens`` int32 ``[B, T]`` -> fp32 ``[B, T, V]`` (positions 0..T-1)."""
        batch, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        ones, zeros = jnp.ones_like(tokens), jnp.zeros_like(tokens)
        return self.logits(self.hidden(tokens, positions, ones, zeros, zeros))

    def init_cache(self, batch: int, length: int) -> Cache:
        """An empty KV cache for every layer: ``(keys, values)``, ``[layers, B, L, K, hd]`` each."""
        cfg = self.config
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)

    def decode(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
               cache: Cache, cache_index: jax.Array) -> tuple[jax.Array, Cache]:
        """Runs ``tokens`` ``[B, T]`` against a KV cache (prefill or one decode step).

        Args:
          tokens: int32 ``[B, T]``, written to cache slots ``cache_index .. cache_index+T-1``.
          positions: RoPE positions ``[B, T]``.
          mask: bool ``[B, T, L]``, which cache slots each query sees (including its own).
          cache: from :meth:`init_cache` or a previous call.
          cache_index: scalar int32 slot of the first token.

        Returns:
          ``(fp32 logits [B, T, V], updated cache)``.
        """
        graphdef, stacked = nnx.split(self.layers)

        def layer(x, inputs):  # one block and its cache slice [B, L, K, hd]
            params, layer_cache = inputs
            return nnx.merge(graphdef, params)(x, positions, mask, layer_cache, cache_index)

        x, cache = jax.lax.scan(layer, self._embed(tokens), (stacked, cache))
        return self.logits(self.norm(x)), cache
