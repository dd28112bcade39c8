"""The alignment-quality benchmark: every objective on every data shape, on tasks whose true
reward is known exactly (``jaxpo bench quality``; ``benchmarks/alignment_quality.py``).

    results = run(out_dir, FULL)          # writes alignment_quality.{json,md,png} into out_dir

For each task of :mod:`jaxpo.tasks.family` and each seed:

1. an SFT base (``loss.name=sft`` on the chosen responses of the task's pairs, a seeded init):
   the reference and starting point of every objective of that seed;
2. preference data from the task's noisy base policy, scored by the true reward, in every shape:
   pairs, unpaired labels, ranked lists of K = 4 and 8, preference trees (K = 4 leaves, one step
   per word, step rewards), pairs with 20% and 40% flipped labels, and the best-vs-worst pairs
   of the same lists and trees. The data come from the base *generator* the SFT base imitates,
   not from samples of the SFT model: every objective sees the same off-policy data, which is
   what a comparison of objectives needs (see docs/losses.md);
3. each objective trains from the base with ordinary ``jaxpo.train.loop.train`` runs and the
   same budget: the same number of responses per update (a pair counts 2, a list of 8 counts 8)
   and the same number of updates, optimiser and schedule;
4. each trained policy is measured (:class:`jaxpo.bench.measure.Measure`) on the task's held-out
   prompts and pairs: true reward and exact-answer rate of greedy answers, the Monte-Carlo KL to
   the base, held-out preference accuracy.

The report gives mean ± sample standard deviation over seeds, and tests the published claims on
paired per-seed differences (:func:`claims`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxpo import config as config_lib
from jaxpo.bench.measure import Measure
from jaxpo.tasks import family
from jaxpo.train import loop
from jaxpo.train.setup import build_run

NAME = "alignment_quality"  # the results files: <out>/alignment_quality.{json,md,png}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One objective on one data shape.

    Attributes:
      shape: the data shape as the table shows it.
      label: the objective as the table shows it.
      loss: the ``jaxpo.losses`` name.
      data: the data file it trains on (a key of :data:`DATA`).
      beta: β (None = the objective's paper default).
      kwargs: other hyperparameters, ``config.loss.kwargs`` syntax.
    """

    shape: str
    label: str
    loss: str
    data: str
    beta: float | None = None
    kwargs: str = ""


# Data file → (record shape, responses per group K, label-flip rate, derived best-vs-worst).
DATA: dict[str, tuple[str, int, float, bool]] = {
    "pair": ("pair", 2, 0.0, False), "unpaired": ("unpaired", 1, 0.0, False),
    "list4": ("list", 4, 0.0, False), "list4_bw": ("list", 4, 0.0, True),
    "list8": ("list", 8, 0.0, False), "list8_bw": ("list", 8, 0.0, True),
    "tree": ("tree", 4, 0.0, False), "tree_bw": ("tree", 4, 0.0, True),
    "flip20": ("flipped", 2, 0.2, False), "flip40": ("flipped", 2, 0.4, False),
}
SFT = Cell("sft", "sft", "sft", "pair")  # the base: imitation of the pairs' chosen responses
TREE_DEPTH = 5  # the longest answer of any task, in steps (one word each)

