"""The objective registry: routing of LossInputs, combinations, errors, and docs/losses.md."""

import ast
import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpo.losses as L

LOSSES_MD_NAMES = [
    "dpo", "robust_dpo", "ipo", "hinge", "exo", "nca", "bco", "sppo_hard", "apo_zero",
    "apo_down", "dpop", "modpo", "tdpo", "sparse_po", "simpo", "orpo", "cpo", "triple_po", "kto",
    "lipo_lambda", "pairwise_logistic", "list_mle", "listnet", "pro", "infonca", "tpo", "sft",
]
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def np_softplus(x):
    return np.logaddexp(0.0, x)


def make_inputs(ng=3, k=2, t=4, m=2, seed=0, **extra):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(-20, 5, s).astype(np.float32)
    scores = np.tile(np.arange(k, 0, -1, dtype=np.float32) - 1, (ng, 1))  # best first
    fields = {
        "policy_logps": f(ng, k), "reference_logps": f(ng, k),
        "num_tokens": rng.integers(1, 9, (ng, k)).astype(np.int32), "scores": scores,
        "response_mask": np.ones((ng, k), bool),
        "group_mask": np.array([True] * (ng - 1) + [False]),
        "policy_step_logps": f(ng, k, m), "reference_step_logps": f(ng, k, m),
        "step_mask": np.ones((ng, k, m), bool),
        "policy_token_logps": f(ng, k, t) / 10, "reference_token_logps": f(ng, k, t) / 10,
        "token_kl": np.abs(f(ng, k, t)) / 100, "token_mask": np.ones((ng, k, t), bool),
        "token_log_sum_sq_probs": -np.abs(f(ng, k, t)) / 10, "kto_kl": np.float32(0.3),
        "margins": f(ng, k),
    }
    fields.update(extra)
    return L.LossInputs(**fields)


def test_every_losses_md_name_is_registered_and_importable():
    assert sorted(L.names()) == sorted(LOSSES_MD_NAMES)
    for name in LOSSES_MD_NAMES + ["wpo_weights", "ld_logps"]:
        assert callable(getattr(L, name))


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="lipo_lambda"):
        L.get("dpoo")


def test_repr_is_readable():
    text = repr(L.get("lipo_lambda"))
    assert text.startswith("Objective(name='lipo_lambda'") and "'beta': 0.05" in text
    assert "function" not in text


@pytest.mark.parametrize("name", LOSSES_MD_NAMES)
def test_every_objective_runs_under_jit_on_its_kind(name):
    obj = L.get(name)
    k = 2 if "pair" in obj.kinds else (1 if obj.kinds == ("unpaired",) else 3)
    inputs = make_inputs(k=k)
    if not obj.needs_reference:
        inputs = make_inputs(k=k, reference_logps=None)
    out = jax.jit(lambda i: obj(i))(inputs)
    assert out.shape == (3,) and np.all(np.isfinite(out))
    assert float(out[-1]) == 0.0  # the padding group


def test_dpo_routes_chosen_first_and_overrides():
    inputs = make_inputs()
    p, r = inputs.policy_logps, inputs.reference_logps
    want = np_softplus(-0.5 * ((p[:, 0] - r[:, 0]) - (p[:, 1] - r[:, 1])))
    np.testing.assert_allclose(L.get("dpo")(inputs, beta=0.5)[:2], want[:2], rtol=1e-5)
    with pytest.raises(TypeError, match="label_smoothing"):
        L.get("dpo")(inputs, gamma=1.0)


def test_mean_logps_objectives_receive_means():
    inputs = make_inputs()
    n = np.maximum(inputs.num_tokens, 1)
    pm, rm = inputs.policy_logps / n, inputs.reference_logps / n
    h = (pm[:, 0] - rm[:, 0]) - (pm[:, 1] - rm[:, 1])
    np.testing.assert_allclose(L.get("ipo")(inputs)[:2], ((h - 1 / 0.2) ** 2)[:2], rtol=1e-5)
    simpo = np_softplus(-(2.0 * (pm[:, 0] - pm[:, 1]) - 0.5))
    np.testing.assert_allclose(L.get("simpo")(inputs)[:2], simpo[:2], rtol=1e-5)


