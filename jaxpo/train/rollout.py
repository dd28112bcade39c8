"""On-policy preference data: the policy samples, a reward source scores, the scores make groups.

A run with ``rollout.enabled`` trains on rounds of its own samples (docs/onpolicy.md)::

    round r, due before update r * rollout.every:
      prompts   rollout.prompts_per_rollout prompts, walked in a seeded order per epoch
      sample    rollout.num_samples (K) responses per prompt from the current policy
                (jaxpo.train.sampler: the jitted KV-cache generator on the run's mesh with the
                sharded params, compiled once per run), PRNG key fold_in(key(train.seed), r)
      score     the reward source (rollout.reward): task | module:function | rm:<path>
      build     records, the same dicts a data file holds: pairs (best vs worst sample, ties
                dropped and counted), lists (the distinct samples with their rewards) or
                trees (samples sharing leading words share steps)
      reference with rollout.refresh_reference, the current policy's log-probs of the round's
                records become their precomputed reference (iterative DPO), and those of the
                held-out records the reference their evaluation reads during the round
      train     rollout.every updates on batches of the round's records, through the same
                GroupBuilder, packing and train step as data files

:class:`RolloutIterator` is the run's data iterator: its state, saved in every checkpoint,
holds the round number, the round's samples, rewards and records (with their reference
log-probs) and the position in the round's batches, so a resumed run continues exactly.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np

from jaxpo.config import Config, replace
from jaxpo.data import make_eval_iterator, make_train_iterator
from jaxpo.data.errors import Where
from jaxpo.data.sources import RawRecord
from jaxpo.tasks import synthetic
from jaxpo.train import inputs
from jaxpo.train.loss_inputs import BATCH_KEYS, sequence_logps
from jaxpo.train.reference import fill_table
from jaxpo.train.reward_model import load_scorer
from jaxpo.train.sampler import Sampler, host_value
from jaxpo.train.setup import Run, build_objective

# (prompts [n], responses [n]) -> float32 rewards [n]
RewardFn = Callable[[Sequence[Any], Sequence[str]], np.ndarray]
KIND_OF_BUILD = {"pairs": "pair", "lists": "list", "trees": "tree"}
LOGGED_PROMPTS = 4  # prompts whose samples are logged at each evaluation
MAX_ATTEMPTS = 8  # re-samples of a round whose prompts all got tied rewards


# ----------------------------------------------------------------------------- config


def resolve(config: Config) -> Config:
    """The config an on-policy run trains with (unchanged when ``rollout.enabled`` is off).

    - ``data.format`` becomes the kind ``rollout.build`` makes (``pair``, ``list``, ``tree``);
    - with ``rollout.refresh_reference`` the reference is the policy at the start of each
      round: the rollout computes its log-probs of the round's records, which the run reads as
      a precomputed reference (``reference.mode=precomputed`` without a cache dir), so no
      second copy of the weights is kept or checkpointed;
    - the rows of a batch (``data.rows``), unless given, hold one group each: the generated
      lengths are unknown before the first round, and every group must fit.

    Raises:
      ValueError: naming the fields, when the objective cannot train on what the rollout
        builds or the data shapes cannot hold it.
    """
    r, data = config.rollout, config.data
    if not r.enabled:
        return config
    objective, _ = build_objective(config)
    kind = KIND_OF_BUILD[r.build]
    if kind not in objective.kinds:
        raise ValueError(f"config.rollout.build={r.build!r} makes {kind} groups, but "
                         f"config.loss.name={objective.name!r} trains on "
                         f"{list(objective.kinds)}")
    if data.format not in ("auto", kind):
        raise ValueError(f"config.data.format={data.format!r}, but config.rollout.build="
                         f"{r.build!r} makes {kind} groups; set data.format={kind} (or auto)")
    k = 2 if kind == "pair" else r.num_samples
    if data.max_responses < k:
        raise ValueError(f"config.rollout.num_samples={r.num_samples} responses per {kind}, "
                         f"but config.data.max_responses={data.max_responses}; raise it")
    if kind == "tree" and data.max_steps < 2:
        raise ValueError(f"config.data.max_steps={data.max_steps}: a tree of samples has one "
                         "step per word; set it to the most words a response may have")
    updates: dict[str, dict[str, Any]] = {"data": {"format": kind}}
    if not data.rows and not data.tokens_per_batch:
        updates["data"]["rows"] = data.batch_size
    mode = config.reference.mode
    if objective.needs_reference and r.refreshes_reference:
        if objective.level == "token" or data.max_steps > 1:
            raise ValueError(
                f"config.rollout.refresh_reference keeps the refreshed reference as log-probs "
                f"of whole responses, and config.loss.name={objective.name!r} reads per-token "
                "or per-step (data.max_steps > 1) reference values; set "
                "config.rollout.refresh_reference=false")
        if mode == "none":
            raise ValueError(f"config.loss.name={objective.name!r} needs a reference, but "
                             "config.reference.mode='none'")
        updates["reference"] = {"mode": "precomputed", "cache_dir": ""}
    elif objective.needs_reference and mode == "precomputed":
        raise ValueError(
            "config.reference.mode='precomputed', but sampled responses have no precomputed "
            "log-probs; set config.reference.mode=model (the initial policy) or "
            "config.rollout.refresh_reference=true (the policy at each round)")
    return replace(config, updates)


# ----------------------------------------------------------------------------- rewards


def task_reward(prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
    """The synthetic task's true reward (:func:`jaxpo.tasks.synthetic.true_reward`), ``[n]``."""
    return np.array([synthetic.true_reward(p, r) for p, r in zip(prompts, responses)],
                    np.float32)


