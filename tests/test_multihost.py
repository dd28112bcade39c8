"""Multi-host correctness on CPU: two local processes with 4 fake devices each (gloo) against
one process with 8, on the real ``jaxpo.train.loop`` path.

- the per-step losses and final parameters are the same for 1x8, 2x4 with contiguous processes
  and 2x4 with the processes interleaved along the mesh (as JAX orders large TPU slices);
- a checkpoint written by 2 processes resumes on 1 and the reverse, continuing the same data;
- a precomputed reference written by 2 processes equals one written by 1, and each process
  count accepts the other's cache;
- no array is compared or gathered across processes (``assert_equal``: scalars only).

The fast tests check the pieces on one process: rows land where the batch sharding says for
any device order, the parameter fingerprint does not depend on the mesh, the unembedding
gradient is reduced once per step, not once per chunk, and bf16 params keep small updates.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _multidevice import run_processes, run_snippet

from jaxpo.config import OptimConfig
from jaxpo.train.optim import MasterState, make_optimizer

BASE = {
    "model": {"preset": "tiny"},
    "loss": {"name": "dpo", "beta": 0.1},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant"},
    "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 8},
    "mesh": {"data": 1, "fsdp": -1},
    "train": {"steps": 4, "checkpoint_every": 2, "eval_every": 0, "eval_batches": 1,
              "log_every": 1, "seed": 3},
}

# One run of the trainer, as one of one or several processes. JOB: workdir, order
# ("contiguous" | "interleaved"), config overrides, and what to do (precompute, train).
JOB_SCRIPT = """
import json
import numpy as np
from jaxpo.sharding import maybe_initialize
maybe_initialize()
import jax
from jax.experimental import multihost_utils
from jaxpo.config import Config, replace
from jaxpo.sharding import make_mesh
from jaxpo.train import loop, setup

job = json.loads(JOB)
compared = []  # every cross-process equality check (an all-gather of its argument)
_assert_equal = multihost_utils.assert_equal
def counting_assert_equal(x, *args, **kwargs):
    compared.append([list(np.shape(leaf)) for leaf in jax.tree.leaves(x)])
    return _assert_equal(x, *args, **kwargs)
multihost_utils.assert_equal = counting_assert_equal

orders = []
def mesh_in_order(data, fsdp, tensor):  # jaxpo's mesh over devices in the job's order
    devices = jax.devices()
    if job["order"] == "interleaved":  # processes alternate along the mesh
        per = [[d for d in devices if d.process_index == p] for p in range(jax.process_count())]
        devices = [d for group in zip(*per) for d in group]
    mesh = make_mesh(data, fsdp, tensor, devices=devices)
    orders.append([d.process_index for d in mesh.devices.flat])
    return mesh
setup.make_mesh = mesh_in_order

sections = json.loads(BASE)
for name, fields in job["config"].items():
    sections.setdefault(name, {}).update(fields)
cfg = replace(Config(), sections)
out = {"process": jax.process_index(), "processes": jax.process_count()}
if job.get("precompute"):
    out["precompute"] = loop.precompute_reference(cfg, job["precompute"], job["workdir"])
if job.get("train"):
    summary = loop.train(cfg, job["workdir"], progress=False)
    out["step"], out["resumed_from"] = summary["step"], summary["resumed_from"]
    model, _ = loop.load_policy(cfg, job["workdir"])
    from flax import nnx
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    full = {jax.tree_util.keystr(p): multihost_utils.process_allgather(x, tiled=True)
            for p, x in leaves}
    if jax.process_index() == 0:
        np.savez(job["workdir"] + "/final.npz", **full)
out["orders"], out["compared"] = orders, compared
print(json.dumps(out))
"""

CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _job(cache, *, processes: int, order: str = "contiguous", config=None, **what) -> dict:
    """Runs JOB_SCRIPT on ``processes`` processes (8 devices in all) with the compilation
    cache dir ``cache``; returns process 0's output."""
    job = {"order": order, "config": config or {}, **what}
    code = JOB_SCRIPT.replace("JOB", repr(json.dumps(job))).replace(
        "BASE", repr(json.dumps(BASE)))
    env = {**CACHE, "JAX_COMPILATION_CACHE_DIR": str(cache)}
    if processes == 1:
        return run_snippet(code, devices=8, timeout=300, env=env)
    outs = run_processes(code, num_processes=processes, devices_per_process=8 // processes,
                         timeout=300, env=env)
    assert [o["process"] for o in outs] == list(range(processes))
    # No array is compared across processes (that is an all-gather of it); a few scalars are.
    compared = [shape for o in outs for leaves in o["compared"] for shape in leaves]
    assert all(np.prod(shape) <= 1 for shape in compared), compared
    return outs[0]