CELLS: tuple[Cell, ...] = (
    Cell("pairs", "DPO", "dpo", "pair"),
    Cell("pairs", "DPO β=0.03", "dpo", "pair", beta=0.03),
    Cell("pairs", "DPO β=0.3", "dpo", "pair", beta=0.3),
    Cell("pairs", "IPO", "ipo", "pair"),
    Cell("pairs", "SimPO", "simpo", "pair"),
    Cell("unpaired", "KTO", "kto", "unpaired"),
    *(c for k in (4, 8) for c in (
        Cell(f"lists K={k}", "LiPO-λ", "lipo_lambda", f"list{k}"),
        Cell(f"lists K={k}", "ListMLE", "list_mle", f"list{k}"),
        Cell(f"lists K={k}", "DPO (all pairs)", "pairwise_logistic", f"list{k}"),
        Cell(f"lists K={k}", "DPO (best vs worst)", "dpo", f"list{k}_bw"))),
    Cell("trees K=4", "TPO", "tpo", "tree"),
    Cell("trees K=4", "DPO (best vs worst)", "dpo", "tree_bw"),
    *(c for p in (20, 40) for c in (
        Cell(f"flipped {p}%", "DPO", "dpo", f"flip{p}"),
        Cell(f"flipped {p}%", f"robust DPO ε={p / 100}", "robust_dpo", f"flip{p}",
             kwargs=f"epsilon={p / 100}"))),
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The size of a benchmark run (the same for every objective).

    Attributes:
      tasks: :mod:`jaxpo.tasks.family` task names.
      seeds: seeds 0..seeds-1 (SFT init, data and data order).
      steps: updates of every objective.
      responses_per_step: responses per update (a pair 2, a list of K K): the budget is
        ``steps × responses_per_step`` responses seen.
      sft_steps: updates of each SFT base (16 pairs' chosen responses each): enough for every
        task's base to reach partial credit and some exact answers.
      learning_rate: peak learning rate of every objective (AdamW, 10 warmup steps, cosine
        decay): low enough that the policies stay near their base (KL to it of about 1–2 nats;
        at 1e-3 they drifted 3–7 nats away, far beyond what a KL-regularised objective
        intends).
      sft_learning_rate: peak learning rate of the SFT bases (same schedule).
      num_eval: held-out pairs (and prompts: the first 128 of them) per task.
      kl_samples: sampled responses per held-out prompt for the KL estimate.
    """

    tasks: tuple[str, ...] = ("sort", "add", "rise")
    seeds: int = 3
    steps: int = 120
    responses_per_step: int = 32
    sft_steps: int = 1000
    learning_rate: float = 1e-4
    sft_learning_rate: float = 1e-3
    num_eval: int = 200
    kl_samples: int = 4

    @property
    def budget(self) -> int:
        return self.steps * self.responses_per_step


FULL = Settings()
QUICK = Settings(tasks=("sort",), steps=60)  # ≤ 15 min on a 2-core CPU


def settings_from_flags(*, quick: bool = False, tasks: str | None = None,
                        seeds: str | None = None) -> Settings:
    """:data:`QUICK` or :data:`FULL`, with ``--tasks=a,b`` and ``--seeds=N`` applied (errors
    name the flag)."""
    settings = QUICK if quick else FULL
    if tasks is not None:
        names = tuple(t.strip() for t in tasks.split(",") if t.strip())
        unknown = [t for t in names if t not in family.TASKS]
        if unknown or not names:
            raise ValueError(f"--tasks={tasks}: unknown task(s) {unknown}; choose from "
                             f"{list(family.TASKS)}")
        settings = dataclasses.replace(settings, tasks=names)
    if seeds is not None:
        if not seeds.isdigit() or int(seeds) < 1:
            raise ValueError(f"--seeds={seeds} must be a positive integer")
        settings = dataclasses.replace(settings, seeds=int(seeds))
    return settings


def run(out_dir: str, settings: Settings = FULL, *, workdir: str | None = None,
        cells: Sequence[Cell] | None = None, log: Callable[[str], None] | None = None
        ) -> dict[str, Any]:
    """Runs the benchmark and writes ``<out_dir>/alignment_quality.{json,md,png}``.

    Args:
      out_dir: where the results go.
      settings: its size (:data:`FULL`, :data:`QUICK`, or your own).
      workdir: the runs' directory (default ``<out_dir>/work``); existing runs there are
        resumed, so an interrupted benchmark continues where it stopped.
      cells: the objectives and data shapes to run (default :data:`CELLS`).
      log: where progress lines go (default: printed at once, also into a file).

    Returns:
      The results (what the JSON file holds).
    """
    for name in settings.tasks:
        family.get(name)
    cells = CELLS if cells is None else tuple(cells)
    log = log or functools.partial(print, flush=True)
    workdir = workdir or os.path.join(out_dir, "work")
    _compilation_cache(os.path.join(workdir, "jax_cache"))
    tokenizer = family.write_tokenizer(os.path.join(workdir, "tokenizer"))
    start = time.time()
    files, evals = {}, {}
    for task_name in settings.tasks:
        task = family.get(task_name)
        evals[task_name] = family_file(
            task, "pair", os.path.join(workdir, task_name, "eval_pairs.jsonl"),
            settings.num_eval, 10_000)
        for seed in range(settings.seeds):
            files[task_name, seed] = _write_data(
                task, os.path.join(workdir, task_name, f"seed{seed}"), seed, settings)
    rows = _plan_rows(settings, tokenizer, [files[t, 0] for t in settings.tasks], cells)
    records: list[dict[str, Any]] = []
    bases: list[dict[str, Any]] = []
    for task_name in settings.tasks:
        task = family.get(task_name)
        measure = None
        for seed in range(settings.seeds):
            seed_dir = os.path.join(workdir, task_name, f"seed{seed}")

            def config(cell: Cell, **kw: Any) -> config_lib.Config:
                return _config(settings, tokenizer, cell, files[task_name, seed], seed,  # noqa: B023
                               rows=rows[cell.data], **kw)

            sft_cfg = config(SFT, init_from="", steps=settings.sft_steps)
            if measure is None:  # one per task: the same compiled functions for every policy
                held_out = config_lib.replace(sft_cfg,
                                              {"data": {"eval_files": (evals[task_name],)}})
                measure = Measure(build_run(held_out), held_out, task.true_reward)
            loop.train(sft_cfg, os.path.join(seed_dir, "sft"), progress=False)
            base, _, _ = loop.load_params(build_run(sft_cfg), os.path.join(seed_dir, "sft"))
            before = _measure(measure, base, base, seed, settings)
            bases.append({"task": task_name, "seed": seed, **before})
            log(f"[{time.time() - start:6.0f}s] {task_name} seed {seed} SFT base: "
                + _short(before))
            for cell in cells:
                cfg = config(cell, init_from=os.path.join(seed_dir, "sft"), steps=settings.steps)
                cell_dir = os.path.join(seed_dir, _slug(cell))
                t0 = time.time()
                loop.train(cfg, cell_dir, progress=False)
                params, _, _ = loop.load_params(build_run(cfg), cell_dir)
                after = _measure(measure, params, base, seed, settings)
                records.append({"task": task_name, "seed": seed, "shape": cell.shape,
                                "objective": cell.label, "loss": cell.loss,
                                "beta": cell.beta, "kwargs": cell.kwargs,
                                "responses_seen": settings.budget,
                                "seconds": round(time.time() - t0, 1),
                                "before": before, "after": after})
                log(f"[{time.time() - start:6.0f}s] {task_name} seed {seed} {cell.shape} / "
                    f"{cell.label}: " + _short(after))
    results = {
        "settings": dataclasses.asdict(settings) | {"budget_responses": settings.budget},
        "setup": {"model": "tiny preset (family tokenizer)", "optimizer": "adamw",
                  "warmup_steps": 10, "schedule": "cosine", "max_length": 32,
                  "kl_estimator": "mean over held-out prompts x and y ~ π (temperature 1) of "
                                  "log π(y|x) − log π_ref(y|x), π_ref = the SFT base",
                  "std": "sample standard deviation over seeds (ddof=1)"},
        "seconds": round(time.time() - start, 1),
        "bases": bases, "runs": records,
    }
    results["summary"] = summarize(results)
    results["claims"] = claims(results)
    write(results, out_dir)
    return results


def family_file(task: family.Task, shape: str, path: str, n: int, seed: int, **kw: Any) -> str:
    """Writes ``n`` records of ``shape`` to ``path`` (once) and returns the path."""
    if not os.path.exists(path):
        tmp = path + ".tmp"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n"
                         for r in family.records(task, shape, n, seed, **kw))
        os.replace(tmp, path)
    return path


def _write_data(task: family.Task, seed_dir: str, seed: int, settings: Settings
                ) -> dict[str, str]:
    """Every training file of one (task, seed), with enough groups for the whole budget.

    Lists and trees hold ``budget / 2`` groups, so that their best-vs-worst pairs (written from
    the very same lists and trees) last the budget too.
    """
    files: dict[str, str] = {}
    for key, (shape, k, flip, bw) in DATA.items():
        path = os.path.join(seed_dir, "data", f"{key}.jsonl")
        if bw:
            src = files[key.removesuffix("_bw")]  # DATA lists every source before its pairs
            if not os.path.exists(path):
                with open(src, encoding="utf-8") as f, open(path, "w", encoding="utf-8") as g:
                    g.writelines(json.dumps(family.best_vs_worst(json.loads(line))) + "\n"
                                 for line in f)
        else:
            n = settings.budget // (2 if shape in ("list", "tree") else k)
            family_file(task, shape, path, max(n, 1), seed, k=k, flip=flip)
        files[key] = path
    return files


def _compilation_cache(path: str) -> None:
    """Keeps compiled steps on disk (unless the user set a cache): an objective's step then
    compiles once for all tasks and seeds, most of the time of a small run."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _plan_rows(settings: Settings, tokenizer: str, files: Sequence[dict[str, str]],
               cells: Sequence[Cell]) -> dict[str, int]:
    """Rows per batch of each data file, the most any task needs (each task's own shapes as
    :func:`jaxpo.train.loop.resolved_run` derives them): one batch shape per data shape, so
    one compilation per objective for every task and seed."""
    rows = {}
    for key in {c.data for c in (SFT, *cells)}:
        rows[key] = max(
            loop.resolved_run(c, c.data.train_files)[0].data.rows
            for c in (_config(settings, tokenizer, Cell("", "", "sft", key), f, 0, rows=0,
                              init_from="", steps=1) for f in files))
    return rows


def _config(settings: Settings, tokenizer: str, cell: Cell, files: dict[str, str], seed: int,
            *, rows: int, init_from: str, steps: int) -> config_lib.Config:
    shape, k, _, bw = DATA[cell.data]
    k = 2 if bw else k
    kind = {"flipped": "pair"}.get(shape, "pair" if bw else shape)
    sft = cell is SFT
    return config_lib.replace(config_lib.Config(), {
        "model": {"preset": "tiny", "tokenizer": tokenizer, "init_from": init_from},
        "data": {"train_files": (files[cell.data],), "format": kind, "max_length": 32,
                 "max_prompt_length": 16, "max_responses": k,
                 "max_steps": TREE_DEPTH if kind == "tree" else 1, "rows": rows,
                 "batch_size": 16 if sft else max(settings.responses_per_step // k, 1)},
        "loss": {"name": cell.loss, "beta": cell.beta, "kwargs": cell.kwargs},
        "optim": {"learning_rate": settings.sft_learning_rate if sft else settings.learning_rate,
                  "warmup_steps": 10},
        "train": {"steps": steps, "seed": seed, "checkpoint_every": max(steps, 1),
                  "keep_checkpoints": 1, "log_every": max(steps // 4, 1)},
    })


def _measure(measure: Measure, params: Any, ref: Any, seed: int, settings: Settings
             ) -> dict[str, float]:
    out = measure(params, ref)
    out["kl"] = measure.kl(params, ref, jax.random.key(seed), samples=settings.kl_samples)
    return {k: round(v, 5) for k, v in out.items()}


def _slug(cell: Cell) -> str:
    text = f"{cell.data}-{cell.loss}-{cell.beta}-{cell.kwargs}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _short(m: dict[str, float]) -> str:
    return (f"reward {m['true_reward']:.3f}, exact {m['exact']:.1%}, KL {m['kl']:.2f}, "
            f"accuracy {m['accuracy']:.3f}")


# ------------------------------------------------------------------------------ the report

METRICS = ("true_reward", "exact", "kl", "accuracy")


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": round(float(v.mean()), 4),
            "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4), "n": len(v)}


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every (task, shape, objective): before and after."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in results["runs"]:
        groups.setdefault((r["task"], r["shape"], r["objective"]), []).append(r)
    return [{"task": t, "shape": s, "objective": o, "responses_seen": rs[0]["responses_seen"],
             "before": _stats([r["before"]["true_reward"] for r in rs]),
             **{m: _stats([r["after"][m] for r in rs]) for m in METRICS}}
            for (t, s, o), rs in groups.items()]


def _paired(results: dict[str, Any], shape: str, a: str, b: str
            ) -> tuple[list[float], dict[str, float]]:
    """Per-(task, seed) differences of the after-training true reward, ``a − b``."""
    after = {(r["task"], r["seed"], r["objective"]): r["after"]["true_reward"]
             for r in results["runs"] if r["shape"] == shape}
    diffs, per_task = [], {}
    for (task, seed, obj), value in sorted(after.items()):
        if obj == a and (task, seed, b) in after:
            diffs.append(value - after[(task, seed, b)])
            per_task.setdefault(task, []).append(diffs[-1])
    return diffs, {t: round(float(np.mean(d)), 4) for t, d in per_task.items()}


def _verdict(diffs: Sequence[float]) -> dict[str, Any]:
    """Reproduced when the mean paired difference is above two standard errors, contradicted
    when below minus two, otherwise no clear difference."""
    d = np.asarray(diffs, np.float64)
    if len(d) == 0:
        return {"verdict": "not run", "mean_diff": None, "stderr": None, "n": 0}
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    mean = float(d.mean())
    verdict = ("reproduced" if mean > 2 * se else
               "contradicted" if mean < -2 * se else "not reproduced (no clear difference)")
    return {"verdict": verdict, "mean_diff": round(mean, 4), "stderr": round(se, 4),
            "n": len(d)}


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The published claims, each tested on paired per-(task, seed) differences of the true
    reward of greedy answers after training."""
    out = []
    tests = [(f"lists K={k}", "LiPO-λ", b, f"LiPO-λ beats {b} on the same lists (K={k})")
             for k in (4, 8) for b in ("DPO (all pairs)", "DPO (best vs worst)")]
    tests += [("trees K=4", "TPO", "DPO (best vs worst)",
               "TPO beats DPO on best-vs-worst leaves of the same trees")]
    tests += [(f"flipped {p}%", f"robust DPO ε={p / 100}", "DPO",
               f"robust DPO beats DPO with {p}% flipped labels") for p in (20, 40)]
    for shape, a, b, text in tests:
        diffs, per_task = _paired(results, shape, a, b)
        out.append({"claim": text, "shape": shape, "a": a, "b": b, "per_task": per_task,
                    **_verdict(diffs)})
    out.append(_simpo_claim(results))
    return out


def _simpo_claim(results: dict[str, Any]) -> dict[str, Any]:
    """SimPO vs DPO at equal KL: each seed's SimPO reward minus DPO's reward at SimPO's KL,
    interpolated linearly on that seed's DPO β sweep (clamped outside the swept KL range)."""
    by: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
    for r in results["runs"]:
        if r["shape"] == "pairs":
            by.setdefault((r["task"], r["seed"]), {})[r["objective"]] = r["after"]
    diffs, outside, per_task = [], 0, {}
    for (task, _), cells in sorted(by.items()):
        dpo = sorted((m["kl"], m["true_reward"]) for o, m in cells.items()
                     if o.startswith("DPO"))
        if "SimPO" not in cells or len(dpo) < 2:
            continue
        kl = cells["SimPO"]["kl"]
        outside += not dpo[0][0] <= kl <= dpo[-1][0]
        diffs.append(cells["SimPO"]["true_reward"]
                     - float(np.interp(kl, [x for x, _ in dpo], [y for _, y in dpo])))
        per_task.setdefault(task, []).append(diffs[-1])
    return {"claim": "SimPO beats DPO at equal KL", "shape": "pairs", "a": "SimPO",
            "b": "DPO β sweep at SimPO's KL", "kl_outside_dpo_range": outside,
            "per_task": {t: round(float(np.mean(d)), 4) for t, d in per_task.items()},
            **_verdict(diffs)}


def _rates(st: dict[str, Any]) -> str:
    """The peak learning rates of a run's settings (older results had one for every run)."""
    sft = st.get("sft_learning_rate", st["learning_rate"])
    return f"peak learning rate {st['learning_rate']:g} (SFT bases {sft:g})"


def _pm(s: dict[str, float], fmt: str = ".3f") -> str:
    return f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown report: one table per task, then the claims."""
    st = results["settings"]
    lines = [
        "# Alignment quality: objectives × data shapes on tasks with a known reward",
        "",
        (f"Tasks {', '.join(st['tasks'])}; {st['seeds']} seeds; every objective: {st['steps']} "
        f"updates × {st['responses_per_step']} responses = **{st['budget_responses']} "
        f"responses seen**, from the seed's SFT base ({st['sft_steps']} SFT updates); "
        f"{_rates(st)}. Mean ± std "
        "over seeds. *reward*: true reward of greedy answers on 128 held-out prompts (before = "
        "the SFT base); *exact*: share of fully correct answers; *KL*: Monte-Carlo "
        f"E_y~π[log π − log π_base], {st['kl_samples']} samples per prompt; *accuracy*: held-out "
        f"pairs ({st['num_eval']}) ranked right by log π − log π_base. Total "
        f"{results['seconds'] / 60:.1f} min."),
    ]
    for task in st["tasks"]:
        lines += ["", f"## {task}", "",
                  "| data | objective | reward before | reward after | exact | KL | accuracy |",
                  "|---|---|---|---|---|---|---|"]
        for row in results["summary"]:
            if row["task"] == task:
                lines.append(
                    f"| {row['shape']} | {row['objective']} | {_pm(row['before'])} | "
                    f"{_pm(row['true_reward'])} | {_pm(row['exact'], '.2f')} | "
                    f"{_pm(row['kl'], '.2f')} | {_pm(row['accuracy'])} |")
    lines += ["", "## Claims", "",
              ("Paired per-(task, seed) differences of the reward after training; reproduced "
              "when the mean difference exceeds two standard errors."), "",
              "| claim | mean difference ± s.e. (n) | per task | verdict |", "|---|---|---|---|"]
    for c in results["claims"]:
        if c["n"]:
            per = ", ".join(f"{t} {v:+.3f}" for t, v in c["per_task"].items())
            lines.append(f"| {c['claim']} | {c['mean_diff']:+.3f} ± {c['stderr']:.3f} "
                         f"({c['n']}) | {per} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


DOCS_BEGIN = "<!-- generated from benchmarks/results/alignment_quality.json by " \
    "jaxpo.bench.quality.docs_section; do not edit -->"
DOCS_END = "<!-- end of generated section -->"


def docs_section(results: dict[str, Any]) -> str:
    """The measured part of docs/losses.md's "Which objective for which data": per data shape,
    the objectives ranked by true reward after training (mean over every task and seed), and
    the claims with their numbers. Every figure comes from ``results``."""
    st = results["settings"]
    runs = results["runs"]
    base = float(np.mean([b["true_reward"] for b in results["bases"]]))
    lines = [DOCS_BEGIN, "",
             (f"Measured by `jaxpo bench quality` ({', '.join(st['tasks'])}; {st['seeds']} seeds; "
             f"{st['budget_responses']} responses seen per objective, {_rates(st)}; "
             f"{st['sft_steps']} SFT updates per base, whose greedy "
             f"answers score {base:.3f} on average). Mean true reward of greedy answers after "
             "training over every task and seed, with the mean KL to the base in brackets; "
             "best first:"), "",
             "| data | objectives, best first: reward (KL) |", "|---|---|"]
    shapes = list(dict.fromkeys(r["shape"] for r in runs))
    for shape in shapes:
        scores: dict[str, list[tuple[float, float]]] = {}
        for r in runs:
            if r["shape"] == shape:
                scores.setdefault(r["objective"], []).append(
                    (r["after"]["true_reward"], r["after"]["kl"]))
        ranked = sorted(scores.items(), key=lambda kv: -np.mean([x for x, _ in kv[1]]))
        cells = " · ".join(f"{name} {np.mean([x for x, _ in v]):.3f} "
                           f"({np.mean([k for _, k in v]):.1f})" for name, v in ranked)
        lines.append(f"| {shape} | {cells} |")
    lines += ["", ("The published claims, on paired per-(task, seed) differences of that reward "
              "(reproduced when the mean difference exceeds two standard errors):"), ""]
    for c in results["claims"]:
        if c["n"]:
            lines.append(f"- {c['claim']}: {c['verdict']}, {c['mean_diff']:+.3f} ± "
                         f"{c['stderr']:.3f} (n = {c['n']}; "
                         + ", ".join(f"{t} {v:+.3f}" for t, v in c["per_task"].items()) + ").")
    return "\n".join([*lines, "", DOCS_END])


def update_docs(path: str, results: dict[str, Any]) -> None:
    """Replaces the generated section of the Markdown file ``path`` (between
    :data:`DOCS_BEGIN` and :data:`DOCS_END`) by :func:`docs_section` of ``results``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"{path}: no generated section ({DOCS_BEGIN} ... {DOCS_END})")
    head, rest = text.split(DOCS_BEGIN, 1)
    tail = rest.split(DOCS_END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + docs_section(results) + tail)


def plot(results: dict[str, Any], path: str) -> str:
    """Reward after training vs KL to the base, one point per objective and data shape (mean
    over seeds, error bars one std), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["settings"]["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5.5), squeeze=False)
    shapes = sorted({r["shape"] for r in results["summary"]})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(shapes)}
    for ax, task in zip(axes[0], tasks):
        for row in results["summary"]:
            if row["task"] != task:
                continue
            kl, rw = row["kl"], row["true_reward"]
            ax.errorbar(kl["mean"], rw["mean"], xerr=kl["std"], yerr=rw["std"], fmt="o",
                        color=colors[row["shape"]], ms=4, capsize=2)
            ax.annotate(row["objective"], (kl["mean"], rw["mean"]), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")
        base = [b["true_reward"] for b in results["bases"] if b["task"] == task]
        ax.axhline(float(np.mean(base)), color="grey", ls="--", lw=1, label="SFT base")
        ax.set(title=task, xlabel="KL to the SFT base (nats)", ylabel="true reward (greedy)")
        for s in shapes:
            ax.plot([], [], "o", color=colors[s], label=s)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Writes the JSON, Markdown and PNG files; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{NAME}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(results))
    plot(results, paths["png"])
    return paths
