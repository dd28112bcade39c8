"""The embedded default run: ``jaxpo train`` with no arguments.

A tiny decoder learns the bundled synthetic task (``jaxpo.tasks.synthetic``: sort a few letters)
from preference pairs, on a CPU, in a few minutes:

1. the pair task's train and held-out splits are written into ``<workdir>/data``;
2. a short SFT warm-up imitates the chosen responses. They come from a noisy base policy with a
   habit (it often repeats its last letter), so imitation learns the habit too;
3. DPO, with the warmed-up policy as the frozen reference, learns from the preferences that a
   response without the habit is better.

Before training, after the warm-up and after DPO it measures the mean true reward of greedy
generations on held-out prompts and the held-out preference accuracy of DPO's implicit reward
``β·(log π − log π_ref)`` (ties count one half: a policy equal to its reference scores 0.5),
prints them as a table, and says where the checkpoint, metrics and plot went.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Section overrides of jaxpo.train.config.Config that make the embedded default.
CONFIG: dict[str, dict[str, Any]] = {
    "model": {"preset": "tiny"},
    "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
    "loss": {"name": "dpo", "beta": 0.1},
    "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
    "train": {"steps": 300, "sft_warmup_steps": 400, "checkpoint_every": 1000,
              "eval_batches": 16},
}
WORKDIR = os.path.join("runs", "default")
NUM_PROMPTS = 128  # held-out prompts for the generation reward
MAX_NEW_TOKENS = 8  # the longest answer is 5 letters + a stutter + EOS
STAGES = ("initial model", "after SFT warm-up", "after DPO")


def new_workdir(base: str = WORKDIR) -> str:
    """``base``, or ``base-2``, ``base-3``, ... : the first that does not exist yet."""
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def run(config: Any, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Trains the embedded default in ``workdir`` and measures it before and after.

    Args:
        config: a :class:`jaxpo.train.config.Config` on the synthetic pair task (the default
            config, possibly with overrides such as fewer steps).
        workdir: the run directory; a run already there is resumed, and the numbers measured
            before it (``<workdir>/before_after.json``) are reused.
        progress: show the progress bars.

    Returns:
        ``{"table": {stage: {"true_reward", "exact", "accuracy"}}, "summary": train summary,
        "plot": path or None}``.
    """
    from jaxpo.train import config as config_lib
    from jaxpo.train import inputs, loop
    from jaxpo.train.setup import build_run

    os.makedirs(workdir, exist_ok=True)
    record = os.path.join(workdir, "before_after.json")
    table = {}
    if os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            table = json.load(f)
    run_ = build_run(config)
    _, eval_files = inputs.data_files(config, workdir)
    measure = _Measure(run_, eval_files)

    if STAGES[0] not in table:
        params = run_.initial_params()
        table[STAGES[0]] = measure(params, params)
    if config.train.sft_warmup_steps and STAGES[1] not in table:
        warmup = config_lib.replace(config, {"train": {"steps": 0}})
        loop.train(warmup, workdir, progress=progress)
        params, _, _ = loop.load_params(run_, workdir)
        table[STAGES[1]] = measure(params, params)
    _write_json(record, table)

    summary = loop.train(config, workdir, progress=progress)
    params, ref, _ = loop.load_params(run_, workdir)
    table[STAGES[2]] = measure(params, ref)
    _write_json(record, table)
    plot_path = _plot(workdir)
    print(format_table(table, config.train))
    print(f"checkpoint: {summary['checkpoint_dir']}")
    print(f"metrics:    {summary['metrics_file']} (TensorBoard: {summary['tensorboard_dir']})")
    if plot_path:
        print(f"plot:       {os.path.abspath(plot_path)}")
    return {"table": table, "summary": summary, "plot": plot_path}


def format_table(table: dict[str, dict[str, float]], train_cfg: Any = None) -> str:
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
    if train_cfg is not None:
        lines += [
            "",
            (f"true reward: mean over {NUM_PROMPTS} held-out prompts of the fraction of letters "
             "in place in the greedy answer (1 = sorted)."),
            ("preference accuracy: held-out pairs whose chosen response gets the higher implicit "
             "reward β·(log π − log π_ref) (ties count 1/2)."),
            f"({train_cfg.sft_warmup_steps} SFT warm-up steps, then {train_cfg.steps} DPO steps.)",
        ]
    return "\n".join(lines)


class _Measure:
    """``measure(params, ref_params) -> {"true_reward", "exact", "accuracy"}`` on held-out data."""

    def __init__(self, run: Any, eval_files: tuple[str, ...]):
        from jaxpo.tasks import synthetic

        self.run = run
        self.prompts = []
        for path in eval_files:
            with open(path, encoding="utf-8") as f:
                self.prompts += [json.loads(line)["prompt"] for line in f if line.strip()]
        self.prompts = self.prompts[:NUM_PROMPTS]
        tok = run.tokenizer
        ids = [tok.encode(p) for p in self.prompts]
        width = max(map(len, ids))
        self.tokens = np.full((len(ids), width), tok.eos_id or 0, np.int32)  # left-padded
        self.mask = np.zeros((len(ids), width), bool)
        for i, row in enumerate(ids):
            self.tokens[i, width - len(row):] = row
            self.mask[i, width - len(row):] = True
        self.reward = synthetic.true_reward
        self.eval_files = eval_files
        from jaxpo.train import step as step_lib

        self.logps = jax.jit(lambda p, b: step_lib.sequence_logps(
            run.graphdef, p, b, num_nodes=run.num_nodes,
            chunk_size=run.config.model.logprob_chunk_size).logps)  # [NG, K]

    def __call__(self, params: Any, ref_params: Any) -> dict[str, float]:
        rewards = self._generation_rewards(params)
        return {"true_reward": float(np.mean(rewards)), "exact": float(np.mean(rewards == 1.0)),
                "accuracy": self._accuracy(params, ref_params)}

    def _generation_rewards(self, params: Any) -> np.ndarray:
        from flax import nnx

        from jaxpo.models import generate

        tok = self.run.tokenizer
        model = nnx.merge(self.run.graphdef, params)
        out = generate(model, self.tokens, self.mask, max_new_tokens=MAX_NEW_TOKENS,
                       eos_token_id=tok.eos_id)
        tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
        texts = [tok.decode(row[m]) for row, m in zip(tokens, mask)]
        return np.array([self.reward(p, t) for p, t in zip(self.prompts, texts)])

    def _accuracy(self, params: Any, ref_params: Any) -> float:
        from jaxpo.train import inputs
        from jaxpo.train import step as step_lib

        run, fn = self.run, self.logps
        builder = inputs.group_builder(run.config, run.tokenizer)
        wins, total = 0.0, 0
        for batch in inputs.eval_iterator(run.config, self.eval_files, builder):
            batch = {k: jnp.asarray(batch[k]) for k in step_lib.BATCH_KEYS}
            margin = fn(params, batch) - fn(ref_params, batch)  # [NG, K]
            diff = np.asarray(margin[:, 0] - margin[:, 1])  # chosen − rejected, [NG]
            valid = np.asarray(batch["group_mask"] & batch["response_mask"].all(-1))
            wins += float(np.sum(np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))[valid]))
            total += int(valid.sum())
        return wins / max(total, 1)


def _plot(workdir: str) -> str | None:
    try:
        from jaxpo import plot

        return plot.plot_metrics(workdir)
    except (OSError, ValueError, ImportError) as e:  # a missing plot must not fail the run
        print(f"(no plot: {e})")
        return None


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