def _losses(workdir) -> list[float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def _params(workdir) -> dict[str, np.ndarray]:
    with np.load(os.path.join(workdir, "final.npz")) as f:
        return {k: f[k] for k in f.files}


def _assert_same_run(workdir, want) -> None:
    np.testing.assert_allclose(_losses(workdir), _losses(want), rtol=1e-5)
    got, ref = _params(workdir), _params(want)
    assert sorted(got) == sorted(ref)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One compilation cache for the module's runs: each program compiles once."""
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache):
    """The reference: 4 updates on one process with 8 devices."""
    tmp = tmp_path_factory.mktemp("multihost")
    out = _job(cache, processes=1, workdir=str(tmp / "one"), train=True)
    assert out["step"] == 4 and out["orders"][0] == [0] * 8
    return tmp, tmp / "one"


@pytest.mark.slow
def test_same_losses_and_params_for_1x8_and_2x4_contiguous_and_interleaved(one_process, cache):
    tmp, one = one_process
    assert len(_losses(one)) == 4
    for order, want in (("contiguous", [0] * 4 + [1] * 4), ("interleaved", [0, 1] * 4)):
        workdir = tmp / f"two_{order}"
        out = _job(cache, processes=2, order=order, workdir=str(workdir), train=True)
        assert out["step"] == 4 and out["orders"][0] == want
        _assert_same_run(workdir, one)


@pytest.mark.slow
def test_resume_moves_between_process_counts(one_process, cache):
    tmp, one = one_process
    for first, then in ((2, 1), (1, 2)):
        workdir = str(tmp / f"resume_{first}_{then}")
        half = {"train": {"steps": 2}}
        assert _job(cache, processes=first, workdir=workdir, train=True, config=half)["step"] == 2
        out = _job(cache, processes=then, workdir=workdir, train=True)
        assert out["resumed_from"] == 2 and out["step"] == 4
        _assert_same_run(workdir, one)  # the same data sequence after the move


@pytest.mark.slow
def test_iterative_rollout_is_the_same_on_two_processes(tmp_path, cache):
    """Sampling, scoring, the refreshed reference and training of an on-policy run give the
    same losses and params on 1 process x 8 devices and 2 x 4 interleaved."""
    rollout = {"rollout": {"enabled": True, "every": 2, "prompts_per_rollout": 8,
                           "num_samples": 3, "max_new_tokens": 6, "reward": "task"},
               "data": {"max_length": 24, "max_prompt_length": 12}}
    one = tmp_path / "one"
    assert _job(cache, processes=1, workdir=str(one), train=True, config=rollout)["step"] == 4
    two = tmp_path / "two"
    out = _job(cache, processes=2, order="interleaved", workdir=str(two), train=True,
               config=rollout)
    assert out["step"] == 4 and out["orders"][0] == [0, 1] * 4
    _assert_same_run(two, one)
    with open(two / "metrics.jsonl") as f:
        rounds = [r for r in map(json.loads, f) if "rollout/round" in r]
    assert [r["rollout/round"] for r in rounds] == [0, 1]


@pytest.mark.slow
def test_a_hugging_face_checkpoint_trains_the_same_on_two_processes(tmp_path, cache):
    """model.path: each process reads only its devices' shards of the safetensors files (no
    array is compared across processes: _job checks), and the run is the one-process run."""
    hf = {"model": {"preset": "", "path": os.path.join(os.path.dirname(__file__), "fixtures",
                                                       "parity", "model")}}
    one = tmp_path / "one"
    assert _job(cache, processes=1, workdir=str(one), train=True, config=hf)["step"] == 4
    two = tmp_path / "two"
    out = _job(cache, processes=2, order="interleaved", workdir=str(two), train=True, config=hf)
    assert out["step"] == 4
    _assert_same_run(two, one)


