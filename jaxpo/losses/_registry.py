"""The objective registry: what each loss needs from the trainer, and a uniform way to call it.

The trainer builds one :class:`LossInputs` of per-group arrays (``NG`` groups of ``K``
responses) and calls an :class:`Objective`, which picks the arrays its loss function needs and
returns per-group losses ``[NG]`` (0 for padding groups)::

    objective = jaxpo.losses.get("dpo")                      # or "dpo + 0.2*sft"
    losses = objective(inputs, beta=0.2)                     # [NG]; overrides the defaults
    rpo = jaxpo.losses.combine({"dpo": 1.0, "sft": 0.2}, hparams={"dpo": {"beta": 0.2}})

Pair contract: pairwise objectives take response 0 as chosen and response 1 as rejected.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxpo.losses import (
    _auxiliary,
    _listwise,
    _modifiers,
    _pairwise,
    _reference_free,
    _token,
    _tree,
    _unpaired,
)

KINDS = ("pair", "list", "tree", "unpaired")
_ALL_KINDS = ("pair", "list", "tree")


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True, kw_only=True)
class LossInputs:
    """Per-group arrays the trainer hands to an :class:`Objective` (a pytree; None = absent).

    Attributes:
        policy_logps: summed policy log-probs of each response ``[NG, K]``.
        scores: ψ labels ``[NG, K]``, higher is better (pair ``[1, 0]``; unpaired ``[1]``
            desirable, ``[0]`` undesirable).
        num_tokens: response lengths in tokens ``[NG, K]``.
        response_mask: bool ``[NG, K]``, True for real responses.
        group_mask: bool ``[NG]``, True for real groups (padding groups get loss 0).
        reference_logps: summed reference log-probs ``[NG, K]``.
        policy_mean_logps: per-token-mean policy log-probs ``[NG, K]`` (derived from
            ``policy_logps / max(num_tokens, 1)`` when None).
        reference_mean_logps: per-token-mean reference log-probs ``[NG, K]`` (derived likewise).
        policy_step_logps: policy log-probs of each step (tree node) ``[NG, K, M]``.
        reference_step_logps: reference log-probs of each step ``[NG, K, M]``.
        step_mask: bool ``[NG, K, M]``, True for real steps.
        step_similarity: ``[NG, K, K, M]`` similarity of step m of responses i and j.
        policy_token_logps: policy token log-probs ``[NG, K, T]`` (token-level objectives).
        reference_token_logps: reference token log-probs ``[NG, K, T]``.
        token_kl: per-token ``KL(π_ref ‖ π_θ)`` ``[NG, K, T]``.
        token_mask: bool ``[NG, K, T]``, True for real response tokens.
        token_log_sum_sq_probs: ``log Σ_v π_θ(v|…)²`` per token ``[NG, K, T]`` (WPO).
        token_weights: SparsePO token weights ``[NG, K, T]`` (``token_mask`` when None).
        kto_kl: KTO's batch KL estimate z0, ``[]`` or ``[NG]``.
        margins: MODPO margin-model rewards ``[NG, K]``.
    """

    policy_logps: jax.Array
    scores: jax.Array
    num_tokens: jax.Array
    response_mask: jax.Array
    group_mask: jax.Array
    reference_logps: jax.Array | None = None
    policy_mean_logps: jax.Array | None = None
    reference_mean_logps: jax.Array | None = None
    policy_step_logps: jax.Array | None = None
    reference_step_logps: jax.Array | None = None
    step_mask: jax.Array | None = None
    step_similarity: jax.Array | None = None
    policy_token_logps: jax.Array | None = None
    reference_token_logps: jax.Array | None = None
    token_kl: jax.Array | None = None
    token_mask: jax.Array | None = None
    token_log_sum_sq_probs: jax.Array | None = None
    token_weights: jax.Array | None = None
    kto_kl: jax.Array | None = None
    margins: jax.Array | None = None

    def require(self, objective: str, *fields: str) -> None:
        """Raises ``ValueError`` naming the objective and field if any field is None."""
        for field in fields:
            if getattr(self, field) is None:
                raise ValueError(f"objective {objective!r} needs LossInputs.{field}; got None")

    def mean_logps(self) -> tuple[jax.Array, jax.Array | None]:
        """Per-token-mean ``(policy, reference)`` log-probs ``[NG, K]`` (reference may be None)."""
        length = jnp.maximum(jnp.asarray(self.num_tokens, jnp.float32), 1.0)
        policy = self.policy_mean_logps
        if policy is None:
            policy = self.policy_logps / length
        reference = self.reference_mean_logps
        if reference is None and self.reference_logps is not None:
            reference = self.reference_logps / length
        return policy, reference


def best_index(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Index ``[NG]`` of the best-labelled real response (the first on ties)."""
    return jnp.argmax(jnp.where(mask, scores, -jnp.inf), axis=-1)


