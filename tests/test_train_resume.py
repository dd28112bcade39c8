"""Kill-and-resume is exact: a run killed with SIGKILL, resumed, stopped with SIGTERM and resumed
again ends with bitwise the same parameters (CPU, fixed seed) as a run never interrupted.

The runs are real ``jaxpo.train.loop.train`` processes on the tiny model. They share a
persistent compilation cache so that only the first compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _multidevice import REPO_ROOT, snippet_env

STEPS = 12  # optimiser updates

SCRIPT = """
import json, sys
import jax, numpy as np
from jaxpo.config import Config, replace
from jaxpo.train import loop
workdir = sys.argv[1]
cfg = replace(Config(), {
    "loss": {"name": "dpo", "beta": 0.1},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 2},
    "data": {"max_length": 48, "max_prompt_length": 24, "batch_size": 4},
    "train": {"steps": STEPS, "checkpoint_every": 2, "eval_every": 0, "log_every": 1,
              "eval_batches": 1, "seed": 3},
})
summary = loop.train(cfg, workdir, progress=False)
if not summary["preempted"]:
    model, step = loop.load_policy(cfg, workdir)
    from flax import nnx
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    np.savez(workdir + "/final.npz", **{jax.tree_util.keystr(p): np.asarray(x)
                                        for p, x in leaves})
print(json.dumps({k: summary[k] for k in ("step", "preempted", "resumed_from")}))
""".replace("STEPS", str(STEPS))


def _start(workdir: str, cache: str) -> subprocess.Popen:
    env = snippet_env(1, {"JAX_COMPILATION_CACHE_DIR": cache,
                          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    return subprocess.Popen([sys.executable, "-c", SCRIPT, workdir], env=env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _checkpoints(workdir: str) -> list[int]:
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(n) for n in os.listdir(path) if n.isdigit())


def _logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in record:  # train records (eval records have eval/ names)
            out.append(record["step"])
    return out


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < end, "timed out waiting for the run"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_sigterm_resume_is_bitwise_exact(tmp_path):
    cache = str(tmp_path / "jax_cache")
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    reference = _start(straight, cache)
    # 1. SIGKILL as soon as a checkpoint exists.
    proc = _start(interrupted, cache)
    _wait_for(lambda: _checkpoints(interrupted), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoints(interrupted)[-1]
    assert killed_at < STEPS
    # 2. Resume; SIGTERM once it has logged a step of its own. (The killed run may have logged
    # steps past its last checkpoint: the resumed run first drops them.)
    proc = _start(interrupted, cache)
    _wait_for(lambda: max(_logged_steps(interrupted), default=0) <= killed_at, proc)
    _wait_for(lambda: max(_logged_steps(interrupted), default=0) > killed_at + 1, proc)
    proc.send_signal(signal.SIGTERM)
    summary = _finish(proc)
    assert summary["resumed_from"] == killed_at
    assert summary["preempted"] and summary["step"] < STEPS
    assert _checkpoints(interrupted)[-1] == summary["step"]  # saved after the current step
    # 3. Resume to the end.
    summary = _finish(_start(interrupted, cache))
    assert summary["step"] == STEPS and not summary["preempted"]
    assert _finish(reference)["step"] == STEPS

    a, b = np.load(os.path.join(straight, "final.npz")), np.load(
        os.path.join(interrupted, "final.npz"))
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 5
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Every step is logged exactly once, in order, across the three processes.
    assert _logged_steps(interrupted) == _logged_steps(straight) == list(range(1, 13))


MULTIPROCESS = """
import json, sys
import jax
from jaxpo.sharding import maybe_initialize
maybe_initialize()
from jaxpo.train import loop
from jaxpo.config import Config, replace
cfg = replace(Config(), {"optim": {"learning_rate": 1e-3},
                         "data": {"max_length": 48, "max_prompt_length": 24, "batch_size": 4},
                         "train": {"steps": 3, "checkpoint_every": 2, "eval_batches": 1}})
first = loop.train(cfg, sys.argv[1], progress=False)
again = loop.train(replace(cfg, {"train": {"steps": 4}}), sys.argv[1], progress=False)
print(json.dumps({"loss": first["final"]["loss"], "step": again["step"],
                  "resumed": again["resumed_from"]}))
"""


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    from _multidevice import run_processes

    code = MULTIPROCESS.replace("sys.argv[1]", repr(str(tmp_path)))
    out = run_processes(code, num_processes=2, devices_per_process=2, timeout=300)
    assert out[0] == out[1]  # one global step: the same loss on both processes
    assert out[0]["step"] == 4 and out[0]["resumed"] == 3
