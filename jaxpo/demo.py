"""The embedded demo: ``jaxpo train`` with no arguments (used by the CLI only).

A tiny decoder learns the bundled synthetic task (``jaxpo.tasks.synthetic``: sort a few letters)
from preference pairs, on a CPU, in a few minutes, as two ordinary runs:

1. ``<workdir>/sft``: an SFT run (``loss.name=sft``) that imitates the chosen responses. They
   come from a noisy base policy with a habit (it often repeats its last letter), so imitation
   learns the habit too;
2. ``<workdir>``: a DPO run that starts from the SFT run's checkpoint
   (``model.init_from=<workdir>/sft``), so the warmed-up weights are also its frozen reference,
   and learns from the preferences that a response without the habit is better.

Before training, after the warm-up and after DPO it measures the mean true reward of greedy
generations on held-out prompts and the held-out preference accuracy of DPO's implicit reward
``β·(log π − log π_ref)`` (ties count one half: a policy equal to its reference scores 0.5),
prints them as a table, and says where the checkpoint, metrics and plot went. These settings
(row lengths, learning rate, steps) are the demo's own: a run with a user's own model, data or
``--config`` never sees them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from jaxpo import config as config_lib
from jaxpo import plot
from jaxpo.bench.measure import Measure
from jaxpo.tasks import synthetic
from jaxpo.train import loop
from jaxpo.train.setup import build_run

# Section overrides of jaxpo.config.Config that make the demo's DPO run.
CONFIG: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny"},
    "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
    "loss": {"name": "dpo", "beta": 0.1},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
    "train": {"steps": 300, "checkpoint_every": 1000, "eval_batches": 16},
}
SFT_STEPS = 400  # updates of the SFT warm-up run
WORKDIR = os.path.join("runs", "default")
MARKER = "before_after.json"  # a workdir holding this is a demo run
NUM_PROMPTS = 128  # held-out prompts for the generation reward
MAX_NEW_TOKENS = 8  # the longest answer is 5 letters + a stutter + EOS
STAGES = ("initial model", "after SFT warm-up", "after DPO")


def configs(workdir: str, overrides: Sequence[str] = (), *, sft_steps: int = SFT_STEPS
            ) -> tuple[config_lib.Config, config_lib.Config]:
    """``(sft config, dpo config)`` of the demo in ``workdir``, with ``overrides`` applied to
    both (the SFT run keeps its own objective, steps and workdir)."""
    data_dir = os.path.join(workdir, "data")
    files = {"train_files": (os.path.join(data_dir, "pair_train.jsonl"),),
             "eval_files": (os.path.join(data_dir, "pair_eval.jsonl"),)}
    base = config_lib.replace(config_lib.Config(), CONFIG)
    base = config_lib.replace(base, {"data": files})
    dpo = config_lib.apply_overrides(base, overrides)
    dpo = config_lib.replace(dpo, {"model": {"init_from": os.path.join(workdir, "sft")}})
    # The warm-up trains the whole model even when the DPO run trains LoRA adapters on it.
    sft = config_lib.replace(dpo, {"model": {"init_from": "", "lora": {"rank": 0}},
                                   "loss": {"name": "sft", "beta": None, "kwargs": "",
                                            "modifier": ""},
                                   "train": {"steps": sft_steps}})
    return sft, dpo


def run(workdir: str, overrides: Sequence[str] = (), *, sft_steps: int = SFT_STEPS,
        progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) the demo in ``workdir`` and measures it before and after.

    Args:
        workdir: the DPO run's directory; the SFT run goes to ``<workdir>/sft``. A demo already
            there is resumed, and the numbers measured before (``<workdir>/before_after.json``)
            are reused.
        overrides: ``--config.section.field=value`` strings for both runs (e.g. fewer steps).
        sft_steps: updates of the SFT warm-up.
        progress: show the progress bars.

    Returns:
        ``{"table": {stage: {"true_reward", "exact", "accuracy"}}, "summary": DPO summary,
        "plot": path or None}``.
    """
    os.makedirs(workdir, exist_ok=True)
    record = os.path.join(workdir, MARKER)
    table = {}
    if os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            table = json.load(f)
    _write_json(record, table)  # marks the workdir as a demo run
    sft_cfg, dpo_cfg = configs(workdir, overrides, sft_steps=sft_steps)
    data_dir = os.path.dirname(dpo_cfg.data.train_files[0])
    if not os.path.exists(dpo_cfg.data.train_files[0]):
        synthetic.write_task(data_dir, "pair", seed=dpo_cfg.train.seed)

    sft_dir = os.path.join(workdir, "sft")
    sft_run = build_run(sft_cfg)
    measure = Measure(sft_run, dpo_cfg, synthetic.true_reward, num_prompts=NUM_PROMPTS,
                      max_new_tokens=MAX_NEW_TOKENS)
    if STAGES[0] not in table:
        params = sft_run.initial_params()
        table[STAGES[0]] = measure(params, params)
    loop.train(sft_cfg, sft_dir, progress=progress)
    if STAGES[1] not in table:
        params, _, _ = loop.load_params(sft_run, sft_dir)
        table[STAGES[1]] = measure(params, params)
    _write_json(record, table)

    summary = loop.train(dpo_cfg, workdir, progress=progress)
    params, ref, _ = loop.load_params(build_run(dpo_cfg), workdir)
    table[STAGES[2]] = measure(params, ref)
    _write_json(record, table)
    plot_path = _plot(workdir)
    print(format_table(table, sft_steps, dpo_cfg.train.steps))
    print(f"checkpoint: {summary['checkpoint_dir']}")
    print(f"metrics:    {summary['metrics_file']} (TensorBoard: {summary['tensorboard_dir']})")
    if plot_path:
        print(f"plot:       {os.path.abspath(plot_path)}")
    return {"table": table, "summary": summary, "plot": plot_path}


def format_table(table: dict[str, dict[str, float]], sft_steps: int | None = None,
                 dpo_steps: int | None = None) -> str:
    """The before/after table as text.

    >>> print(format_table({"after DPO": {"true_reward": 0.9, "exact": 0.5, "accuracy": 0.75}}))
    <BLANKLINE>
    stage                 true reward  exact answers  preference accuracy
    after DPO                   0.900          50.0%                0.750
    """
    header = f"{'stage':<20} {'true reward':>12} {'exact answers':>14} {'preference accuracy':>20}"
    lines = ["", header]
    for stage, row in table.items():
        lines.append(f"{stage:<20} {row['true_reward']:>12.3f} {row['exact']:>14.1%} "
                     f"{row['accuracy']:>20.3f}")
    if sft_steps is not None:
        lines += [
            "",
            (f"true reward: mean over {NUM_PROMPTS} held-out prompts of the fraction of letters "
             "in place in the greedy answer (1 = sorted)."),
            ("preference accuracy: held-out pairs whose chosen response gets the higher implicit "
             "reward β·(log π − log π_ref) (ties count 1/2)."),
            f"({sft_steps} SFT warm-up steps, then {dpo_steps} DPO steps.)",
        ]
    return "\n".join(lines)


def _plot(workdir: str) -> str | None:
    try:
        return plot.plot_metrics(workdir)
    except (OSError, ValueError) as e:  # a missing plot must not fail the run
        print(f"(no plot: {e})")
        return None


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
