"""Online (and iterative) DPO vs offline DPO on the same number of preference labels.

    python benchmarks/online_vs_offline.py            # ~10 minutes on a 2-core CPU

All runs start from one SFT warm-up (``configs/sft_tiny.py``) and train the tiny model for
``labels / 16`` updates of 16 pairs on the synthetic sorting task. Per seed, the prompts are
the same ``labels`` prompts for every method:

- offline DPO (``configs/dpo_tiny.py``): the task's pairs of those prompts, one pass; the
  responses come from the task's noisy base policy and the label from its true reward;
- online DPO (``configs/online_dpo_tiny.py``): each update samples 4 responses to 16 of the
  prompts from the current policy and labels best vs worst by the true reward (ties dropped,
  so at most ``labels`` pairs);
- iterative DPO (``configs/iterative_dpo_tiny.py``): 4 rounds, each sampling the next quarter
  of the prompts once, the reference refreshed per round.

The score is the mean true reward of the greedy answers to 200 held-out prompts. Prints a
table and writes ``benchmarks/results/online_vs_offline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxpo.config import load_config
from jaxpo.tasks import synthetic
from jaxpo.train import loop, rollout, sampler
from jaxpo.train.setup import build_run

BATCH = 16  # pairs per update in every method
EVAL_PROMPTS = 200
METHODS = ("offline DPO", "online DPO", "iterative DPO")


def _config(preset: str, overrides: list[str]):
    return load_config(os.path.join(REPO, "configs", preset), overrides)


def _score(config, workdir: str, prompts: list[str]) -> float:
    run = build_run(config)
    params, _, _ = loop.load_params(run, workdir)
    rewards = sampler.greedy_rewards(run, params, prompts, rollout.task_reward,
                                     max_new_tokens=8)
    return float(rewards.mean())


def _labels_used(workdir: str) -> int:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return int(sum(r.get("rollout/groups", 0) for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "online_vs_offline"))
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                      "online_vs_offline.json"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--labels", type=int, default=1600, help="preference pairs per run")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = args.labels // BATCH
    work = args.workdir
    os.makedirs(work, exist_ok=True)

    sft_dir = os.path.join(work, "sft")
    loop.train(_config("sft_tiny.py", []), sft_dir, progress=False)
    held_out = [r["prompt"] for r in synthetic.records("pair", EVAL_PROMPTS, seed=10_000)]
    sft_score = _score(_config("sft_tiny.py", []), sft_dir, held_out)
    print(f"SFT warm-up: greedy true reward {sft_score:.3f}", flush=True)

    results: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in seeds:
        data = os.path.join(work, f"seed{seed}")
        pairs = synthetic.write_jsonl(os.path.join(data, "pairs.jsonl"),
                                      synthetic.records("pair", args.labels, seed=100 + seed))
        common = [f"--config.model.init_from={sft_dir}", f"--config.train.seed={seed}",
                  f"--config.train.steps={steps}", "--config.train.eval_every=0",
                  f"--config.data.train_files={pairs}", "--config.train.checkpoint_every=1000"]
        runs = {
            "offline DPO": ("dpo_tiny.py", []),
            "online DPO": ("online_dpo_tiny.py", [f"--config.rollout.prompts={pairs}",
                                                  f"--config.rollout.prompts_per_rollout={BATCH}",
                                                  "--config.rollout.every=1"]),
            "iterative DPO": ("iterative_dpo_tiny.py", [
                f"--config.rollout.prompts={pairs}", f"--config.rollout.every={steps // 4}",
                f"--config.rollout.prompts_per_rollout={args.labels // 4}"]),
        }
        for method, (preset, extra) in runs.items():
            workdir = os.path.join(data, method.split()[0])
            config = _config(preset, common + extra)
            start = time.perf_counter()
            loop.train(config, workdir, progress=False)
            seconds = time.perf_counter() - start
            labels = args.labels if method == "offline DPO" else _labels_used(workdir)
            score = _score(config, workdir, held_out)
            results[method].append({"seed": seed, "true_reward": score, "labels": labels,
                                    "seconds": round(seconds, 1)})
            print(f"seed {seed} {method:<14} greedy true reward {score:.3f} "
                  f"({labels} labels, {seconds:.0f} s)", flush=True)

    summary = {m: {"mean": statistics.mean(r["true_reward"] for r in rows),
                   "std": statistics.stdev(r["true_reward"] for r in rows) if len(rows) > 1
                   else 0.0} for m, rows in results.items()}
    out = {"sft_true_reward": sft_score, "labels": args.labels, "steps": steps,
           "batch_pairs": BATCH, "eval_prompts": EVAL_PROMPTS, "seeds": seeds,
           "runs": results, "summary": summary}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(format_table(out))


def format_table(out: dict) -> str:
    """The README's table from the JSON this script writes."""
    seeds = out["seeds"]
    lines = [f"| method | {' | '.join(f'seed {s}' for s in seeds)} | mean ± std | labels |",
             "|---|" + "---|" * len(seeds) + "---|---|",
             (f"| SFT warm-up (start) | {' | '.join('' for _ in seeds)} | "
              f"{out['sft_true_reward']:.3f} | 0 |")]
    for method, rows in out["runs"].items():
        s = out["summary"][method]
        labels = max(r["labels"] for r in rows)
        scores = " | ".join(f"{r['true_reward']:.3f}" for r in rows)
        lines.append(f"| {method} | {scores} | {s['mean']:.3f} ± {s['std']:.3f} | ≤ {labels} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
