"""The sharded train step on 8 fake CPU devices: the ``dp``, ``fsdp`` and ``fsdp_tp`` presets give
the same losses and updated params as one device (fp32, 1e-5) over 3 DPO steps with the frozen
reference in the step (batches carry the leading micro-batch axis, replicated), and the state
keeps the shardings the rules ask for."""

from __future__ import annotations

import pytest
from _multidevice import run_snippet

SNIPPET = """
import json, sys
sys.path.insert(0, "tests")
import jax, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from jaxpo import losses
from jaxpo.models.config import get_preset
from jaxpo.models.transformer import Transformer
from jaxpo.sharding import batch_shardings, get_rules, make_global_batch, make_mesh
from jaxpo.train import state as state_lib, step as step_lib
from jaxpo.train.loss_inputs import BATCH_KEYS, LogpSpec
from test_train_step import hand_batch, VOCAB

cfg = get_preset("tiny", vocab_size=VOCAB, num_layers=1, hidden_size=32, intermediate_size=64,
                 num_heads=2, num_kv_heads=2)
rng = np.random.default_rng(0)
batches = []
for _ in range(3):
    prompts = [list(rng.integers(1, VOCAB, rng.integers(2, 5))) for _ in range(8)]
    responses = [[list(rng.integers(1, VOCAB, rng.integers(1, 6))) for _ in range(2)]
                 for _ in range(8)]
    batches.append(step_lib.stack(hand_batch(prompts, responses, [[1.0, 0.0]] * 8)[0]))
tx = optax.apply_if_finite(
    optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)), 2**30)
objective, hparams = losses.build("dpo")

def run(shape, rules_name, devices):
    mesh, rules = make_mesh(*shape, devices=devices), get_rules(rules_name)
    graphdef, abstract = state_lib.abstract_model(cfg)
    shardings = state_lib.state_shardings(abstract, tx, mesh, rules)
    init = lambda: state_lib.split_model(Transformer(cfg, rngs=nnx.Rngs(params=0)))[1]
    params = jax.jit(init, out_shardings=shardings.params)()
    state = jax.jit(lambda p: state_lib.new_state(p, tx), out_shardings=shardings)(params)
    ref = state_lib.copy_params(state.params, shardings.params)
    keys = BATCH_KEYS
    # Rows sharded by the rules; the leading micro-batch axis [A] replicated.
    one = batch_shardings({k: batches[0][k][0] for k in keys}, mesh, rules)
    b_sh = {k: NamedSharding(mesh, PartitionSpec(None, *s.spec)) for k, s in one.items()}
    spec = step_lib.StepSpec(
        logp=LogpSpec(graphdef, num_nodes=2, chunk_size=8, reference_mode="model"),
        objective=objective, hparams=hparams,
        metrics_beta=losses.metrics_beta(objective, hparams), mesh=mesh, rules=rules)
    step = step_lib.make_train_step(spec, tx, state_shardings=shardings,
                                    ref_shardings=shardings.params, batch_shardings=b_sh)
    out = []
    for b in batches:
        state, m = step(state, ref, make_global_batch({k: b[k] for k in keys}, mesh, b_sh))
        out.append(float(m["loss"]))
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state.params)})
    params = [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)]
    ref_ok = all(not x.is_deleted() for x in jax.tree.leaves(ref))
    return {"losses": out, "params": params, "specs": specs, "ref_ok": ref_ok,
            "step": int(state.step), "mesh": dict(mesh.shape),
            "skipped": float(m["skipped_steps"])}

devices = jax.devices()
result = {"one": run((1, 1, 1), "fsdp", devices[:1]), "dp": run((8, 1, 1), "dp", devices),
          "fsdp": run((1, 8, 1), "fsdp", devices), "fsdp_tp": run((2, 2, 2), "fsdp_tp", devices)}
print(json.dumps(result))
"""


@pytest.mark.slow
def test_dp_fsdp_fsdp_tp_match_one_device():
    import numpy as np

    out = run_snippet(SNIPPET, devices=8, timeout=400)
    one = out["one"]
    assert one["step"] == 3 and one["losses"][0] > one["losses"][2]  # it learns
    assert one["skipped"] == 0.0
    np.testing.assert_allclose(one["losses"][0], np.log(2.0), rtol=1e-6)  # policy = reference
    for name in ("dp", "fsdp", "fsdp_tp"):
        got = out[name]
        assert got["ref_ok"] and got["step"] == 3 and got["skipped"] == 0.0
        np.testing.assert_allclose(got["losses"], one["losses"], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
        for a, b in zip(got["params"], one["params"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5,
                                       err_msg=name)
    # The presets really shard: nothing for dp, fsdp only for fsdp, both for fsdp_tp.
    assert out["dp"]["specs"] == ["PartitionSpec()"] or all(
        "fsdp" not in s and "tensor" not in s for s in out["dp"]["specs"])
    assert any("fsdp" in s for s in out["fsdp"]["specs"])
    assert not any("tensor" in s for s in out["fsdp"]["specs"])
    assert any("tensor" in s for s in out["fsdp_tp"]["specs"])
    assert out["fsdp_tp"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