def test_rpo_is_dpo_plus_weighted_sft():
    inputs = make_inputs()
    rpo = L.combine({"dpo": 1.0, "sft": 0.2}, hparams={"dpo": {"beta": 0.2}})
    assert rpo.needs_reference and rpo.kinds == ("pair",) and rpo.level == "sequence"
    p, r = inputs.policy_logps, inputs.reference_logps
    dpo = np_softplus(-0.2 * ((p[:, 0] - r[:, 0]) - (p[:, 1] - r[:, 1])))
    sft = -p[:, 0] / inputs.num_tokens[:, 0]
    np.testing.assert_allclose(rpo(inputs)[:2], (dpo + 0.2 * sft)[:2], rtol=1e-5)
    parsed = L.get("dpo + 0.2*sft")
    assert parsed.name == "dpo + 0.2*sft"
    np.testing.assert_allclose(parsed(inputs, dpo={"beta": 0.2}), rpo(inputs), rtol=1e-6)


def test_combine_rejects_bad_requests():
    with pytest.raises(ValueError, match="at least one"):
        L.combine({})
    assert L.combine({"kto": 1.0, "listnet": 0.5}).kinds == ("pair",)  # the intersection
    with pytest.raises(ValueError, match="gamma"):
        L.combine({"dpo": 1.0}, hparams={"dpo": {"gamma": 1.0}})
    with pytest.raises(KeyError):
        L.combine({"nope": 1.0})


def test_clear_errors_for_wrong_shapes_and_missing_fields():
    with pytest.raises(ValueError, match=r"pairwise.*\[NG, 2\]"):
        L.get("dpo")(make_inputs(k=3))
    with pytest.raises(ValueError, match="kto_kl"):
        L.get("kto")(make_inputs(k=1, kto_kl=None))
    with pytest.raises(ValueError, match="token_kl"):
        L.get("tdpo")(make_inputs(token_kl=None))


def test_listwise_and_tree_routes():
    inputs = make_inputs(k=4, response_mask=np.array([[1, 1, 0, 1]] * 3, bool))
    want = L.lipo_lambda(inputs.policy_logps, inputs.reference_logps, inputs.scores,
                         where=inputs.response_mask)
    np.testing.assert_allclose(L.get("lipo_lambda")(inputs)[:2], want[:2], rtol=1e-6)
    flat = make_inputs(k=4, policy_step_logps=None, reference_step_logps=None, step_mask=None)
    np.testing.assert_allclose(L.get("tpo")(flat, beta=0.05), L.get("lipo_lambda")(flat),
                               rtol=1e-6)  # one step per response: TPO is LiPO-λ


def test_pro_uses_means_and_best_response_nll():
    inputs = make_inputs(k=3, reference_logps=None)
    mean = inputs.policy_logps / inputs.num_tokens
    want = L.pro(mean, inputs.scores, -mean[:, 0], sft_weight=0.05)
    np.testing.assert_allclose(L.get("pro")(inputs)[:2], want[:2], rtol=1e-6)


def test_kto_sums_desirable_and_undesirable_responses():
    inputs = make_inputs()
    r = inputs.policy_logps - inputs.reference_logps
    sig = lambda x: 1 / (1 + np.exp(-x))
    want = (1 - sig(0.1 * (r[:, 0] - 0.3))) + (1 - sig(0.1 * (0.3 - r[:, 1])))
    np.testing.assert_allclose(L.get("kto")(inputs)[:2], want[:2], rtol=1e-5)


# ------------------------------------------------------------------------ docs/losses.md


def doc_rows():
    rows, header = {}, None
    for line in DOC.read_text().splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if cells[0] == "name":
            header = cells
        elif header is not None and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = dict(zip(header, cells))
    return rows


