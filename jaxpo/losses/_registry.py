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

from jaxpo.losses import _modifiers

# Optional LossInputs fields an objective can ask the trainer for (``Objective.needs``); the
# trainer computes only what the objective needs.
NEEDS = ("reference_logps", "policy_step_logps", "reference_step_logps", "step_similarity",
         "policy_token_logps", "reference_token_logps", "token_kl", "token_mask",
         "token_log_sum_sq_probs", "kto_kl", "reward_mean", "margins", "rewards")
# The label mappings (scores → ψ) an objective can ask the data for (``Objective.labels``).
LABELS = ("minmax", "raw")


@functools.partial(jax.tree_util.register_dataclass)
@dataclasses.dataclass(frozen=True, kw_only=True)
class LossInputs:
    """Per-group arrays the trainer hands to an :class:`Objective` (a pytree; None = absent).

    Attributes:
        policy_logps: summed policy log-probs of each response ``[NG, K]`` (None for a reward
            model, which has no next-token distribution: see ``rewards``).
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
        reward_mean: BCO's running mean δ of the implicit rewards ``[]`` (kept by the trainer).
        margins: MODPO margin-model rewards ``[NG, K]``.
        rewards: a reward model's scalar output for each response ``[NG, K]`` (its head on
            the final hidden state at the response's last token).
        reward_margin: per-pair Bradley–Terry margin ``[NG]`` (a pair record's ``margin``
            field, 0 where it has none), added to ``bradley_terry``'s ``margin``.
    """

    policy_logps: jax.Array | None
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
    reward_mean: jax.Array | None = None
    margins: jax.Array | None = None
    rewards: jax.Array | None = None
    reward_margin: jax.Array | None = None

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
            for a combination of both, ``"both"``; ``"reward"`` for a reward-model objective,
            which reads the reward head's ``rewards`` and no log-probs.
        hyperparameters: default keyword arguments of ``fn`` (for a combination: per
            component, ``{"dpo": {"beta": 0.1, ...}, "sft": {}}``).
        fn: ``fn(inputs: LossInputs, **hyperparameters) -> [NG]``.
        formula: the per-example loss, in words and symbols.
        paper: the reference.
        components: for a combination, ``((objective, weight), ...)``.
        needs: the optional :class:`LossInputs` fields it reads (a subset of :data:`NEEDS`):
            the trainer computes these and nothing else (step arrays and the hidden-state step
            similarity for TPO, token arrays for token-level losses, KTO's reference point,
            BCO's running reward mean).
        labels: the label mapping (scores → ψ) of lists and trees its paper uses: ``minmax``
            or ``raw`` (raw rewards, e.g. PRO and InfoNCA); ``""`` when it reads no labels
            beyond best/worst.
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
    needs: frozenset = dataclasses.field(default=frozenset(), repr=False)
    labels: str = dataclasses.field(default="minmax", repr=False)

    def __post_init__(self):
        unknown = sorted(set(self.needs) - set(NEEDS))
        if unknown:
            raise ValueError(f"objective {self.name!r}: unknown needs {unknown}; known: {NEEDS}")
        if self.labels not in ("", *LABELS):
            raise ValueError(f"objective {self.name!r}: labels={self.labels!r}; choose from "
                             f"{LABELS}")

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
              level="sequence", logps="sum", needs=(), labels="minmax") -> None:
    needs = set(needs) | ({"reference_logps"} if needs_reference else set())
    _REGISTRY[name] = Objective(
        name=name, needs_reference=needs_reference, kinds=tuple(kinds), level=level,
        logps=logps, hyperparameters=dict(hyperparameters), fn=fn, formula=formula, paper=paper,
        needs=frozenset(needs), labels=labels,
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
    kinds = tuple(k for k in parts[0][0].kinds if all(k in obj.kinds for obj, _ in parts))
    if not kinds:
        raise ValueError(f"combine: {list(weights)} share no group kind")
    logps = {obj.logps for obj, _ in parts}
    labels = {obj.labels for obj, _ in parts} - {""}
    if len(labels) > 1:
        raise ValueError(f"combine: {list(weights)} want different label mappings {labels}")

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
        needs=frozenset().union(*(obj.needs for obj, _ in parts)),
        labels=labels.pop() if labels else "",
    )


def _pair_valid(inputs: LossInputs, objective: str) -> jax.Array:
    """``[NG]``: a real group with both responses real; checks the pair contract K = 2."""
    k = inputs.policy_logps.shape[-1]
    if k != 2:
        raise ValueError(
            f"objective {objective!r} is pairwise: LossInputs.policy_logps must be [NG, 2] "
            f"(chosen first), got shape {inputs.policy_logps.shape}"
        )
    return inputs.group_mask & inputs.response_mask[:, 0] & inputs.response_mask[:, 1]


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
                               paper=f"{base.paper}; Zhou et al. 2024 (WPO)", components=(),
                               kinds=("pair",), needs=base.needs | {
                                   "policy_token_logps", "token_log_sum_sq_probs",
                                   "token_mask"})


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

    token_needs = {"policy_token_logps", "token_mask"} | (
        {"reference_token_logps"} if base.needs_reference else set())
    return dataclasses.replace(base, name=f"ld({base.name})", level="token", fn=fn,
                               paper=f"{base.paper}; Liu et al. 2024 (LD-DPO)", components=(),
                               kinds=("pair",), needs=base.needs | token_needs)