@pytest.mark.slow
def test_precomputed_reference_is_the_same_for_any_process_count(tmp_path, cache):
    dirs = {n: str(tmp_path / f"ref{n}") for n in (1, 2)}
    use = {n: {"reference": {"mode": "precomputed", "cache_dir": dirs[3 - n]},
               "train": {"steps": 1}} for n in (1, 2)}
    one = _job(cache, processes=1, workdir=str(tmp_path / "w1"), precompute=dirs[1])
    # Two processes write their cache, then train on the one a single process wrote.
    two = _job(cache, processes=2, workdir=str(tmp_path / "w2"), precompute=dirs[2],
               train=True, config=use[2])
    assert one["precompute"]["hash"] == two["precompute"]["hash"]
    with np.load(os.path.join(dirs[1], "reference.npz")) as a, \
            np.load(os.path.join(dirs[2], "reference.npz")) as b:
        assert sorted(a.files) == sorted(b.files) == ["eval", "train"]
        for split in a.files:
            assert np.isfinite(a[split]).all()  # every record has its log-probs
            np.testing.assert_allclose(b[split], a[split], rtol=1e-5, err_msg=split)
    # One process trains on the cache two processes wrote: the same first update.
    again = _job(cache, processes=1, workdir=str(tmp_path / "w1"), train=True,
                 config=use[1])
    assert two["step"] == again["step"] == 1
    np.testing.assert_allclose(_losses(tmp_path / "w1"), _losses(tmp_path / "w2"), rtol=1e-5)
    assert np.isfinite(_losses(tmp_path / "w1")).all()


SNIPPET = """
import json, re, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxpo.models import logprobs
from jaxpo.sharding import get_rules, make_global_batch, make_mesh, use_rules
from jaxpo.train.reference import params_fingerprint

devices = jax.devices()
interleaved = [devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)]
out = {}

# Rows go where the sharding's indices say, for any device order.
rows = np.arange(16 * 3).reshape(16, 3)
for name, devs in (("plain", devices), ("interleaved", interleaved)):
    mesh = make_mesh(1, 8, 1, devices=devs)
    x = make_global_batch({"x": rows}, mesh)["x"]
    out[name] = {str(s.device.id): (np.asarray(s.data)[:, 0] // 3).tolist()
                 for s in x.addressable_shards}

# The fingerprint of the same values on three meshes.
rng = np.random.default_rng(0)
params = {"a": rng.normal(size=(16, 8)).astype(np.float32),
          "b": {"c": rng.normal(size=(4, 8, 2)).astype(np.float32)}}
prints = []
for shape, specs in (((1, 1, 1), (P(), P())), ((1, 8, 1), (P("fsdp"), P(None, "fsdp"))),
                     ((1, 4, 2), (P("fsdp", "tensor"), P("tensor", "fsdp")))):
    mesh = make_mesh(*shape, devices=devices[:int(np.prod(shape))])
    placed = {"a": jax.device_put(params["a"], NamedSharding(mesh, specs[0])),
              "b": {"c": jax.device_put(params["b"]["c"], NamedSharding(mesh, specs[1]))}}
    prints.append(params_fingerprint(placed))
changed = dict(params, a=params["a"].copy())
changed["a"][3, 5] = np.nextafter(changed["a"][3, 5], np.float32(9))  # one ulp
prints.append(params_fingerprint(changed))
out["prints"] = prints

# Unembedding gradient reductions: inside the chunk loop (per chunk) or after it (once).
V, D, B, S = 1000, 64, 16, 64
mesh, rules = make_mesh(1, 8, 1), get_rules("fsdp")
h = jax.device_put(jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32),
                   NamedSharding(mesh, P(("data", "fsdp"))))
w = jax.device_put(jnp.asarray(rng.normal(size=(V, D)) * 0.1, jnp.float32),
                   NamedSharding(mesh, P(None, "fsdp")))
tok = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
pred = jnp.asarray(np.where(rng.random((B, S)) < 0.8, np.arange(S)[None] - 1, -1), jnp.int32)

def loss(w, h, sharded):
    with use_rules(mesh, rules) if sharded else __import__("contextlib").nullcontext():
        return logprobs.token_logps(h, w, tok, pred, chunk_size=16).sum()

f = jax.jit(jax.value_and_grad(lambda w, h: loss(w, h, True), argnums=(0, 1)))
text = f.lower(w, h).compile().as_text()
bodies = set(re.findall(r"body=%?([\\w.\\-]+)", text))
where = {"loop": 0, "once": 0}
for comp in re.split(r"\\n(?=\\S)", text):
    head = re.match(r"(?:ENTRY )?%?([\\w.\\-]+)", comp)
    for line in comp.splitlines():  # e.g. %all-reduce.2 = (f32[], f32[1000,64]{1,0}) all-reduce(
        op = re.search(r"= (.*?) (?:all-reduce|reduce-scatter)(?:-start)?\\(", line)
        if op and f"[{V},{D}]" in op.group(1):
            where["loop" if head and head.group(1) in bodies else "once"] += 1
out["reductions"] = where
(val, (gw, gh)) = f(w, h)
(val1, (gw1, gh1)) = jax.jit(jax.value_and_grad(lambda w, h: loss(w, h, False),
                                                argnums=(0, 1)))(np.asarray(w), np.asarray(h))
out["grads"] = [float(val), float(val1),
                float(np.abs(np.asarray(gw) - np.asarray(gw1)).max() / np.abs(gw1).max()),
                float(np.abs(np.asarray(gh) - np.asarray(gh1)).max() / np.abs(gh1).max())]
print(json.dumps(out))
"""


