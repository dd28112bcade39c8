"""The objective registry: routing of LossInputs, combinations, errors, and docs/losses.md."""

import ast
import dataclasses
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
    "bradley_terry",
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
        "margins": f(ng, k), "rewards": f(ng, k) / 10,
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


def test_needs_name_exactly_the_fields_each_objective_reads():
    """An objective given only what it declares in ``needs`` runs; without one of them it
    fails: the trainer can compute exactly ``needs`` and nothing else."""
    base = {"policy_logps", "scores", "num_tokens", "response_mask", "group_mask",
            "policy_step_logps", "step_mask"}
    for name in L.names():
        obj = L.get(name)
        if name == "modpo":  # needs margin-model rewards that make_inputs provides
            assert "margins" in obj.needs
        k = 2 if "pair" in obj.kinds else (1 if obj.kinds == ("unpaired",) else 3)
        full = make_inputs(k=k, m=2 if "tree" in obj.kinds else 1)
        given = {f: getattr(full, f) for f in base | set(obj.needs)
                 if getattr(full, f) is not None}
        out = obj(L.LossInputs(**given))
        assert np.all(np.isfinite(np.asarray(out))), name
        optional = {"step_similarity", "reward_mean",  # have defaults
                    "policy_step_logps", "reference_step_logps"}  # fall back to whole responses
        if obj.level == "token":  # reads the reference's token arrays; its sums feed the metrics
            optional.add("reference_logps")
        for field in sorted(set(obj.needs) - optional):
            fewer = {f: v for f, v in given.items() if f != field}
            with pytest.raises((ValueError, TypeError, AttributeError)):
                obj(L.LossInputs(**fewer))


def test_needs_of_combinations_and_modifiers():
    assert L.get("dpo").needs == {"reference_logps"}
    assert {"step_similarity", "policy_step_logps"} <= L.get("tpo").needs
    assert "kto_kl" in L.get("kto").needs and "kto_kl" not in L.get("dpo").needs
    assert "reward_mean" in L.get("bco").needs
    assert L.get("simpo").needs == frozenset()
    rpo = L.get("dpo + 0.2*sft")
    assert rpo.needs == {"reference_logps"}
    assert {"policy_token_logps", "token_log_sum_sq_probs"} <= L.with_wpo("dpo").needs
    assert "reference_token_logps" in L.with_ld("dpo").needs


def test_label_mappings_follow_the_papers():
    assert L.get("pro").labels == L.get("infonca").labels == "raw"
    assert L.get("lipo_lambda").labels == L.get("tpo").labels == "minmax"
    assert L.get("pro + sft").labels == "raw"  # sft reads only the best response
    with pytest.raises(ValueError, match="different label mappings"):
        L.get("pro + lipo_lambda")


def test_build_bakes_combinations_and_checks_hyperparameters():
    obj, overrides = L.build("dpo", hparams={"beta": 0.3})
    assert overrides == {"beta": 0.3} and L.metrics_beta(obj, overrides) == 0.3
    obj, overrides = L.build("dpo + 0.2*sft", hparams={"beta": 0.3})
    assert overrides == {} and obj.hyperparameters["dpo"]["beta"] == 0.3
    assert L.metrics_beta(obj, overrides) == 0.3
    assert L.metrics_beta(*L.build("simpo")) == 2.0
    with pytest.raises(ValueError, match="has no hyperparameter 'gama'"):
        L.build("simpo", hparams={"gama": 1.0})
    with pytest.raises(ValueError, match="unknown objective"):
        L.build("dpoo")
    obj, _ = L.build("dpo", modifier="wpo")
    assert obj.name == "wpo(dpo)" and obj.kinds == ("pair",)
    with pytest.raises(ValueError, match="modifier 'tight'"):
        L.build("dpo", modifier="tight")


def test_bco_reads_the_running_reward_mean():
    inputs = make_inputs(k=2)
    plain = np.asarray(L.get("bco")(inputs))
    shifted = np.asarray(L.get("bco")(dataclasses.replace(inputs, reward_mean=jnp.float32(0.5))))
    expected = np.asarray(L.get("bco")(inputs, delta=0.5))
    np.testing.assert_allclose(shifted, expected, rtol=1e-6)
    assert not np.allclose(shifted[:2], plain[:2])


def test_tpo_with_one_step_is_lipo_lambda_whatever_the_similarity():
    """On lists (M = 1) TPO uses no step similarity: it equals LiPO-λ with the same β."""
    inputs = make_inputs(k=3, m=1)
    inputs = dataclasses.replace(inputs, policy_step_logps=inputs.policy_logps[..., None],
                                 reference_step_logps=inputs.reference_logps[..., None])
    sim = np.random.default_rng(1).uniform(0, 1, (3, 3, 3, 1)).astype(np.float32)
    with_sim = dataclasses.replace(inputs, step_similarity=jnp.asarray(sim))
    tpo = np.asarray(L.get("tpo")(with_sim, beta=0.05))
    lipo = np.asarray(L.get("lipo_lambda")(inputs, beta=0.05))
    np.testing.assert_allclose(tpo, lipo, rtol=1e-5, atol=1e-6)