def worst_index(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Index ``[NG]`` of the worst-labelled real response (the last on ties)."""
    k = scores.shape[-1]
    flipped = jnp.where(mask, scores, jnp.inf)[..., ::-1]
    return k - 1 - jnp.argmin(flipped, axis=-1)


def take(values: jax.Array, index: jax.Array) -> jax.Array:
    """``values[g, index[g]]`` ``[NG, ...]`` for ``values [NG, K, ...]``."""
    index = index.reshape(index.shape + (1,) * (values.ndim - 1))
    return jnp.take_along_axis(values, index, axis=1)[:, 0]


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: usable as a static arg
class Objective:
    """A registered loss and what the trainer must give it.

    Attributes:
        name: registry name (``"dpo"``) or a combination (``"dpo + 0.2*sft"``).
        needs_reference: whether reference log-probs must be provided.
        kinds: group kinds it trains on, a subset of ``pair``, ``list``, ``tree``, ``unpaired``.
        level: ``"sequence"`` (``[NG, K]`` arrays) or ``"token"`` (also ``[NG, K, T]``).
        logps: which response log-probs it reads: ``"sum"``, ``"mean"`` (per-token mean) or,
            for a combination of both, ``"both"``.
        hyperparameters: default keyword arguments of ``fn`` (for a combination: per
            component, ``{"dpo": {"beta": 0.1, ...}, "sft": {}}``).
        fn: ``fn(inputs: LossInputs, **hyperparameters) -> [NG]``.
        formula: the per-example loss, in words and symbols.
        paper: the reference.
        components: for a combination, ``((objective, weight), ...)``.
    """

    name: str
    needs_reference: bool
    kinds: tuple[str, ...]
    level: str
    logps: str
    hyperparameters: Mapping[str, Any]
    fn: Callable[..., jax.Array] = dataclasses.field(repr=False)
    formula: str = dataclasses.field(default="", repr=False)
    paper: str = dataclasses.field(default="", repr=False)
    components: tuple = dataclasses.field(default=(), repr=False)

    def __call__(self, inputs: LossInputs, **overrides: Any) -> jax.Array:
        """Per-group losses ``[NG]`` with the default hyperparameters updated by ``overrides``."""
        unknown = sorted(set(overrides) - set(self.hyperparameters))
        if unknown:
            raise TypeError(
                f"objective {self.name!r} has no hyperparameter(s) {unknown}; "
                f"known: {sorted(self.hyperparameters)}"
            )
        return self.fn(inputs, **{**self.hyperparameters, **overrides})


_REGISTRY: dict[str, Objective] = {}


def _register(name, fn, *, needs_reference, kinds, hyperparameters, formula, paper,
              level="sequence", logps="sum") -> None:
    _REGISTRY[name] = Objective(
        name=name, needs_reference=needs_reference, kinds=tuple(kinds), level=level,
        logps=logps, hyperparameters=dict(hyperparameters), fn=fn, formula=formula, paper=paper,
    )


def names() -> list[str]:
    """The registered objective names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> Objective:
    """Returns the :class:`Objective` registered as ``name``.

    ``name`` may also be a weighted sum such as ``"dpo + 0.2*sft"`` (see :func:`combine`).

    Raises:
        KeyError: for an unknown name; the message lists the known names.

    >>> get("dpo")
    Objective(name='dpo', needs_reference=True, kinds=('pair',), level='sequence', \
logps='sum', hyperparameters={'beta': 0.1, 'label_smoothing': 0.0})
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "+" in name or "*" in name:
        weights = {}
        for term in name.split("+"):
            match = re.fullmatch(r"\s*(?:([0-9.eE+-]+)\s*\*\s*)?([A-Za-z_]\w*)\s*", term)
            if match is None:
                raise KeyError(f"cannot parse objective term {term.strip()!r} in {name!r}")
            weights[match.group(2)] = float(match.group(1) or 1.0)
        return combine(weights)
    raise KeyError(f"unknown objective {name!r}; known objectives: {', '.join(_REGISTRY)}")


def combine(
    weights: Mapping[str, float], hparams: Mapping[str, Mapping[str, Any]] | None = None
) -> Objective:
    """A weighted sum of registered objectives, e.g. RPO = ``{"dpo": 1.0, "sft": 0.2}``.

    The result needs a reference if any component does, trains on the kinds all components
    share, is token-level if any component is, and its hyperparameters are nested per component
    (``obj(inputs, dpo={"beta": 0.2})`` overrides one value, keeping the other defaults).

    Args:
        weights: component name → weight.
        hparams: component name → hyperparameter overrides baked into the defaults.

    Returns:
        The combined :class:`Objective`.

    >>> rpo = combine({"dpo": 1.0, "sft": 0.2}, hparams={"dpo": {"beta": 0.2}})
    >>> rpo.name, rpo.hyperparameters["dpo"]["beta"], rpo.kinds
    ('dpo + 0.2*sft', 0.2, ('pair',))
    """
    hparams = dict(hparams or {})
    if not weights:
        raise ValueError("combine needs at least one objective")
    unknown = sorted(set(hparams) - set(weights))
    if unknown:
        raise ValueError(f"combine: hparams for {unknown} which are not among {list(weights)}")
    parts = tuple((get(name), float(w)) for name, w in weights.items())
    defaults = {}
    for obj, _ in parts:
        given = dict(hparams.get(obj.name, {}))
        bad = sorted(set(given) - set(obj.hyperparameters))
        if bad:
            raise ValueError(
                f"combine: {obj.name!r} has no hyperparameter(s) {bad}; "
                f"known: {sorted(obj.hyperparameters)}"
            )
        defaults[obj.name] = {**obj.hyperparameters, **given}
    kinds = tuple(k for k in KINDS if all(k in obj.kinds for obj, _ in parts))
    if not kinds:
        raise ValueError(f"combine: {list(weights)} share no group kind")
    logps = {obj.logps for obj, _ in parts}

    def fn(inputs: LossInputs, **per_component: Mapping[str, Any]) -> jax.Array:
        total = 0.0
        for obj, w in parts:
            total = total + w * obj.fn(inputs, **{**defaults[obj.name],
                                                  **per_component.get(obj.name, {})})
        return total

    return Objective(
        name=" + ".join(obj.name if w == 1.0 else f"{w:g}*{obj.name}" for obj, w in parts),
        needs_reference=any(obj.needs_reference for obj, _ in parts),
        kinds=kinds,
        level="token" if any(obj.level == "token" for obj, _ in parts) else "sequence",
        logps=logps.pop() if len(logps) == 1 else "both",
        hyperparameters=defaults,
        fn=fn,
        formula=" + ".join(f"{w:g}·[{obj.formula}]" for obj, w in parts),
        paper="; ".join(obj.paper for obj, _ in parts),
        components=parts,
    )


def with_wpo(objective: str | Objective) -> Objective:
    """WPO: a pairwise objective whose per-pair loss is multiplied by ``w(y_w)·w(y_l)``.

    The weights come from :func:`jaxpo.losses.wpo_weights` on ``policy_token_logps``,
    ``token_log_sum_sq_probs`` and ``token_mask`` (so the result is token-level).

    >>> with_wpo("dpo").name, with_wpo("dpo").level
    ('wpo(dpo)', 'token')
    """
    base = get(objective) if isinstance(objective, str) else objective

    def fn(inputs: LossInputs, **hparams: Any) -> jax.Array:
        _pair_valid(inputs, base.name)
        inputs.require(f"wpo({base.name})", "policy_token_logps", "token_log_sum_sq_probs",
                       "token_mask")
        weights = _modifiers.wpo_weights(inputs.policy_token_logps,
                                         inputs.token_log_sum_sq_probs,
                                         where=inputs.token_mask)  # [NG, 2]
        return weights[:, 0] * weights[:, 1] * base.fn(inputs, **hparams)

    return dataclasses.replace(base, name=f"wpo({base.name})", level="token", fn=fn,
                               formula=f"w(y_w)·w(y_l)·[{base.formula}]",
                               paper=f"{base.paper}; Zhou et al. 2024 (WPO)", components=())


def with_ld(objective: str | Objective, *, alpha: float = 0.5) -> Objective:
    """LD-DPO: a pairwise objective on length-desensitised summed log-probs.

    Policy and reference response log-probs are replaced by :func:`jaxpo.losses.ld_logps` of
    ``policy_token_logps`` / ``reference_token_logps`` under ``token_mask`` (the tail beyond the
    shorter response's length scaled by ``alpha``).

    >>> with_ld("dpo").name
    'ld(dpo)'
    """
    base = get(objective) if isinstance(objective, str) else objective
    if base.logps != "sum":
        raise ValueError(f"with_ld needs an objective on summed log-probs, {base.name!r} "
                         f"uses {base.logps!r}")

    def fn(inputs: LossInputs, **hparams: Any) -> jax.Array:
        _pair_valid(inputs, base.name)
        inputs.require(f"ld({base.name})", "policy_token_logps", "token_mask")
        mask = inputs.token_mask

        def desensitise(token_logps: jax.Array) -> jax.Array:
            chosen, rejected = _modifiers.ld_logps(token_logps[:, 0], token_logps[:, 1],
                                                   chosen_mask=mask[:, 0],
                                                   rejected_mask=mask[:, 1], alpha=alpha)
            return jnp.stack([chosen, rejected], axis=-1)  # [NG, 2]

        reference = inputs.reference_logps
        if base.needs_reference:
            inputs.require(f"ld({base.name})", "reference_token_logps")
            reference = desensitise(inputs.reference_token_logps)
        ld_inputs = dataclasses.replace(inputs, policy_logps=desensitise(
            inputs.policy_token_logps), reference_logps=reference)
        return base.fn(ld_inputs, **hparams)

    return dataclasses.replace(base, name=f"ld({base.name})", level="token", fn=fn,
                               paper=f"{base.paper}; Liu et al. 2024 (LD-DPO)", components=())


# ----------------------------------------------------------------------------- adapters


def _pair_valid(inputs: LossInputs, objective: str) -> jax.Array:
    """``[NG]``: a real group with both responses real; checks the pair contract K = 2."""
    k = inputs.policy_logps.shape[-1]
    if k != 2:
        raise ValueError(
            f"objective {objective!r} is pairwise: LossInputs.policy_logps must be [NG, 2] "
            f"(chosen first), got shape {inputs.policy_logps.shape}"
        )
    return inputs.group_mask & inputs.response_mask[:, 0] & inputs.response_mask[:, 1]


def _real(inputs: LossInputs) -> jax.Array:
    """``[NG, K]``: real responses of real groups."""
    return inputs.response_mask & inputs.group_mask[:, None]


def _clean(inputs: LossInputs, values: jax.Array) -> jax.Array:
    """``values [NG, K]`` with padding slots zeroed, so they reach no gradient (NaN included)."""
    return jnp.where(_real(inputs), values, jnp.zeros((), values.dtype))


def _pairwise_fn(loss, objective: str, inputs: LossInputs, *, mean: bool = False,
                 extra: tuple[str, ...] = (), **hparams) -> jax.Array:
    valid = _pair_valid(inputs, objective)
    inputs.require(objective, "reference_logps", *extra)
    policy, reference = inputs.mean_logps() if mean else (
        inputs.policy_logps, inputs.reference_logps)
    policy, reference = _clean(inputs, policy), _clean(inputs, reference)
    args = [policy[:, 0], policy[:, 1], reference[:, 0], reference[:, 1]]
    if "margins" in extra:
        args += [inputs.margins[:, 0], inputs.margins[:, 1]]
    return jnp.where(valid, loss(*args, **hparams), 0.0)  # [NG]


def _reference_free_fn(loss, objective: str, inputs: LossInputs, *, mean: bool,
                       with_nll: bool, **hparams) -> jax.Array:
    valid = _pair_valid(inputs, objective)
    policy_mean, _ = inputs.mean_logps()
    policy_mean = _clean(inputs, policy_mean)
    policy = policy_mean if mean else _clean(inputs, inputs.policy_logps)
    args = [policy[:, 0], policy[:, 1]]
    if with_nll:
        args.append(-policy_mean[:, 0])  # token-mean NLL of the chosen (gold) response
    return jnp.where(valid, loss(*args, **hparams), 0.0)


def _token_fn(loss, objective: str, inputs: LossInputs, *, weights: bool, **hparams):
    valid = _pair_valid(inputs, objective)
    inputs.require(objective, "policy_token_logps", "reference_token_logps", "token_kl",
                   "token_mask")
    pol, ref, kl, mask = (inputs.policy_token_logps, inputs.reference_token_logps,
                          inputs.token_kl, inputs.token_mask)  # [NG, 2, T]
    args = [pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], kl[:, 0], kl[:, 1]]
    if weights:
        w = inputs.token_weights
        w = mask.astype(pol.dtype) if w is None else w
        args += [w[:, 0], w[:, 1]]
    out = loss(*args, chosen_mask=mask[:, 0], rejected_mask=mask[:, 1], **hparams)
    return jnp.where(valid, out, 0.0)


def _listwise_fn(loss, inputs: LossInputs, **hparams) -> jax.Array:
    inputs.require(loss.__name__, "reference_logps")
    out = loss(inputs.policy_logps, inputs.reference_logps, inputs.scores,
               where=_real(inputs), **hparams)
    return jnp.where(inputs.group_mask, out, 0.0)


def _pro_fn(inputs: LossInputs, **hparams) -> jax.Array:
    policy_mean = _clean(inputs, inputs.mean_logps()[0])
    best = best_index(inputs.scores, inputs.response_mask)
    out = _listwise.pro(policy_mean, inputs.scores, -take(policy_mean, best),
                        where=_real(inputs), **hparams)
    return jnp.where(inputs.group_mask, out, 0.0)


def _tpo_fn(inputs: LossInputs, **hparams) -> jax.Array:
    inputs.require("tpo", "reference_logps")
    if inputs.policy_step_logps is None:  # a list: every response is a single step
        policy, reference, steps = inputs.policy_logps[..., None], inputs.reference_logps[
            ..., None], None
    else:
        inputs.require("tpo", "reference_step_logps")
        policy, reference, steps = (inputs.policy_step_logps, inputs.reference_step_logps,
                                    inputs.step_mask)
    out = _tree.tpo(policy, reference, inputs.scores, step_where=steps,
                    where=_real(inputs), step_similarity=inputs.step_similarity, **hparams)
    return jnp.where(inputs.group_mask, out, 0.0)


def _kto_fn(inputs: LossInputs, **hparams) -> jax.Array:
    inputs.require("kto", "reference_logps", "kto_kl")
    kl = jnp.asarray(inputs.kto_kl)
    kl = kl[:, None] if kl.ndim == 1 else kl  # [NG, 1] or []
    out = _unpaired.kto(_clean(inputs, inputs.policy_logps),
                        _clean(inputs, inputs.reference_logps), inputs.scores > 0, kl,
                        **hparams)  # [NG, K]
    mask = inputs.response_mask & inputs.group_mask[:, None]
    return jnp.sum(jnp.where(mask, out, 0.0), axis=-1)


def _sft_fn(inputs: LossInputs) -> jax.Array:
    best = best_index(inputs.scores, inputs.response_mask)
    out = _auxiliary.sft(take(_clean(inputs, inputs.policy_logps), best),
                         take(inputs.num_tokens, best))
    return jnp.where(inputs.group_mask & jnp.any(inputs.response_mask, axis=-1), out, 0.0)


# ----------------------------------------------------------------------------- the catalogue

_p = functools.partial
_PAIRWISE = [  # name, hyperparameters, formula, paper, extra (logps/fields)
    ("dpo", {"beta": 0.1, "label_smoothing": 0.0},
     "−(1−ε) log σ(βh) − ε log σ(−βh)", "Rafailov et al. 2023; cDPO (Mitchell 2023)", {}),
    ("robust_dpo", {"beta": 0.1, "epsilon": 0.1},
     "[−(1−ε) log σ(βh) + ε log σ(−βh)] / (1−2ε)", "Chowdhury et al. 2024 (rDPO)", {}),
    ("ipo", {"beta": 0.1}, "(h − 1/(2β))², per-token-mean log-probs", "Azar et al. 2023",
     {"mean": True}),
    ("hinge", {"beta": 0.1}, "max(0, 1 − βh)", "Zhao et al. 2023 (SLiC); Liu et al. 2024 (RSO)",
     {}),
    ("exo", {"beta": 0.1, "epsilon": 1e-3},
     "σ(βh)[log σ(βh) − log(1−ε)] + σ(−βh)[log σ(−βh) − log ε]", "Ji et al. 2024 (EXO)", {}),
    ("nca", {"beta": 0.1}, "−log σ(βr_w) − ½ log σ(−βr_w) − ½ log σ(−βr_l)",
     "Chen et al. 2024 (NCA)", {}),
    ("bco", {"beta": 0.1, "delta": 0.0}, "−log σ(βr_w − δ) − log σ(−(βr_l − δ))",
     "Jung et al. 2024 (BCO)", {}),
    ("sppo_hard", {"beta": 0.001}, "(r_w − 1/(2β))² + (r_l + 1/(2β))²",
     "Wu et al. 2024 (SPPO)", {}),
    ("apo_zero", {"beta": 0.1}, "(1 − σ(βr_w)) + σ(βr_l)", "D'Oosterlinck et al. 2024 (APO)",
     {}),
    ("apo_down", {"beta": 0.1}, "σ(βr_w) + (1 − σ(βh))", "D'Oosterlinck et al. 2024 (APO)", {}),
    ("dpop", {"beta": 0.1, "lambda_": 50.0}, "−log σ(β[h − λ·max(0, ℓ_ref(y_w) − ℓ(y_w))])",
     "Pal et al. 2024 (Smaug, DPOP)", {}),
    ("modpo", {"beta": 0.1, "weight": 1.0}, "−log σ((1/w)[βh − (1−w)(m_w − m_l)])",
     "Zhou et al. 2024 (MODPO)", {"extra": ("margins",)}),
]
for _name, _h, _formula, _paper, _extra in _PAIRWISE:
    _register(_name, _p(_pairwise_fn, getattr(_pairwise, _name), _name, **_extra),
              needs_reference=True, kinds=("pair",), hyperparameters=_h, formula=_formula,
              paper=_paper, logps="mean" if _extra.get("mean") else "sum")

_register("tdpo", _p(_token_fn, _token.tdpo, "tdpo", weights=False), needs_reference=True,
          kinds=("pair",), level="token", hyperparameters={"beta": 0.1, "alpha": 0.5, "variant": 2},
          formula="TDPO2: −log σ(βh − αβ(SeqKL_l − sg(SeqKL_w))); TDPO1: α = 1, no sg",
          paper="Zeng et al. 2024 (TDPO)")
_register("sparse_po", _p(_token_fn, _token.sparse_po, "sparse_po", weights=True),
          needs_reference=True, kinds=("pair",), level="token",
          hyperparameters={"beta": 0.1, "mask_l1": 0.001},
          formula="−log σ(β(u − d)) + λ‖m‖₁, u, d token-weighted rewards and KLs",
          paper="Christopoulou et al. 2024 (SparsePO)")

for _name, _h, _formula, _paper, _mean, _nll in [
    ("simpo", {"beta": 2.0, "gamma": 0.5}, "−log σ(β(ℓ̄_w − ℓ̄_l) − γ)", "Meng et al. 2024",
     True, False),
    ("orpo", {"alpha": 0.1},
     "NLL_w − α log σ((ℓ̄_w − ℓ̄_l) − [log(1−e^{ℓ̄_w}) − log(1−e^{ℓ̄_l})])",
     "Hong et al. 2024", True, True),
    ("cpo", {"beta": 0.1, "alpha": 1.0}, "−log σ(β(ℓ_w − ℓ_l)) + α·NLL_w", "Xu et al. 2024",
     False, True),
    ("triple_po", {"beta": 0.01, "alpha": 1.0}, "−log σ(β(ℓ_w − ℓ_l)) + α·NLL_gold",
     "Saeidi et al. 2024", False, True),
]:
    _register(_name, _p(_reference_free_fn, getattr(_reference_free, _name), _name, mean=_mean,
                        with_nll=_nll),
              needs_reference=False, kinds=("pair",), hyperparameters=_h, formula=_formula,
              paper=_paper, logps="mean" if _mean else "sum")

_register("kto", _kto_fn, needs_reference=True, kinds=("unpaired", "pair"),
          hyperparameters={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
          formula="desirable: λ_D(1 − σ(β(r − z0))); undesirable: λ_U(1 − σ(β(z0 − r)))",
          paper="Ethayarajh et al. 2024 (KTO)")

for _name, _h, _formula, _paper in [
    ("lipo_lambda", {"beta": 0.05},
     "Σ_{ψ_i>ψ_j} Δ_ij log(1 + e^{−(s_i−s_j)}), Δ_ij = |G_i−G_j|·|1/D(τ_i) − 1/D(τ_j)|",
     "Liu et al. 2024 (LiPO), Eq. 8"),
    ("pairwise_logistic", {"beta": 0.1}, "mean_{ψ_i>ψ_j} log(1 + e^{−(s_i−s_j)})",
     "Liu et al. 2024 (LiPO), Eq. 5"),
    ("list_mle", {"beta": 0.1}, "−Σ_k log(e^{s_τ(k)} / Σ_{j≥k} e^{s_τ(j)})",
     "Liu et al. 2024 (LiPO), Eq. 7"),
    ("listnet", {"beta": 0.1}, "−Σ_k (ψ_k/Σψ) log softmax(s)_k",
     "Liu et al. 2024 (LiPO), Eq. 11"),
    ("infonca", {"beta": 0.1, "alpha": 1.0}, "−Σ_i softmax(R/α)_i log softmax(βr)_i",
     "Chen et al. 2024 (NCA)"),
]:
    _register(_name, _p(_listwise_fn, getattr(_listwise, _name)), needs_reference=True,
              kinds=_ALL_KINDS, hyperparameters=_h, formula=_formula, paper=_paper)

_register("pro", _pro_fn, needs_reference=False, kinds=_ALL_KINDS, logps="mean",
          hyperparameters={"sft_weight": 0.05},
          formula="Σ_k [logsumexp_{i≥k}(s_i T_k^i) − s_k T_k^k] + sft_weight·NLL(best)",
          paper="Song et al. 2023 (PRO)")
_register("tpo", _tpo_fn, needs_reference=True, kinds=_ALL_KINDS, hyperparameters={"beta": 0.1},
          formula="Σ_{ψ_i>ψ_j} λ_ij log(1 + e^{−d_ij}), d_ij = Σ_m (1 − S_ij,m)(ρ_i,m − ρ_j,m)",
          paper="Liao et al. 2025 (TPO), arXiv 2410.12854")
_register("sft", _sft_fn, needs_reference=False, kinds=_ALL_KINDS, hyperparameters={},
          formula="−ℓ(y_best)/|y_best|", paper="DPO + SFT = RPO (Pang et al. 2024)")