def parse_defaults(text):
    if text == "—":
        return {}
    call = ast.parse(f"f({text})", mode="eval").body
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def test_doc_table_agrees_with_registry():
    rows = doc_rows()
    assert sorted(rows) == sorted(L.names())
    for name, row in rows.items():
        obj = L.get(name)
        assert row["needs reference"] == ("yes" if obj.needs_reference else "no"), name
        assert tuple(k.strip() for k in row["data kind"].split(",")) == obj.kinds, name
        assert parse_defaults(row["defaults"]) == dict(obj.hyperparameters), name
        assert row["log-probs"] == ("token" if obj.level == "token" else obj.logps), name


@pytest.mark.parametrize("name", LOSSES_MD_NAMES)
def test_function_defaults_match_registry(name):
    params = inspect.signature(getattr(L, name)).parameters.values()
    defaults = {p.name: p.default for p in params
                if p.kind is p.KEYWORD_ONLY and p.default is not p.empty and p.default is not None}
    assert defaults == dict(L.get(name).hyperparameters)


def test_wpo_modifier_weights_the_pair_loss():
    inputs = make_inputs(token_mask=np.array([[[1, 1, 1, 0], [1, 1, 0, 0]]] * 3, bool))
    obj = L.with_wpo("dpo")
    assert obj.name == "wpo(dpo)" and obj.level == "token" and obj.hyperparameters["beta"] == 0.1
    tok, sq, m = inputs.policy_token_logps, inputs.token_log_sum_sq_probs, inputs.token_mask
    w = np.exp(np.sum(np.where(m, tok - sq, 0), -1) / m.sum(-1))  # [NG, 2]
    want = w[:, 0] * w[:, 1] * np.asarray(L.get("dpo")(inputs))
    np.testing.assert_allclose(obj(inputs), want, rtol=1e-5)


def test_ld_modifier_desensitises_the_longer_tail():
    mask = np.array([[[1, 1, 1, 1], [1, 1, 0, 0]]] * 3, bool)
    inputs = make_inputs(token_mask=mask)

    def ld(tok):  # shared length 2: full prefix, tail × 0.5
        return np.stack([tok[:, 0, :2].sum(-1) + 0.5 * tok[:, 0, 2:].sum(-1),
                         tok[:, 1, :2].sum(-1)], -1)

    pol, ref = ld(inputs.policy_token_logps), ld(inputs.reference_token_logps)
    want = np_softplus(-0.1 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])))
    np.testing.assert_allclose(L.with_ld("dpo")(inputs)[:2], want[:2], rtol=1e-5)
    with pytest.raises(ValueError, match="summed"):
        L.with_ld("simpo")


@pytest.mark.parametrize("name", ["dpo", "simpo", "cpo", "kto", "lipo_lambda", "pro", "tpo",
                                  "sft"])
def test_padding_slots_reach_no_gradient(name):
    inputs = make_inputs()
    nan = inputs.policy_logps.copy()
    nan[-1] = np.nan  # the padding group holds garbage
    obj = L.get(name)
    if name == "tpo":
        inputs = make_inputs(policy_step_logps=None, reference_step_logps=None)
    grads = jax.jit(jax.grad(lambda p: obj(L.LossInputs(**{
        **{f: getattr(inputs, f) for f in inputs.__dataclass_fields__}, "policy_logps": p,
    })).sum()))(nan)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[-1] == 0)


def test_sft_does_not_imitate_a_lone_undesirable_response():
    logps = jnp.array([[-4.0], [-6.0]])  # [NG, 1]: unpaired groups
    inputs = L.LossInputs(
        policy_logps=logps, scores=jnp.array([[1.0], [0.0]]), num_tokens=jnp.array([[2.0], [3.0]]),
        response_mask=jnp.ones((2, 1), bool), group_mask=jnp.ones((2,), bool))
    np.testing.assert_allclose(L.get("sft")(inputs), [2.0, 0.0], rtol=1e-6)
