"""`jaxpo bench quality`: the statistics and claims of the report, the flags, the committed
results behind docs/losses.md, and (slow) a two-objective, one-seed miniature of the benchmark."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxpo import cli
from jaxpo.bench import quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", f"{quality.NAME}.json")


def _run(task, seed, shape, objective, reward, kl=1.0):
    after = {"true_reward": reward, "exact": 0.0, "kl": kl, "accuracy": 0.5}
    return {"task": task, "seed": seed, "shape": shape, "objective": objective,
            "responses_seen": 64, "before": {"true_reward": 0.5}, "after": after}


def test_verdict_is_the_paired_mean_against_two_standard_errors():
    d = np.array([0.10, 0.05, 0.12, 0.08])
    out = quality._verdict(d)
    se = d.std(ddof=1) / np.sqrt(4)
    assert out["mean_diff"] == pytest.approx(d.mean(), abs=1e-4)
    assert out["stderr"] == pytest.approx(se, abs=1e-4)
    assert out["verdict"] == "reproduced" and out["n"] == 4
    assert quality._verdict(-d)["verdict"] == "contradicted"
    assert quality._verdict([0.1, -0.1, 0.05])["verdict"].startswith("not reproduced")
    assert quality._verdict([])["verdict"] == "not run"


def test_claims_pair_the_same_task_and_seed():
    runs = []
    lipo, dpo = [0.9, 0.8, 0.95, 0.7], [0.85, 0.78, 0.9, 0.71]
    for i, (a, b) in enumerate(zip(lipo, dpo)):
        task, seed = ("sort", "add")[i % 2], i // 2
        runs += [_run(task, seed, "lists K=4", "LiPO-λ", a),
                 _run(task, seed, "lists K=4", "DPO (all pairs)", b)]
    claim = quality.claims({"runs": runs})[0]
    d = np.subtract(lipo, dpo)
    assert claim["claim"].startswith("LiPO-λ beats DPO (all pairs)") and claim["n"] == 4
    assert claim["mean_diff"] == pytest.approx(d.mean(), abs=1e-4)
    assert claim["per_task"] == {"add": pytest.approx(d[1::2].mean(), abs=1e-4),
                                 "sort": pytest.approx(d[0::2].mean(), abs=1e-4)}


def test_simpo_is_compared_with_dpo_interpolated_at_its_kl():
    runs = [_run("sort", 0, "pairs", "DPO β=0.3", 0.5, kl=1.0),
            _run("sort", 0, "pairs", "DPO", 0.9, kl=3.0),
            _run("sort", 0, "pairs", "SimPO", 0.8, kl=2.0),
            _run("sort", 1, "pairs", "DPO β=0.3", 0.6, kl=1.0),
            _run("sort", 1, "pairs", "DPO", 0.7, kl=2.0),
            _run("sort", 1, "pairs", "SimPO", 0.9, kl=4.0)]  # beyond the sweep: clamped
    claim = quality._simpo_claim({"runs": runs})
    assert claim["mean_diff"] == pytest.approx(np.mean([0.8 - 0.7, 0.9 - 0.7]), abs=1e-4)
    assert claim["kl_outside_dpo_range"] == 1 and claim["n"] == 2


def test_summary_is_mean_and_sample_std_over_seeds():
    runs = [_run("sort", s, "pairs", "DPO", r, kl=k)
            for s, (r, k) in enumerate([(0.9, 1.0), (0.7, 2.0), (0.8, 4.0)])]
    (row,) = quality.summarize({"runs": runs})
    assert row["true_reward"] == {"mean": pytest.approx(0.8), "std": pytest.approx(0.1),
                                  "n": 3}
    assert row["kl"]["std"] == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1), abs=1e-4)


def test_settings_from_flags():
    assert quality.settings_from_flags(quick=True) == quality.QUICK
    s = quality.settings_from_flags(tasks="sort, add", seeds="5")
    assert s.tasks == ("sort", "add") and s.seeds == 5 and s.steps == quality.FULL.steps
    assert quality.FULL.budget == quality.FULL.steps * quality.FULL.responses_per_step


def test_parse_args_of_bench():
    flags, overrides = cli.parse_args("bench", [
        "quality", "--quick", "--out=o", "--workdir", "w", "--tasks=sort", "--seeds=2"])
    assert flags == {"benchmark": "quality", "quick": True, "out": "o", "workdir": "w",
                     "tasks": "sort", "seeds": "2"}
    assert overrides == []


@pytest.mark.parametrize("argv, message", [
    (["bench"], "jaxpo bench needs the benchmark to run: quality"),
    (["bench", "qualty"], "needs the benchmark to run: quality (got 'qualty')"),
    (["bench", "quality", "extra"], "unexpected argument 'extra'"),
    (["bench", "quality", "--tasks=sort,mul"], "--tasks=sort,mul: unknown task(s) ['mul']"),
    (["bench", "quality", "--seeds=0"], "--seeds=0 must be a positive integer"),
    (["bench", "quality", "--config.train.steps=3"], "takes no --config.* overrides"),
    (["bench", "quality", "--quik"], "unknown flag --quik; did you mean --quick?"),
])
def test_bench_errors_are_one_line_with_status_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_docs_losses_section_is_generated_from_the_committed_results():
    with open(RESULTS, encoding="utf-8") as f:
        results = json.load(f)
    with open(os.path.join(ROOT, "docs", "losses.md"), encoding="utf-8") as f:
        docs = f.read()
    assert quality.docs_section(results) in docs
    # The committed run is the full one, with every claim tested.
    assert results["settings"]["seeds"] >= 3 and len(results["settings"]["tasks"]) >= 2
    assert all(c["n"] >= 3 for c in results["claims"])
    with open(RESULTS[:-4] + "md", encoding="utf-8") as f:
        assert f.read() == quality.markdown(results)


@pytest.mark.slow
def test_miniature_benchmark_two_objectives_one_seed(tmp_path, monkeypatch, capsys):
    cells = (quality.Cell("pairs", "DPO", "dpo", "pair"),
             quality.Cell("lists K=4", "LiPO-λ", "lipo_lambda", "list4"))
    tiny = dataclasses.replace(quality.QUICK, steps=3, sft_steps=3, responses_per_step=8,
                               num_eval=16, kl_samples=1)
    monkeypatch.setattr(quality, "CELLS", cells)
    monkeypatch.setattr(quality, "QUICK", tiny)
    out, work = tmp_path / "out", tmp_path / "work"
    assert cli.main(["bench", "quality", "--quick", "--tasks=add", "--seeds=1",
                     f"--out={out}", f"--workdir={work}"]) == 0
    printed = capsys.readouterr().out
    assert "| pairs | DPO |" in printed and "| lists K=4 | LiPO-λ |" in printed
    results = json.loads((out / f"{quality.NAME}.json").read_text())
    assert results["settings"]["tasks"] == ["add"] and results["settings"]["budget_responses"] == 24
    assert [(r["shape"], r["objective"]) for r in results["runs"]] == [
        ("pairs", "DPO"), ("lists K=4", "LiPO-λ")]
    for r in results["runs"]:
        assert 0 <= r["after"]["true_reward"] <= 1 and 0 <= r["after"]["accuracy"] <= 1
        assert np.isfinite(r["after"]["kl"]) and r["before"]["kl"] == 0.0
    assert all(c["n"] == 0 for c in results["claims"])  # no claim has both of its objectives
    assert (out / f"{quality.NAME}.png").stat().st_size > 0
    assert (work / "add" / "seed0" / "sft" / "checkpoints").is_dir()
