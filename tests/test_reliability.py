"""Bad inputs and faults through the `jaxpo` command: each ends in a clear message and a
meaningful exit status, never a hang, a traceback or a silent wrong run (docs/reliability.md)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxpo import cli
from jaxpo.config import Config, replace
from jaxpo.data.errors import Where
from jaxpo.data.sources import RawRecord
from jaxpo.data.tokenize import Tokenizer
from jaxpo.tasks import synthetic
from jaxpo.train import inputs, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = f"--config={ROOT}/configs/dpo_tiny.py"
SMALL = ["--config.data.batch_size=4", "--config.train.eval_batches=1",
         "--config.optim.warmup_steps=0", "--config.train.log_every=1"]


def _summary(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def _train(workdir, *extra) -> int:
    return cli.main(["train", PRESET, f"--workdir={workdir}", "--no-progress", *SMALL, *extra])


@pytest.mark.parametrize("override, message", [
    ("--config.optim.learning_rate=nan", "config.optim.learning_rate='nan' must be a finite"),
    ("--config.optim.learning_rate=inf", "config.optim.learning_rate='inf' must be a finite"),
    ("--config.loss.beta=nan", "config.loss.beta='nan' must be a finite number"),
])
def test_non_finite_config_values_are_errors(override, message, tmp_path, capsys):
    assert _train(tmp_path / "w", override) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_a_run_that_stays_non_finite_stops_with_exit_1(tmp_path, capsys):
    """A learning rate of 1e30 blows the weights up after one update; every later loss is NaN,
    each update is skipped, and after train.max_skipped_steps in a row the run stops."""
    workdir = tmp_path / "w"
    status = _train(workdir, "--config.optim.name=sgd", "--config.optim.learning_rate=1e30",
                    "--config.optim.max_grad_norm=0", "--config.train.steps=20",
                    "--config.train.max_skipped_steps=3", "--config.train.checkpoint_every=100")
    err = capsys.readouterr().err
    assert status == 1
    assert "was non-finite for 3 updates in a row" in err and "step 4:" in err
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["skipped_steps"] == 3.0 and records[-1]["nonfinite_streak"] == 3.0
    assert not (workdir / "checkpoints" / "4").exists()  # nothing saved from the bad updates


@pytest.mark.slow
def test_resume_trims_a_metrics_line_cut_by_a_kill(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert _train(workdir, "--config.train.steps=2", "--config.train.checkpoint_every=2") == 0
    path = workdir / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # a kill mid-write
    assert _train(workdir, "--config.train.steps=3") == 0
    records = [json.loads(x) for x in path.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


@pytest.mark.slow
def test_a_fresh_run_moves_old_metrics_aside(tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    assert _train(workdir, "--config.train.steps=1") == 0
    assert (workdir / "metrics.jsonl.1").read_text() == '{"step": 1, "loss": 9.0}\n'


@pytest.mark.slow
def test_eval_of_own_model_and_data_has_no_demo_limits(tmp_path, capsys):
    """Without --config the defaults apply (rows of 512 tokens, no prompt limit), not the
    demo's 32/16: nothing is cut, and a cut would be reported."""
    data = tmp_path / "pairs.jsonl"
    long_prompt = "sort: " + " ".join("abcdefghij" * 3)
    rows = [{"prompt": long_prompt + " ->", "chosen": " a b", "rejected": " b a"}] * 4
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = tmp_path / "model"
    export = cli.main(["export", f"--out={model_dir}", "--untrained"])
    assert export == 0
    capsys.readouterr()
    assert cli.main(["eval", f"--config.model.path={model_dir}",
                     f"--config.data.eval_files={data}", "--config.data.format=pair"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert metrics["eval/groups"] == 4 and "cut" not in captured.err
    # With a prompt limit, the cut is reported once, with counts, and in the metrics.
    assert cli.main(["eval", f"--config.model.path={model_dir}",
                     f"--config.data.eval_files={data}", "--config.data.format=pair",
                     "--config.data.max_prompt_length=8"]) == 0
    captured = capsys.readouterr()
    assert "the length limits cut 4 prompts" in captured.err
    assert json.loads(captured.out)["eval/data/truncated/prompt"] == 4.0


@pytest.mark.slow
def test_sigterm_exits_143_after_saving(tmp_path, monkeypatch, capsys):
    """A pre-empted run (SIGTERM: the flag is set) saves after the current update and exits
    128 + 15, so a scheduler can tell pre-emption from completion."""
    monkeypatch.setattr(loop._Flag, "is_set", lambda self: True)
    workdir = tmp_path / "w"
    assert _train(workdir, "--config.train.steps=5") == cli.PREEMPTED == 143
    assert os.path.isdir(workdir / "checkpoints" / "1")
    assert _summary(capsys.readouterr().out)["preempted"] is True


def test_missing_model_path_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert cli.main(["eval", f"--config.model.path={missing}",
                     "--config.data.eval_files=x.jsonl"]) == 2
    assert f"config.model.path='{missing}': no such directory" in capsys.readouterr().err


def test_reference_table_too_short_is_a_friendly_error():
    """The bounds check comes before the table is indexed, so its message can fire."""
    tok = Tokenizer.from_dir(synthetic.tokenizer_dir())
    cfg = replace(Config(), {"data": {"format": "pair", "max_length": 64}})
    builder = inputs.WithReference(inputs.group_builder(cfg, tok, "minmax"),
                                   np.zeros((1, 2), np.float32))
    record = {"prompt": "sort: b a ->", "chosen": " a b", "rejected": " b a"}
    assert builder.build(RawRecord(0, record, Where("f.jsonl", 1))).group is not None
    with pytest.raises(ValueError, match="reference cache has no log-probs for record 5"):
        builder.build(RawRecord(5, record, Where("f.jsonl", 6)))


# ---------------------------------------------------------------- run integrity (a workdir
# belongs to one run; no command silently uses the wrong weights, config or data)


@pytest.mark.slow
def test_a_second_run_on_a_locked_workdir_fails_at_once(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    with loop.WorkdirLock(str(workdir)):
        assert _train(workdir, "--config.train.steps=1") == 2
    err = capsys.readouterr().err
    assert f"{workdir} is in use by another jaxpo run (pid {os.getpid()} on" in err
    assert _train(workdir, "--config.train.steps=1") == 0  # released


@pytest.mark.slow
def test_resume_with_another_config_names_the_keys(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert _train(workdir, "--config.train.steps=1") == 0
    capsys.readouterr()
    assert _train(workdir, "--config.train.steps=1", "--config.optim.learning_rate=1e-2") == 2
    err = capsys.readouterr().err
    assert "optim.learning_rate: 0.001 -> 0.01" in err and "allow_config_change" in err
    assert _train(workdir, "--config.train.steps=1", "--config.loss.name=ipo") == 2
    assert "loss.name: 'dpo' -> 'ipo'" in capsys.readouterr().err
    # Safe keys (more steps, logging) and an explicit allowance resume.
    assert _train(workdir, "--config.train.steps=2", "--config.train.log_every=2") == 0  # safe
    assert _train(workdir, "--config.train.steps=3", "--config.optim.learning_rate=1e-2",
                  "--config.train.allow_config_change=true") == 0


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
    workdir = tmp_path / "w"
    assert _train(workdir, "--config.train.steps=2", "--config.train.checkpoint_every=1") == 0
    for root, _, files in os.walk(workdir / "checkpoints" / "2" / "params"):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(f.name) // 2, 1))
    capsys.readouterr()
    assert _train(workdir, "--config.train.steps=3", "--config.train.checkpoint_every=1") == 0
    captured = capsys.readouterr()
    assert f"checkpoint {workdir}/checkpoints/2 cannot be read" in captured.err
    assert (workdir / "corrupt_checkpoints" / "2").is_dir()  # kept, not deleted
    assert _summary(captured.out)["resumed_from"] == 1


@pytest.mark.slow
def test_a_checkpoint_of_the_older_data_format_resumes_or_says_why(tmp_path, capsys):
    """Checkpoints whose data position is grain's per-process files (older jaxpo) are complete
    checkpoints, not corrupt ones: one process's resumes the same data sequence; several
    processes' cannot be continued, which the error says (and nothing is set aside)."""
    import shutil

    first = tmp_path / "first"
    assert _train(first, "--config.train.steps=2", "--config.train.checkpoint_every=2") == 0
    legacy = tmp_path / "legacy"
    shutil.copytree(first, legacy)
    data = legacy / "checkpoints" / "2" / "data"
    state = (data / "metadata").read_text()
    (data / "metadata").unlink()
    (data / "process_0-of-1.json").write_text(state)
    for workdir in (first, legacy):
        assert _train(workdir, "--config.train.steps=4", "--config.train.checkpoint_every=2") == 0
    capsys.readouterr()
    losses = [[json.loads(line)["loss"] for line in (w / "metrics.jsonl").read_text().splitlines()
               if '"loss"' in line] for w in (first, legacy)]
    assert losses[0] == losses[1] and len(losses[0]) == 4

    two = tmp_path / "two"
    shutil.copytree(first, two)
    data = two / "checkpoints" / "4" / "data"
    (data / "metadata").unlink()
    for p in range(2):
        (data / f"process_{p}-of-2.json").write_text(state)
    shutil.rmtree(two / "checkpoints" / "2")
    assert _train(two, "--config.train.steps=6") == 2
    err = capsys.readouterr().err
    assert "saved per process by an older jaxpo" in err and "model.init_from" in err
    assert (two / "checkpoints" / "4").is_dir() and not (two / "corrupt_checkpoints").exists()


def test_a_kind_the_objective_cannot_use_is_an_error(tmp_path, capsys):
    data = tmp_path / "unpaired.jsonl"
    data.write_text(json.dumps({"prompt": "sort: b a ->", "completion": " a b",
                                "label": True}) + "\n")
    status = cli.main(["train", PRESET, f"--workdir={tmp_path / 'w'}", "--no-progress",
                       *SMALL, "--config.data.format=auto", f"--config.data.train_files={data}",
                       f"--config.data.eval_files={data}"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"{data}:1" in err and "a unpaired record, but the objective trains on ['pair']" in err


@pytest.mark.slow
def test_a_bad_record_mid_run_saves_and_says_how_to_skip(tmp_path, capsys):
    rows = [synthetic.pair_record(__import__("random").Random(i)) for i in range(12)]
    rows[9] = {"prompt": "sort: a ->", "chosen": " a"}  # no 'rejected', met in update 3
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "w"
    args = [f"--config.data.train_files={data}", f"--config.data.eval_files={data}",
            "--config.data.shuffle=false", "--config.train.steps=4",
            "--config.train.checkpoint_every=100"]
    assert _train(workdir, *args) == 2
    err = capsys.readouterr().err
    assert f"{data}:10" in err and "progress up to update 2 is saved" in err
    assert "--config.data.on_bad_record=skip" in err
    assert _train(workdir, *args, "--config.data.on_bad_record=skip") == 0
    out = _summary(capsys.readouterr().out)
    assert out["resumed_from"] == 2 and out["step"] == 4


def test_export_onto_a_file_is_an_error(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert cli.main(["export", f"--out={target}", "--untrained"]) == 2
    assert f"--out={target} is a file" in capsys.readouterr().err


def test_divergence_is_flagged():
    logger = loop._Logger.__new__(loop._Logger)
    logger.losses, logger.was_diverging = [], False
    logger.bar = type("Bar", (), {"write": lambda self, text: None})()
    flags = [logger._diverging(x) for x in [0.7, 0.69, 0.68, 0.7, 0.66, 0.65, 4e5, 0.6]]
    assert flags == [False] * 6 + [True, False]


def _train_on(tmp_path, path, capsys) -> str:
    status = cli.main(["train", PRESET, f"--workdir={tmp_path / 'w'}", "--no-progress", *SMALL,
                       f"--config.data.train_files={path}", f"--config.data.eval_files={path}"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    return err


def test_deeply_nested_json_is_a_bad_record(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    err = _train_on(tmp_path, path, capsys)
    assert f"{path}:1" in err and "nested too deeply" in err


def test_corrupt_gzip_names_the_file(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    assert f"{path}: cannot read the jsonl.gz file" in _train_on(tmp_path, path, capsys)


def test_corrupt_parquet_names_the_file(tmp_path, capsys):
    path = tmp_path / "pairs.parquet"
    path.write_bytes(b"PAR1 this is not parquet PAR1")
    assert f"{path}: not a valid parquet file" in _train_on(tmp_path, path, capsys)


@pytest.mark.parametrize("content, message", [
    ("", "no records (the file is empty)"),
    ("\n\n\n", "no records (only blank lines)"),
])
def test_an_empty_data_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    assert f"{path}: {message}" in _train_on(tmp_path, path, capsys)


def test_a_file_where_every_record_is_dropped_stops_at_once(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "sort: " + "a " * 200 + "->", "chosen": " a", "rejected": " b"}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = cli.main(["train", PRESET, f"--workdir={tmp_path / 'w'}", "--no-progress", *SMALL,
                       f"--config.data.train_files={path}", f"--config.data.eval_files={path}",
                       "--config.data.max_prompt_length=0"])  # no prompt cut: all too long
    err = capsys.readouterr().err
    assert status == 2
    assert f"no usable records in {path}" in err and "3 read" in err


def test_a_record_over_the_size_limit_is_a_file_line_error(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "sort: b a ->", "chosen": " a b", "rejected": " b a"},
            {"prompt": "x" * 5000, "chosen": " a", "rejected": " b"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = cli.main(["train", PRESET, f"--workdir={tmp_path / 'w'}", "--no-progress", *SMALL,
                       f"--config.data.train_files={path}", f"--config.data.eval_files={path}",
                       "--config.data.max_record_bytes=1000", "--config.data.shuffle=false"])
    err = capsys.readouterr().err
    assert status == 2 and f"{path}:2" in err and "over data.max_record_bytes=1000" in err


def test_ctrl_c_is_one_line_with_status_130(monkeypatch, capsys):
    def interrupted(flags, overrides):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.HANDLERS, "plot", interrupted)
    assert cli.main(["plot", "--workdir=x"]) == 130
    assert "interrupted; a rerun resumes" in capsys.readouterr().err


def test_pro_and_infonca_get_raw_rewards_by_default():
    from jaxpo.train.setup import build_run

    def mapping(name, **data):
        mode = "none" if name == "pro" else "model"
        config = replace(Config(), {"loss": {"name": name}, "reference": {"mode": mode},
                                    "data": {"format": "list", **data}})
        return build_run(config).label_mapping

    assert mapping("pro") == "raw" and mapping("lipo_lambda", max_responses=4) == "minmax"
    assert mapping("pro", label_mapping="minmax") == "minmax"  # the config wins