def test_rows_fingerprint_and_one_unembedding_reduction_on_eight_devices():
    out = run_snippet(SNIPPET, devices=8, timeout=240)
    want = {str(i): [2 * i, 2 * i + 1] for i in range(8)}  # mesh position i: rows 2i, 2i+1
    assert out["plain"] == want
    order = (0, 4, 1, 5, 2, 6, 3, 7)
    assert out["interleaved"] == {str(d): [2 * i, 2 * i + 1] for i, d in enumerate(order)}
    prints = out["prints"]
    assert prints[0] == prints[1] == prints[2]  # 1 device, fsdp 8, fsdp 4 x tp 2
    assert prints[3] != prints[0]  # one ulp of one value
    # One reduction of the [V, D] gradient, after the chunk loop (4 chunks of 16).
    assert out["reductions"] == {"loop": 0, "once": 1}
    val, val1, gw_err, gh_err = out["grads"]
    np.testing.assert_allclose(val, val1, rtol=1e-6)
    assert gw_err < 1e-5 and gh_err < 1e-5


def _train(param_dtype, *, master_weights: bool, updates: int = 10):
    """AdamW at lr 1e-6 on a least-squares fit; returns (initial, final effective params)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    w0 = jnp.asarray(rng.normal(size=(32, 16)) * 0.05, jnp.float32)
    tx, _ = make_optimizer(OptimConfig(learning_rate=1e-6, warmup_steps=0, weight_decay=0.0,
                                       schedule="constant"), updates,
                           master_weights=master_weights)
    params = {"w": w0.astype(param_dtype)}
    state = tx.init(params)

    def loss(p):
        return jnp.mean((x @ p["w"].astype(jnp.float32) - x @ target) ** 2)

    @jax.jit
    def step(params, state):
        updates_, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates_), state

    for _ in range(updates):
        params, state = step(params, state)
    inner = state.inner_state
    master = inner.master["w"] if isinstance(inner, MasterState) else params["w"]
    return np.asarray(w0), np.asarray(master, np.float32), np.asarray(params["w"], np.float32)


def test_bf16_params_keep_small_updates_like_fp32():
    w0, fp32, _ = _train(jnp.float32, master_weights=False)
    _, plain_bf16, _ = _train(jnp.bfloat16, master_weights=False)
    start = np.asarray(jnp.asarray(w0).astype(jnp.bfloat16), np.float32)
    _, master, bf16 = _train(jnp.bfloat16, master_weights=True)

    def moved(w, w_start):
        return float(np.mean(w != w_start))

    def change(w, w_start):
        return float(np.linalg.norm(w - w_start) / np.linalg.norm(w_start))

    assert moved(fp32, w0) > 0.99
    assert moved(plain_bf16, start) < 0.2  # the bug: most bf16 updates round away
    assert moved(master, start) > 0.99
    np.testing.assert_allclose(change(master, start), change(fp32, w0), rtol=0.05)
    # The bf16 params are the master rounded to bf16.
    np.testing.assert_array_equal(bf16, np.asarray(jnp.asarray(master).astype(jnp.bfloat16),
                                                   np.float32))


def test_cluster_detection_defers_to_jax(monkeypatch):
    from jax._src import clusters

    from jaxpo.sharding import distributed

    for key in ("JAXPO_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "JAXPO_NUM_PROCESSES",
                "JAX_NUM_PROCESSES", "JAXPO_PROCESS_ID", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # no gloo in this process

    class TpuSlice:  # what JAX's GceTpuCluster says on a TPU VM slice (no env variables)
        name, opt_in_only_method = "gcetpu", False

        @classmethod
        def is_env_present(cls):
            return True

    monkeypatch.setattr(clusters.ClusterEnv, "_cluster_types", [TpuSlice])
    assert distributed.maybe_initialize() is True
    assert calls[0]["coordinator_address"] is None  # JAX fills in the coordinator,
    assert calls[0]["num_processes"] is None and calls[0]["process_id"] is None  # count, id
    # A one-task SLURM job is single-process: nothing is initialised.
    monkeypatch.setattr(clusters.SlurmCluster, "is_env_present", classmethod(lambda c: True))
    monkeypatch.setattr(clusters.SlurmCluster, "get_process_count", classmethod(lambda c: 1))
    monkeypatch.setattr(clusters.ClusterEnv, "_cluster_types", [clusters.SlurmCluster])
    assert distributed.maybe_initialize() is False and len(calls) == 1
