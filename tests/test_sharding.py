"""Mesh, logical-axis rules, state/batch shardings, and multi-process batches.

Tests that need several devices run in a subprocess with 8 fake CPU devices
(``_multidevice.run_snippet``); the multi-process test runs two gloo-connected processes.
"""

import numpy as np
import pytest
from _multidevice import run_processes, run_snippet
from jax.sharding import PartitionSpec as P

from jaxpo.sharding import distributed, get_rules, logical_to_spec
from jaxpo.sharding.mesh import mesh_shape

EIGHT_DEVICES = """
import json, logging
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jaxpo.sharding import (batch_shardings, constrain, get_rules, make_mesh, named_sharding,
                            param_shardings, state_shardings, use_rules)

out = {"devices": len(jax.devices())}
out["shapes"] = [dict(make_mesh(**kw).shape) for kw in
                 [{}, {"fsdp": 2, "tensor": 2}, {"data": 2, "fsdp": -1, "tensor": 2},
                  {"data": 1, "fsdp": 8}]]
try:
    make_mesh(data=-1, fsdp=3)
except ValueError as e:
    out["error"] = str(e)

def part(names):
    return nnx.with_partitioning(nnx.initializers.normal(1.0), names, eager_sharding=False)

class Tiny(nnx.Module):
    def __init__(self, rngs, odd=False):
        self.embed = nnx.Param(part(("vocab", "embed"))(rngs.params(), (16, 8)))
        self.up = nnx.Param(part(("embed", "mlp"))(rngs.params(), (8, 12)))
        if odd:
            self.odd = nnx.Param(part(("embed", "mlp"))(rngs.params(), (6, 3)))  # 3 % 2
        self.scale = nnx.Param(jnp.ones((8,)))  # no names: replicated

def error(fn, *args):
    try:
        fn(*args)
    except ValueError as e:
        return str(e)
    return None

mesh = make_mesh(fsdp=2, tensor=2)
rules = get_rules("fsdp_tp")
model = Tiny(nnx.Rngs(0))
# No silent replication: an indivisible parameter axis is an error, unless a rule allows it.
odd_model = Tiny(nnx.Rngs(0), odd=True)
out["odd_error"] = error(param_shardings, odd_model, mesh, rules)
odd_leaves = jax.tree_util.tree_leaves_with_path(
    param_shardings(odd_model, mesh, rules + (("mlp", None),)),
    is_leaf=lambda x: isinstance(x, nnx.Variable))
out["odd_allowed"] = {jax.tree_util.keystr(k): str(v.get_value().spec) for k, v in odd_leaves}
odd_opt = nnx.Optimizer(odd_model, optax.adam(1e-3), wrt=nnx.Param)
out["odd_opt_error"] = error(state_shardings, nnx.state(odd_opt), mesh, rules)
params = nnx.state(model, nnx.Param)
spec = lambda tree: [str(s.spec) for s in jax.tree.leaves(tree)]
is_var = lambda x: isinstance(x, nnx.Variable)
leaves = jax.tree_util.tree_leaves_with_path(param_shardings(params, mesh, rules), is_leaf=is_var)
out["params"] = {jax.tree_util.keystr(k): str(v.get_value().spec) for k, v in leaves}
out["params_fsdp"] = spec(param_shardings(model, mesh, get_rules("fsdp")))
out["params_dp"] = spec(param_shardings(params, mesh, get_rules("dp")))
opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
out["nnx_opt"] = spec(state_shardings(nnx.state(opt), mesh, rules))
pure = jax.tree.map(lambda v: v, nnx.to_pure_dict(params))
adam = optax.adam(1e-3).init(pure)
out["optax"] = spec(state_shardings(adam, mesh, rules, params=params))
abstract = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), nnx.Param)
out["abstract_equal"] = spec(param_shardings(abstract, mesh, rules)) == spec(
    param_shardings(params, mesh, rules))

batch = {"tokens": np.zeros((8, 5), np.int32), "step": np.int32(3)}
out["batch"] = {k: str(v.spec) for k, v in batch_shardings(batch, mesh, rules).items()}
out["batch_error"] = error(batch_shardings, {"tokens": np.zeros((6, 2))}, mesh, rules)
out["batch_fallback"] = str(batch_shardings(
    {"tokens": np.zeros((6, 2))}, mesh, rules + (("batch", "data"),))["tokens"].spec)
# Fallbacks: a smaller sharding, and a mesh axis freed for another name.
fallback = (("vocab", "tensor"), ("vocab", "fsdp"), ("embed", "fsdp"))
out["fallback_vocab"] = str(named_sharding((6, 8), ("vocab", "embed"), mesh, fallback).spec)
out["fallback_error"] = error(named_sharding, (5, 8), ("vocab", "embed"), mesh, fallback)
out["unknown_axis"] = error(named_sharding, (8,), ("embed",), mesh, (("embed", "fsdpp"),))

# A sharded matmul (batch x embed @ embed x mlp) equals the unsharded one.
rng = np.random.default_rng(0)
x, w = rng.standard_normal((8, 8), np.float32), rng.standard_normal((8, 12), np.float32)
shard = param_shardings(params, mesh, rules)
x_s = batch_shardings({"x": x}, mesh, rules)["x"]
w_s = shard["up"].get_value()
def f(x, w):
    with use_rules(mesh, rules):
        y = constrain(x @ w, ("batch", "mlp"))
    return y
y = jax.jit(f, in_shardings=(x_s, w_s))(jax.device_put(x, x_s), jax.device_put(w, w_s))
exact = x.astype(np.float64) @ w
out["matmul_err"] = float(np.abs(np.asarray(y) - exact).max() / np.abs(exact).max())  # relative
out["matmul_spec"] = str(y.sharding.spec)
out["w_shard_shape"] = list(jax.device_put(w, w_s).addressable_shards[0].data.shape)
# Chunked log-probs (and their gradients) under fsdp_tp equal the unsharded ones.
from jaxpo.models.logprobs import token_logps
h, u = rng.standard_normal((4, 10, 8), np.float32), rng.standard_normal((16, 8), np.float32)
t = rng.integers(0, 16, (4, 10)).astype(np.int32)
pi = np.tile(np.arange(10, dtype=np.int32) - 1, (4, 1))
def lp_loss(h, u):
    return token_logps(h, u, t, pi, chunk_size=4).sum()
def lp_loss_sharded(h, u):
    with use_rules(mesh, rules):
        return lp_loss(h, u)
h_s = batch_shardings({"h": h}, mesh, rules)["h"]
u_s = shard["embed"].get_value()
sharded = jax.jit(jax.value_and_grad(lp_loss_sharded, argnums=(0, 1)),
                  in_shardings=(h_s, u_s))(h, u)
plain = jax.value_and_grad(lp_loss, argnums=(0, 1))(h, u)  # eager, one device
out["logps_grad_spec"] = str(sharded[1][1].sharding.spec)
# Relative to each array's magnitude: the summed log-probs are ~250, where one fp32 rounding
# step is already 1.5e-5 in absolute terms.
out["logps_err"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()
                             / np.abs(np.asarray(b)).max())
                       for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)))
placed = jax.device_put(params, shard)
out["placed_embed_shard"] = list(placed["embed"].get_value().addressable_shards[0].data.shape)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight():
    return run_snippet(EIGHT_DEVICES, devices=8, timeout=240)


def test_mesh_shapes_on_eight_devices(eight):
    assert eight["devices"] == 8
    assert eight["shapes"] == [
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 2, "fsdp": 2, "tensor": 2},
        {"data": 1, "fsdp": 8, "tensor": 1},
    ]
    assert "mesh.fsdp=3" in eight["error"] and "8" in eight["error"]


def test_param_shardings_follow_rules(eight):
    # fsdp_tp: embed -> fsdp, vocab/mlp -> tensor.
    assert eight["params"] == {
        "['embed']": "P('tensor', 'fsdp')",
        "['scale']": "P()",
        "['up']": "P('fsdp', 'tensor')",
    }
    assert eight["params_fsdp"] == ["P(None, 'fsdp')", "P()", "P('fsdp', None)"]
    assert set(eight["params_dp"]) == {"P(None, None)", "P()"}
    assert eight["abstract_equal"] is True


def test_indivisible_parameter_axis_is_an_error_naming_it(eight):
    assert eight["odd_error"] == (
        "parameter 'odd' dim 1 ('mlp') of size 3 cannot be sharded over mesh axis 'tensor' "
        "of size 2; make it divisible, or allow replicating it with a later rule ('mlp', None)")
    assert eight["odd_opt_error"].startswith("state array 'opt_state/0/mu/odd' dim 1 ('mlp')")


def test_a_later_rule_allows_replicating_a_parameter_axis(eight):
    assert eight["odd_allowed"] == {
        "['embed']": "P('tensor', 'fsdp')",
        "['odd']": "P('fsdp', None)",  # mlp replicated: 3 rows over tensor=2, allowed
        "['scale']": "P()",
        "['up']": "P('fsdp', 'tensor')",  # divisible: still sharded
    }


def test_fallback_rules_and_unknown_mesh_axes(eight):
    # vocab 6 % tensor 2 == 0 -> tensor; embed then takes fsdp.
    assert eight["fallback_vocab"] == "P('tensor', 'fsdp')"
    assert eight["fallback_error"].startswith(
        "array dim 0 ('vocab') of size 5 cannot be sharded over mesh axis 'fsdp' of size 2")
    assert "mesh axes ['fsdpp']" in eight["unknown_axis"]


def test_optimizer_state_mirrors_params(eight):
    params = ["P('tensor', 'fsdp')", "P()", "P('fsdp', 'tensor')"]
    # nnx.Optimizer: step, count (replicated), mu, nu (like params).
    assert sorted(eight["nnx_opt"]) == sorted(["P()"] * 2 + params * 2)
    # optax.adam on a pure dict: count, mu, nu matched to params by path.
    assert sorted(eight["optax"]) == sorted(["P()"] + params * 2)


def test_batch_shardings(eight):
    assert eight["batch"] == {"tokens": "P(('data', 'fsdp'), None)", "step": "P()"}


def test_indivisible_batch_is_an_error_naming_the_array(eight):
    assert eight["batch_error"] == (
        "batch array 'tokens' dim 0 ('batch') of size 6 cannot be sharded over mesh axes "
        "('data', 'fsdp') of size 4; make it divisible, or allow replicating it with a later "
        "rule ('batch', None)")
    assert eight["batch_fallback"] == "P('data', None)"  # a later ('batch', 'data') rule


def test_sharded_matmul_equals_unsharded(eight):
    assert eight["matmul_err"] < 1e-6  # relative
    assert eight["matmul_spec"] == "P(('data', 'fsdp'), 'tensor')"
    assert eight["w_shard_shape"] == [4, 6]
    assert eight["placed_embed_shard"] == [8, 4]


def test_chunked_logps_and_gradients_under_fsdp_tp_equal_one_device(eight):
    assert eight["logps_err"] < 1e-6  # relative: fp32 meets it on any machine
    assert eight["logps_grad_spec"] != "P()"  # the gradient stays sharded


TWO_PROCESSES = """
import json
import numpy as np
from jaxpo.sharding import make_global_batch, make_mesh, maybe_initialize
assert maybe_initialize()
import jax, jax.numpy as jnp
pid = jax.process_index()
mesh = make_mesh(data=-1)
rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # the global batch, 8 rows
batch = make_global_batch({"x": rows, "n": np.int32(7)}, mesh)  # the same on every process
total = jax.jit(lambda b: jnp.sum(b["x"], axis=0) + b["n"],
                out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(batch)
print(json.dumps({
    "pid": pid, "processes": jax.process_count(), "devices": len(jax.devices()),
    "global_shape": list(batch["x"].shape), "spec": str(batch["x"].sharding.spec),
    "total": np.asarray(total).tolist(),
    "local_rows": sorted(int(s.index[0].start) for s in batch["x"].addressable_shards),
}))
jax.distributed.shutdown()
"""


def test_two_processes_assemble_the_global_batch():
    outs = run_processes(TWO_PROCESSES, num_processes=2, devices_per_process=2, timeout=240)
    rows = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    for pid, out in enumerate(outs):
        assert out["pid"] == pid and out["processes"] == 2 and out["devices"] == 4
        assert out["global_shape"] == [8, 3]
        assert out["spec"] == "P(('data', 'fsdp'), None)"
        np.testing.assert_allclose(out["total"], rows.sum(0) + 7)
        assert out["local_rows"] == [pid * 4, pid * 4 + 2]  # its own half, 2 rows per device


@pytest.mark.parametrize(
    "kw, want",
    [
        ({"data": -1}, {"data": 6, "fsdp": 1, "tensor": 1}),
        ({"data": 1, "fsdp": -1, "tensor": 3}, {"data": 1, "fsdp": 2, "tensor": 3}),
        ({"data": 2, "fsdp": 3, "tensor": 1}, {"data": 2, "fsdp": 3, "tensor": 1}),
    ],
)
def test_mesh_shape_resolves_the_rest(kw, want):
    assert mesh_shape(**kw, num_devices=6) == want


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"data": -1, "tensor": 4}, "mesh.tensor=4"),
        ({"data": 1, "fsdp": 2, "tensor": 1}, "set one of mesh.data"),
        ({"data": -1, "fsdp": -1}, "only one size may be -1"),
        ({"data": 0}, "mesh.data must be"),
    ],
)
def test_mesh_shape_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        mesh_shape(**kw, num_devices=6)


def test_rules_presets_and_mapping():
    with pytest.raises(ValueError, match=r"presets: \['dp', 'fsdp', 'fsdp_tp'\]"):
        get_rules("zero3")
    fsdp, tp = get_rules("fsdp"), get_rules("fsdp_tp")
    assert logical_to_spec(("batch", "length", "embed"), fsdp) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), fsdp) == P("fsdp", None)
    assert logical_to_spec(("embed", "heads", "head_dim"), tp) == P("fsdp", "tensor", None)
    assert logical_to_spec(("vocab", "embed"), get_rules("dp")) == P(None, None)
    assert get_rules([("embed", "fsdp")]) == (("embed", "fsdp"),)
    assert get_rules([["batch", ["data", "fsdp"]]]) == (("batch", ("data", "fsdp")),)
    with pytest.raises(ValueError, match="a sharding rule is"):
        get_rules([("embed", "fsdp", "x")])
    with pytest.raises(ValueError, match="a sharding rule is"):
        get_rules([("embed", 3)])


def test_rules_resolve_like_flax():
    # Priority follows the rules: the earlier rule takes a mesh axis, a name's later rule is its
    # fallback (flax.linen.logical_to_mesh_axes semantics).
    rules = (("embed", "fsdp"), ("batch", ("data", "fsdp")), ("batch", "data"))
    assert logical_to_spec(("batch", "embed"), rules) == P("data", "fsdp")
    assert logical_to_spec(("batch", "length"), rules) == P(("data", "fsdp"), None)
    assert logical_to_spec(("heads", None), rules) == P(None, None)


def test_maybe_initialize_is_a_no_op_on_one_process(monkeypatch):
    for key in ("JAXPO_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.maybe_initialize() is False
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job is single-process
    assert distributed.maybe_initialize() is False


def test_maybe_initialize_needs_process_count_and_id(monkeypatch):
    monkeypatch.setenv("JAXPO_COORDINATOR", "127.0.0.1:1")
    monkeypatch.delenv("JAXPO_NUM_PROCESSES", raising=False)
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="JAXPO_NUM_PROCESSES"):
        distributed.maybe_initialize()
