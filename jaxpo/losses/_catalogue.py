"""The catalogue: every registered objective and the adapter from LossInputs to its loss.

Each adapter picks the ``[NG, K]`` arrays its loss needs out of a :class:`LossInputs` (pairwise
losses take response 0 as chosen, 1 as rejected) and returns per-group losses ``[NG]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpo.losses import (
    _auxiliary,
    _listwise,
    _pairwise,
    _reference_free,
    _reward,
    _token,
    _tree,
    _unpaired,
)
from jaxpo.losses._registry import (
    LossInputs,
    _pair_valid,
    _register,
    best_index,
    take,
    worst_index,
)

# ----------------------------------------------------------------------------- adapters


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
    if objective == "bco" and inputs.reward_mean is not None:
        hparams["delta"] = inputs.reward_mean  # the trainer's running mean of the rewards
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


def _reward_fn(inputs: LossInputs, *, margin: float,
               center_rewards_coefficient: float) -> jax.Array:
    """A reward model's loss: Bradley–Terry (with ``margin`` plus each pair's own
    ``inputs.reward_margin``) on the best- and worst-labelled of two responses, Plackett–Luce
    on the label ranking of longer lists and tree leaves; both with the centering term."""
    inputs.require("bradley_terry", "rewards")
    real = _real(inputs)  # [NG, K]
    rewards = _clean(inputs, inputs.rewards)
    center = center_rewards_coefficient
    if rewards.shape[-1] != 2:
        if not isinstance(margin, jax.Array) and margin != 0.0:
            raise ValueError(f"bradley_terry: margin={margin!r} applies to pairs; these groups "
                             f"hold K={rewards.shape[-1]} responses (Plackett-Luce, no margin)")
        out = _reward.plackett_luce(rewards, inputs.scores, where=real,
                                    center_rewards_coefficient=center)
        return jnp.where(inputs.group_mask, out, 0.0)
    if inputs.reward_margin is not None:
        margin = margin + inputs.reward_margin  # [NG]
    best, worst = best_index(inputs.scores, real), worst_index(inputs.scores, real)  # [NG]
    valid = inputs.group_mask & jnp.all(real, axis=-1) & (
        take(inputs.scores, best) > take(inputs.scores, worst))  # tied labels: no preference
    out = _reward.bradley_terry(take(rewards, best), take(rewards, worst), margin=margin,
                                center_rewards_coefficient=center)
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
    # One step per response (pairs, lists): no step similarity, so TPO is LiPO-λ on β·r.
    similarity = inputs.step_similarity if policy.shape[-1] > 1 else None
    out = _tree.tpo(policy, reference, inputs.scores, step_where=steps,
                    where=_real(inputs), step_similarity=similarity, **hparams)
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
    real = inputs.response_mask & inputs.group_mask[:, None]  # [NG, K]
    # A lone response (unpaired data) is imitated only when it is desirable (score > 0).
    lone_undesirable = (jnp.sum(real, axis=-1) == 1) & (take(inputs.scores, best) <= 0)
    return jnp.where(jnp.any(real, axis=-1) & ~lone_undesirable, out, 0.0)


# ----------------------------------------------------------------------------- the catalogue

_p = functools.partial
_LIST_KINDS = ("pair", "list", "tree")
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
              paper=_paper, logps="mean" if _extra.get("mean") else "sum",
              needs=_extra.get("extra", ()) + (("reward_mean",) if _name == "bco" else ()))

_TOKEN_NEEDS = ("policy_token_logps", "reference_token_logps", "token_kl", "token_mask")
_register("tdpo", _p(_token_fn, _token.tdpo, "tdpo", weights=False), needs_reference=True,
          kinds=("pair",), level="token", needs=_TOKEN_NEEDS, hyperparameters={"beta": 0.1, "alpha": 0.5, "variant": 2},
          formula="TDPO2: −log σ(βh − αβ(SeqKL_l − sg(SeqKL_w))); TDPO1: α = 1, no sg",
          paper="Zeng et al. 2024 (TDPO)")
_register("sparse_po", _p(_token_fn, _token.sparse_po, "sparse_po", weights=True),
          needs_reference=True, kinds=("pair",), level="token", needs=_TOKEN_NEEDS,
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

_register("kto", _kto_fn, needs_reference=True, kinds=("unpaired", "pair"), needs=("kto_kl",),
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
              kinds=_LIST_KINDS, hyperparameters=_h, formula=_formula, paper=_paper,
              labels="raw" if _name == "infonca" else "minmax")

_register("pro", _pro_fn, needs_reference=False, kinds=_LIST_KINDS, logps="mean", labels="raw",
          hyperparameters={"sft_weight": 0.05},
          formula="Σ_k [logsumexp_{i≥k}(s_i T_k^i) − s_k T_k^k] + sft_weight·NLL(best)",
          paper="Song et al. 2023 (PRO)")
_register("tpo", _tpo_fn, needs_reference=True, kinds=_LIST_KINDS, hyperparameters={"beta": 0.1},
          needs=("policy_step_logps", "reference_step_logps", "step_similarity"),
          formula="Σ_{ψ_i>ψ_j} λ_ij log(1 + e^{−d_ij}), d_ij = Σ_m (1 − S_ij,m)(ρ_i,m − ρ_j,m)",
          paper="Liao et al. 2025 (TPO), arXiv 2410.12854")
_register("bradley_terry", _reward_fn, needs_reference=False, kinds=_LIST_KINDS, logps="reward",
          needs=("rewards",), hyperparameters={"margin": 0.0, "center_rewards_coefficient": 0.0},
          formula="pairs: −log σ(r_c − r_r − m − m_pair) + c(r_c + r_r)²; lists and tree "
                  "leaves: −Σ_k log(e^{r_τ(k)} / Σ_{j≥k} e^{r_τ(j)}) + c(Σ_k r_k)² "
                  "(Plackett–Luce)",
          paper="Bradley & Terry 1952; Ouyang et al. 2022; Touvron et al. 2023 (margin); "
                "Zhu et al. 2023 (K-wise)")
_register("sft", _sft_fn, needs_reference=False, kinds=("pair", "list", "tree", "unpaired"),
          hyperparameters={}, labels="",
          formula="−ℓ(y_best)/|y_best|", paper="DPO + SFT = RPO (Pang et al. 2024)")
