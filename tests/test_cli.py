"""The `jaxpo` command: argument parsing, errors, and train → eval → export → plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxpo import cli, plot
from jaxpo.models import load_hf
from jaxpo.tasks import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_args_flags_and_overrides():
    flags, overrides = cli.parse_args(
        "train", ["--config=c.py", "--config.train.steps=5", "--workdir", "w", "--no-progress"])
    assert flags == {"config": "c.py", "workdir": "w", "no_progress": True}
    assert overrides == ["--config.train.steps=5"]


@pytest.mark.parametrize("argv, message", [
    (["train", "--wrkdir=x"], "unknown flag --wrkdir; did you mean --workdir?"),
    (["train", "--config.train.stpes=1"], "did you mean train.steps"),
    (["train", "--config.data.layout=tight"], "allowed; choose from ['padded', 'packed'"),
    (["train", "--config=nope/missing.py"], "nope/missing.py: no such file"),
    (["eval"], "no --workdir given; the model would be the random init"),
    (["export", "--workdir=w"], "--out=... is required"),
    (["trian"], "unknown command 'trian'; did you mean 'train'?"),
    (["train", "stray"], "unexpected argument 'stray'"),
])
def test_errors_are_one_line_with_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_version_and_help(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "jaxpo 0.1.0"
    assert cli.main(["--help"]) == 0
    assert "jaxpo export --workdir" in capsys.readouterr().out


def test_python_m_jaxpo_is_jaxpo():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "jaxpo", "train", "--bogus=1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "jaxpo train: error: unknown flag --bogus" in out.stderr


def test_only_jaxpo_errors_are_one_line_messages(monkeypatch, capsys):
    """A TypeError raised inside a library (a bug, not a bad input) keeps its traceback."""
    def library_bug(flags, overrides):
        import numpy
        numpy.zeros((2, 2)).reshape(3)  # raises inside numpy

    monkeypatch.setitem(cli.HANDLERS, "plot", library_bug)
    with pytest.raises(ValueError, match="cannot reshape"):
        cli.main(["plot", "--workdir=x"])

    def jaxpo_error(flags, overrides):  # raised inside jaxpo: a message for the user
        from jaxpo.config import load_config
        load_config(None, ["--config.train.steps=-1"])

    monkeypatch.setitem(cli.HANDLERS, "plot", jaxpo_error)
    assert cli.main(["plot", "--workdir=x"]) == 2
    err = capsys.readouterr().err
    assert "config.train.steps=-1 must be >= 0" in err and "Traceback" not in err


def test_own_data_or_model_without_config_is_not_the_demo(tmp_path):
    assert cli.is_demo({}, [])
    assert cli.is_demo({"workdir": str(tmp_path / "new")}, ["--config.train.steps=3"])
    assert not cli.is_demo({}, ["--config.data.train_files=my.jsonl"])
    assert not cli.is_demo({}, ["--config.model.path=/models/m"])
    assert not cli.is_demo({"config": "configs/dpo_tiny.py"}, [])


def test_plot_writes_a_png(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s, "rewards/margins": 0.1 * s, "rewards/accuracies": 0.5,
             "kl": 0.01 * s, "phase": "pref"} for s in range(1, 6)]
    rows.append({"step": 5, "eval/loss": 0.3, "eval/rewards/accuracies": 0.8})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["plot", f"--workdir={tmp_path}"]) == 0
    png = tmp_path / "plots" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [t for t, _ in plot._panels(rows)]
    assert titles == ["loss", "reward margin", "preference accuracy", "KL"]
    assert plot.series(rows, "eval/loss") == ([5], [0.3])


def test_plot_errors(tmp_path, capsys):
    assert cli.main(["plot", f"--workdir={tmp_path}"]) == 2
    assert "no metrics" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n')
    assert cli.main(["plot", f"--workdir={tmp_path}"]) == 2
    assert "metrics.jsonl:2: not JSON" in capsys.readouterr().err


@pytest.mark.slow
def test_train_eval_export_plot(tmp_path, capsys):
    workdir, hf = tmp_path / "run", tmp_path / "hf"
    small = ["--config.train.steps=2",
             "--config.data.batch_size=4", "--config.train.eval_batches=1",
             "--config.train.checkpoint_every=2"]
    preset = f"--config={ROOT}/configs/dpo_tiny.py"
    # eval or export of a workdir without a checkpoint is an error naming it ...
    assert cli.main(["eval", preset, f"--workdir={workdir}", *small]) == 2
    assert f"--workdir={workdir}: no checkpoint there" in capsys.readouterr().err
    assert cli.main(["export", preset, f"--workdir={workdir}", f"--out={hf}"]) == 2
    assert "no checkpoint there" in capsys.readouterr().err and not hf.exists()
    # ... unless the untrained model is asked for.
    assert cli.main(["eval", preset, f"--workdir={workdir}", "--untrained", *small]) == 0
    untrained = json.loads(capsys.readouterr().out)
    assert untrained["step"] == 0 and untrained["eval/rewards/margins"] == 0.0

    assert cli.main(["train", preset, f"--workdir={workdir}", "--no-progress", *small]) == 0
    out = capsys.readouterr().out
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert summary["step"] == 2 and os.path.isdir(summary["checkpoint_dir"])
    assert (workdir / "plots" / "metrics.png").exists()

    # eval: one JSON object, for the checkpoint (its stored config is used without --config).
    assert cli.main(["eval", f"--workdir={workdir}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 2 and np.isfinite(metrics["eval/loss"])
    assert 0.0 <= metrics["eval/rewards/accuracies"] <= 1.0

    # export: an HF directory with the tokenizer files, loadable back.
    assert cli.main(["export", f"--workdir={workdir}", f"--out={hf}"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 2
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (hf / name).exists()
    assert (hf / "tokenizer.json").read_text() == synthetic.tokenizer_files()["tokenizer.json"]
    model = load_hf(str(hf))
    assert model.config.vocab_size == len(synthetic.VOCAB)