def reward_source(spec: str) -> RewardFn:
    """The reward function ``rollout.reward`` names.

    Args:
      spec: ``task``; ``module:function``, a callable ``(prompts, responses) -> rewards``
        importable from the Python path; or ``rm:<path>``, a jaxpo reward model.

    Raises:
      ValueError: naming ``config.rollout.reward``, when it cannot be found.
    """
    if spec == "task":
        return task_reward
    module_name, _, name = spec.partition(":")
    if module_name == "rm":
        if not os.path.isdir(name):
            raise ValueError(f"config.rollout.reward={spec!r}: {name!r} is not a directory (a "
                             "reward model run's workdir or an exported reward model)")
        return _checked(load_scorer(name), spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"config.rollout.reward={spec!r}: cannot import {module_name!r} "
                         f"({e})") from None
    if not hasattr(module, name):
        raise ValueError(f"config.rollout.reward={spec!r}: {module_name} has no function "
                         f"{name!r}")
    return _checked(getattr(module, name), spec)


def _checked(fn: Callable, spec: str) -> RewardFn:
    """``fn`` whose result is checked: n finite numbers for n responses."""

    def rewards(prompts: Sequence[Any], responses: Sequence[str]) -> np.ndarray:
        out = np.asarray(fn(list(prompts), list(responses)), np.float32).reshape(-1)
        if out.shape != (len(responses),) or not np.all(np.isfinite(out)):
            raise ValueError(f"config.rollout.reward={spec!r} returned {out.shape[0]} rewards "
                             f"for {len(responses)} responses, or a non-finite one")
        return out

    return rewards


# ----------------------------------------------------------------------------- groups


