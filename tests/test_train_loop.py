"""The steady-state loop: one compilation per step function per run, metrics fetched late,
checkpoints written in the background."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpo.config import Config, replace
from jaxpo.train import checkpoint as ckpt_lib
from jaxpo.train import loop
from jaxpo.train.state import TrainState


@pytest.fixture
def compiles(caplog):
    """Counts ``Compiling jit(<name>)`` log records by function name."""
    jax.config.update("jax_log_compiles", True)
    caplog.set_level(logging.WARNING, logger="jax")
    yield lambda name: sum(f"Compiling jit({name})" in r.getMessage() for r in caplog.records)
    jax.config.update("jax_log_compiles", False)


def test_train_and_eval_steps_compile_once_per_run(tmp_path, compiles):
    config = replace(Config(), {
        "data": {"format": "pair", "max_length": 48, "max_prompt_length": 24, "batch_size": 4},
        "optim": {"learning_rate": 1e-3, "grad_accum_steps": 2},
        "train": {"steps": 4, "eval_every": 1, "eval_batches": 3, "log_every": 2,
                  "checkpoint_every": 2},
    })
    summary = loop.train(config, str(tmp_path), progress=False)
    assert summary["step"] == 4
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # every log_every updates
    assert len([r for r in records if "eval/loss" in r]) == 4  # four evaluations ...
    assert compiles("train_step") == 1 and compiles("eval_step") == 1  # ... one compile each


def test_a_checkpoint_save_returns_before_the_write_is_done(tmp_path):
    """Saving copies the state off the devices and returns; the files are written in the
    background while the next steps run."""
    params = {"w": jnp.ones((64, 1024, 1024), jnp.float32)}  # 256 MiB
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state={},
                       stats={"reward_mean": jnp.zeros(()), "reward_count": jnp.zeros(())})
    ckpt = ckpt_lib.Checkpointer(str(tmp_path))
    ckpt.save(1, state, config={"a": 1})
    assert ckpt.manager.is_saving_in_progress()  # the save call did not wait for the write
    state = state._replace(params={"w": state.params["w"] + 1})  # training goes on
    ckpt.close()  # waits
    restored = ckpt_lib.Checkpointer(str(tmp_path)).restore(1, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(np.asarray(restored.params["w"][0, 0, :3]), [1.0, 1.0, 1.0])
