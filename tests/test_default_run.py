"""The embedded default (`jaxpo train` with no arguments): a shortened run in-process, and the
full run as a slow test that checks the policy moved toward the preferred behaviour."""

import json
import os
import subprocess
import sys

import pytest

from jaxpo import cli, demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_short_demo_is_two_ordinary_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "NUM_PROMPTS", 8)
    overrides = ["--config.train.steps=3", "--config.data.batch_size=4",
                 "--config.train.eval_batches=1", "--config.train.log_every=1"]
    workdir = tmp_path / "run"
    out = demo.run(str(workdir), overrides, sft_steps=3, progress=False)

    table = out["table"]
    assert list(table) == list(demo.STAGES)
    for row in table.values():
        assert 0.0 <= row["true_reward"] <= 1.0 and 0.0 <= row["exact"] <= row["true_reward"]
        assert 0.0 <= row["accuracy"] <= 1.0
    # The policy equals its reference before DPO: every held-out pair is a tie.
    assert table["initial model"]["accuracy"] == table["after SFT warm-up"]["accuracy"] == 0.5
    assert json.loads((workdir / "before_after.json").read_text()) == table

    # An SFT run in <workdir>/sft, then a DPO run in <workdir> that starts from its weights.
    for run_dir in (workdir / "sft", workdir):
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
        assert os.path.isdir(run_dir / "checkpoints" / "3")
    assert out["summary"]["step"] == 3
    assert out["plot"] and os.path.exists(out["plot"])
    assert (workdir / "data" / "pair_train.jsonl").exists()

    printed = capsys.readouterr().out
    assert "after DPO" in printed and "checkpoint:" in printed and "plot:" in printed


def test_demo_configs_apply_only_to_the_demo(tmp_path):
    sft, dpo = demo.configs(str(tmp_path), ["--config.train.seed=3"], sft_steps=7)
    assert (sft.loss.name, sft.train.steps, sft.model.init_from) == ("sft", 7, "")
    assert dpo.loss.name == "dpo" and dpo.model.init_from == str(tmp_path / "sft")
    assert sft.train.seed == dpo.train.seed == 3 and dpo.data.max_length == 32


def test_new_workdir_never_reuses(tmp_path):
    base = str(tmp_path / "default")
    assert cli.new_workdir(base) == base
    os.makedirs(base)
    assert cli.new_workdir(base) == base + "-2"


@pytest.mark.slow
def test_full_default_run_improves(tmp_path):
    """`python -m jaxpo train` with no config: ~2 minutes on a 2-core CPU."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jaxpo", "train", "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after DPO" in proc.stdout
    table = json.loads((tmp_path / "runs" / "default" / "before_after.json").read_text())
    sft, dpo = table["after SFT warm-up"], table["after DPO"]
    assert sft["true_reward"] > 0.6  # the warm-up learned the task, stutter included
    assert dpo["true_reward"] > sft["true_reward"] + 0.05
    assert dpo["exact"] > sft["exact"] + 0.3
    assert dpo["accuracy"] > 0.85