def build_records(prompts: Sequence[Any], responses: Sequence[Sequence[str]],
                  rewards: np.ndarray, build: str, *, eos: str = "",
                  max_steps: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Training records from K scored samples per prompt, and the number of prompts dropped.

    Args:
      prompts: ``n`` prompts.
      responses: ``[n][K]`` sampled texts (ending with ``eos`` when the sample ended).
      rewards: ``[n, K]``.
      build: ``pairs``: ``{prompt, chosen, rejected}`` with the best and the worst sample (the
        first of equals); ``lists``: ``{prompt, responses, scores}`` with the distinct
        samples; ``trees``: ``{prompt, responses: [{steps, score}]}``, one step per word, so
        samples that share leading words share tree steps (a sample that is a prefix of
        another, empty, or longer than ``max_steps`` words is left out). A prompt left without
        two different rewards carries no preference and is dropped (counted as a tie).
      eos: the end-of-sequence text (trees leave it to the data path, which closes each leaf).
      max_steps: the deepest tree (``data.max_steps``).

    >>> build_records(["p", "q"], [["a", "b", "c"], ["d", "e", "f"]],
    ...               np.array([[0.5, 1.0, 0.0], [1.0, 1.0, 1.0]]), "pairs")
    ([{'prompt': 'p', 'chosen': 'b', 'rejected': 'c'}], 1)
    """
    records, ties = [], 0
    for prompt, samples, scores in zip(prompts, responses, np.asarray(rewards, np.float64)):
        kept = _distinct(samples, scores, build, eos, max_steps)
        values = [s for _, s in kept]
        if len(set(values)) < 2:
            ties += 1
        elif build == "pairs":
            records.append({"prompt": prompt, "chosen": kept[int(np.argmax(values))][0],
                            "rejected": kept[int(np.argmin(values))][0]})
        elif build == "lists":
            records.append({"prompt": prompt, "responses": [r for r, _ in kept],
                            "scores": values})
        else:
            records.append({"prompt": prompt, "responses": [
                {"steps": steps, "score": s} for steps, s in kept]})
    return records, ties


def _distinct(samples: Sequence[str], scores: np.ndarray, build: str, eos: str,
              max_steps: int) -> list[tuple[Any, float]]:
    """``(response, score)`` of the samples a group can hold: each distinct response once
    (the first), and for trees the word steps of those a tree can hold."""
    seen: dict[Any, float] = {}
    for sample, score in zip(samples, scores.tolist()):
        key = sample
        if build == "trees":
            key = tuple(re.findall(r"\s*\S+", sample.removesuffix(eos)))
            if not key or len(key) > max_steps:
                continue
        seen.setdefault(key, score)
    if build == "trees":  # a leaf cannot also be an inner step
        seen = {k: s for k, s in seen.items()
                if not any(len(o) > len(k) and o[:len(k)] == k for o in seen)}
        return [(list(k), s) for k, s in seen.items()]
    return list(seen.items())


def prompt_pool(config: Config, train_files: Sequence[str]) -> list[Any]:
    """The prompts to sample from: the ``prompt`` field of ``rollout.prompts`` (else of the
    training files: the synthetic task's when ``data.train_files`` is empty)."""
    files = config.rollout.prompts or tuple(train_files)
    source = inputs.source(config, tuple(files))
    out = []
    for i in range(len(source)):
        raw = source[i]
        if raw.error is not None:
            raise raw.error
        if not isinstance(raw.data, dict) or not raw.data.get("prompt"):
            raise ValueError(f"{raw.where}: a rollout prompt record needs a non-empty `prompt` "
                             "field (config.rollout.prompts)")
        out.append(raw.data["prompt"])
    if not out:
        raise ValueError(f"config.rollout.prompts: no prompts in {', '.join(files)}")
    return out


# ----------------------------------------------------------------------------- the iterator


class RolloutIterator(grain.DatasetIterator):
    """The data iterator of an on-policy run (see the module docstring).

    The loop calls :meth:`rollout` with the current params before each update; the update's
    batches come from ``next()``. ``get_state()``/``set_state()`` (JSON) carry the round, its
    samples and records, and the position in its batches.

    Args:
      run: the run, with the config :func:`resolve` returned.
      builder: the training group builder (records -> groups).
      train_files: the run's training files (the prompt pool when ``rollout.prompts`` is
        empty).
      workdir: the run directory; sample texts go to ``<workdir>/rollouts/samples.jsonl``.
    """

    def __init__(self, run: Run, builder: Any, train_files: Sequence[str], workdir: str):
        super().__init__()
        self.run, self.builder, self.workdir = run, builder, workdir
        self.cfg = run.config.rollout
        self.sampler = Sampler(run, prompt_pool(run.config, train_files))
        self.reward_fn = reward_source(self.cfg.reward)
        self.with_ref = run.reference_mode == "precomputed"
        self.logps = jax.jit(lambda p, b: sequence_logps(
            run.graphdef, p, b, num_nodes=run.num_nodes,
            chunk_size=run.config.model.logprob_chunk_size).logps)  # [NG, K]
        self.round, self.samples, self.records = -1, {}, []
        self.eval_source: list[RawRecord] = []  # held-out records (refreshed reference only)
        self.eval_builder = None
        self.eval_table: list[list[float | None]] | None = None  # their round reference
        self.inner = None
        self.last_end = None  # when the previous round's sampling ended (train time after it)

    # The round ---------------------------------------------------------------------------

    def rollout(self, params: Any, update: int) -> dict[str, float]:
        """Samples, scores and builds round ``update // every`` when ``update`` starts one;
        returns its ``rollout/*`` metrics (empty when no round starts)."""
        if update % self.cfg.every and self.inner is not None:
            return {}
        start = time.perf_counter()
        train_seconds = start - self.last_end if self.last_end is not None else 0.0
        self.round = update // self.cfg.every
        stats = {}
        for attempt in range(MAX_ATTEMPTS):
            stats = self._sample(params, attempt)
            if self.records:
                break
        else:
            raise ValueError(
                f"rollout round {self.round}: every prompt's {self.cfg.num_samples} samples got "
                f"equal rewards, {MAX_ATTEMPTS} times; raise config.rollout.temperature or "
                "config.rollout.num_samples, or check config.rollout.reward")
        if self.with_ref:
            self._attach_reference(params)
            if self.eval_source:
                table = self._logps_table(self.eval_source, self.eval_builder, params)
                self.eval_table = [[None if np.isnan(x) else float(x) for x in row]
                                   for row in table]
        self.inner = self._batches()
        self.last_end = time.perf_counter()
        seconds = self.last_end - start
        return stats | {"rollout/round": float(self.round), "rollout/seconds": seconds,
                        "rollout/train_seconds": train_seconds,
                        "rollout/time_fraction": seconds / max(seconds + train_seconds, 1e-9)}

    def _sample(self, params: Any, attempt: int) -> dict[str, float]:
        cfg, seed = self.cfg, self.run.config.train.seed
        indices = round_prompts(len(self.sampler.pool), cfg.prompts_per_rollout, self.round,
                                seed)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), self.round), attempt)
        samples, tokens = self.sampler(params, indices, key=key, temperature=cfg.temperature,
                                       top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                                       repeats=cfg.num_samples)
        prompts = [self.sampler.pool[i] for i in indices]
        flat_prompts = [p for p in prompts for _ in range(cfg.num_samples)]
        k = cfg.num_samples
        # A reward model reads a response as it was trained on it: with the end-of-sequence
        # token (so an empty answer is still a response); the other sources read the text.
        scored = [full if cfg.reward.startswith("rm:") else text for text, full in samples]
        rewards = self.reward_fn(flat_prompts, scored)
        rewards = rewards.reshape(len(prompts), k)  # [n, K]
        texts = [[text for text, _ in samples[i * k:(i + 1) * k]] for i in range(len(prompts))]
        kept = [[full for _, full in samples[i * k:(i + 1) * k]] for i in range(len(prompts))]
        self.records, ties = build_records(prompts, kept, rewards, cfg.build,
                                           eos=self.run.tokenizer.eos_token or "",
                                           max_steps=self.run.config.data.max_steps)
        self.samples = {"prompts": prompts, "responses": texts, "rewards": rewards.tolist()}
        distinct = np.mean([len(set(r)) > 1 for r in rewards.tolist()])
        return {"rollout/reward_mean": float(rewards.mean()),
                "rollout/reward_max": float(rewards.max(-1).mean()),
                "rollout/distinct_rewards": float(distinct), "rollout/ties": float(ties),
                "rollout/groups": float(len(self.records)), "rollout/tokens": float(tokens),
                "rollout/attempt": float(attempt)}

    def _logps_table(self, source: Sequence[RawRecord], builder: Any, params: Any
                     ) -> np.ndarray:
        """``[len(source), K]`` float32: the policy's log-prob of each record's responses (NaN
        where the record or response is left out)."""
        data = self.run.config.data
        table = np.full((len(source), data.max_responses), np.nan, np.float32)
        for local in make_eval_iterator(source, builder, data):
            logps = host_value(self.logps(params, {k: local[k] for k in BATCH_KEYS}))
            fill_table(table, local, logps)
        return table

    def _attach_reference(self, params: Any) -> None:
        """Writes the policy's log-probs of each record's responses into the record (its
        reference for this round); records the length limits drop are dropped here too."""
        table = self._logps_table(self._source(), self.builder, params)
        self.records = [r for r, row in zip(self.records, table) if _with_reference(r, row)]

    # Held-out evaluation against the round's reference ----------------------------------

    def track_eval(self, source: Sequence[RawRecord], builder: Any) -> None:
        """Keeps the held-out records so that each round (with a refreshed reference) also
        computes their reference log-probs: :meth:`eval_records` hands them to the
        evaluation."""
        self.eval_source, self.eval_builder = list(source), builder

    def eval_records(self) -> list[RawRecord]:
        """The held-out records with the current round's reference log-probs (those the
        length limits leave out are left out); empty before the first round."""
        if self.eval_table is None:
            return []
        out = []
        for raw, row in zip(self.eval_source, self.eval_table):
            if raw.error is not None or not isinstance(raw.data, dict):
                continue
            record = dict(raw.data)
            row = np.asarray([np.nan if x is None else x for x in row], np.float32)
            if _with_reference(record, row):
                out.append(RawRecord(raw.id, record, raw.where))
        return out

    def _source(self) -> list[RawRecord]:
        where = f"<rollout round {self.round}>"
        return [RawRecord(i, r, Where(where, i)) for i, r in enumerate(self.records)]

    def _batches(self):
        seed = int(np.random.SeedSequence([self.run.config.train.seed, self.round])
                   .generate_state(1)[0])
        return make_train_iterator(self._source(), self.builder, self.run.config.data,
                                   seed=seed, with_ref_logps=self.with_ref)

    # Logging ---------------------------------------------------------------------------

    def log_samples(self, step: int, write: Callable[[str], None] | None = None) -> None:
        """Appends the first prompts' samples of the current round with their rewards to
        ``<workdir>/rollouts/samples.jsonl`` (and one line per prompt to ``write``)."""
        if not self.samples or jax.process_index() != 0:
            return
        s = self.samples
        rows = [{"step": step, "round": self.round, "prompt": p, "responses": r, "rewards": w}
                for p, r, w in list(zip(s["prompts"], s["responses"], s["rewards"]))
                [:LOGGED_PROMPTS]]
        os.makedirs(os.path.join(self.workdir, "rollouts"), exist_ok=True)
        with open(os.path.join(self.workdir, "rollouts", "samples.jsonl"), "a",
                  encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        if write is not None:
            for row in rows[:2]:
                best = int(np.argmax(row["rewards"]))
                write(f"  sample {row['prompt']!r} -> {row['responses'][best]!r} "
                      f"(reward {row['rewards'][best]:.3g}, mean {np.mean(row['rewards']):.3g})")

    # The grain iterator protocol -------------------------------------------------------

    @property
    def counters(self) -> dict[str, Any]:
        return dict(self.inner.counters) if self.inner is not None else {}

    def __next__(self) -> dict[str, np.ndarray]:
        if self.inner is None:
            raise RuntimeError("RolloutIterator: call rollout(params, update) first")
        return next(self.inner)

    def get_state(self) -> dict[str, Any]:
        return {"round": self.round, "samples": self.samples, "records": self.records,
                "eval_reference": self.eval_table,
                "batches": self.inner.get_state() if self.inner is not None else None}

    def set_state(self, state: dict[str, Any]) -> None:
        self.round, self.samples = int(state["round"]), dict(state["samples"])
        self.records = list(state["records"])
        self.eval_table = state.get("eval_reference")
        self.inner = None
        if state["batches"] is not None:
            self.inner = self._batches()
            self.inner.set_state(state["batches"])


def _with_reference(record: dict[str, Any], row: np.ndarray) -> bool:
    """Writes a pair's ``ref_chosen_logps``/``ref_rejected_logps`` (a list's ``ref_logps``)
    from ``row`` into ``record``; False, leaving it unchanged, when a value is missing or the
    record is of a kind whose reference is not one value per response."""
    if "chosen" in record and "rejected" in record:
        if np.isnan(row[:2]).any():
            return False
        record |= {"ref_chosen_logps": float(row[0]), "ref_rejected_logps": float(row[1])}
        return True
    responses = record.get("responses")
    if not isinstance(responses, list) or not responses or len(responses) > len(row):
        return False
    if "tree" in record or any(isinstance(r, dict) and "steps" in r for r in responses):
        return False
    k = len(responses)
    if np.isnan(row[:k]).any():
        return False
    record["ref_logps"] = [float(x) for x in row[:k]]
    return True


def round_prompts(pool_size: int, n: int, round_: int, seed: int) -> list[int]:
    """Pool indices of round ``round_``'s ``n`` prompts: rounds walk a seeded permutation of
    the pool, a new permutation each pass, so every prompt is used once per pass.

    >>> round_prompts(5, 2, 0, 0) + round_prompts(5, 2, 1, 0) == round_prompts(5, 4, 0, 0)
    True
    """
    perms: dict[int, np.ndarray] = {}
    out = []
    for i in range(round_ * n, (round_ + 1) * n):
        epoch, pos = divmod(i, pool_size)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(pool_size)
        out.append(int(perms[epoch][pos]))
    return out
