"""The training loop, evaluation and reference precomputation: what ``jaxpo train``, ``jaxpo
eval`` and ``jaxpo precompute-ref`` call.

    summary = train(config, workdir)       # resumes from <workdir>/checkpoints when present
    metrics = evaluate(config, workdir)    # the newest checkpoint in workdir
    precompute_reference(config, out_dir)  # for reference.mode=precomputed

A run of ``train.steps`` optimiser updates saves a checkpoint every ``train.checkpoint_every``
updates, at the end, and after the current update when it receives SIGTERM (then
``summary["preempted"]`` is True). Restarting with the same workdir continues from the newest
checkpoint and, on the same devices, produces bitwise the same parameters as a run that was
never interrupted: the state and the data iterator position are restored. A run whose loss or
gradients stay non-finite for ``train.max_skipped_steps`` consecutive updates stops with
:class:`NonFiniteError`, keeping its last good checkpoint.

The host never waits for the device in the steady state: the step is dispatched
asynchronously, the next batch is read, tokenised and packed (grain) while it runs, its metrics
stay on the device until the next log step fetches them, and checkpoints are written in the
background. The train and eval steps are each compiled once per run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import sys
import tempfile
import time
import typing
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxpo.config import Config, differences, from_dict
from jaxpo.data import make_eval_iterator, resolve_batch_shapes
from jaxpo.data.errors import BadRecordError
from jaxpo.data.mismatched import KL_KEYS
from jaxpo.sharding import batch_shardings, make_global_batch
from jaxpo.train import checkpoint as ckpt_lib
from jaxpo.train import inputs
from jaxpo.train import metrics as metrics_lib
from jaxpo.train import reference as ref_lib
from jaxpo.train import rollout as rollout_lib
from jaxpo.train import state as state_lib
from jaxpo.train.loss_inputs import BATCH_KEYS, REFERENCE_KEYS, REWARD_KEYS, sequence_logps
from jaxpo.train.setup import Run, build_run
from jaxpo.train.step import stack


class NonFiniteError(RuntimeError):
    """The loss or gradients were non-finite for ``train.max_skipped_steps`` updates in a row."""


def train(config: Config, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Trains (or resumes training) and returns a summary.

    Args:
      config: the validated :class:`jaxpo.config.Config`.
      workdir: run directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``data/``.
      progress: show the console progress bar.

    Returns:
      ``{"step", "total_steps", "preempted", "resumed_from", "checkpoint_dir",
      "metrics_file", "tensorboard_dir", "skipped_steps", "final": {...last train metrics},
      "eval": {...last eval metrics}}``.

    Raises:
      NonFiniteError: see the module docstring.
    """
    os.makedirs(workdir, exist_ok=True)
    preempted = _Flag()
    with WorkdirLock(workdir), preempted.on_sigterm():  # a SIGTERM during start-up counts too
        return _train(config, workdir, progress, preempted)


def _train(config: Config, workdir: str, progress: bool, preempted: _Flag) -> dict[str, Any]:
    config = rollout_lib.resolve(config)  # an on-policy run's data kind and reference
    train_files, eval_files = inputs.data_files(config, workdir)
    config, run = resolved_run(config, train_files)
    # The initial params, when the reference cache's key needs them, are loaded once: the
    # fresh start below uses the same arrays.
    initial = run.initial_params() if _cache_key_needs_params(run) else None
    builders = _builders(run, train_files, eval_files, initial)
    with_ref = run.reference_mode == "precomputed"
    eval_records = None
    if config.rollout.enabled:  # the policy's own samples (jaxpo.train.rollout)
        it = rollout_lib.RolloutIterator(run, builders["train"], train_files, workdir)
        if with_ref and eval_files:  # the reference is refreshed per round: each round also
            # computes its log-probs of the held-out records, which the evaluation reads
            it.track_eval(inputs.source(config, eval_files), builders["eval"])
            eval_records = it.eval_records
    else:
        it = inputs.train_iterator(config, train_files, builders["train"],
                                   with_ref_logps=with_ref, mismatched_pairs=run.mismatched_pairs)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    state, ref_params, resumed = _start(run, ckpt, it, initial)
    del initial  # the state holds its own copy
    start, total = int(state.step), config.train.steps
    writer = metrics_lib.MetricsWriter(workdir, resume_step=resumed, enabled=_is_main())
    bar = metrics_lib.ProgressBar(total, start, enabled=progress and _is_main())
    logger = _Logger(run, it, writer, bar, start)
    evaluator = (_Evaluator(run, eval_files, builders["eval"], with_ref, records=eval_records)
                 if eval_files else None)
    step_fn, shardings, last_eval = None, None, {}
    keys = _batch_keys(run, with_ref)
    try:
        for update in range(start, total):
            if config.rollout.enabled:  # a new round of samples from the policy, when due
                stats = it.rollout(state.params, update)
                if stats:
                    writer.write(update + 1, stats)
            position = it.get_state()
            try:
                local = stack(*(next(it) for _ in range(config.optim.grad_accum_steps)))
            except BadRecordError as e:
                # Save what was trained so far, at the position before this update, so that
                # a rerun with on_bad_record=skip resumes here.
                it.set_state(position)
                saved = ""
                if update > start and not ckpt.has(update):
                    _save(run, ckpt, state, it)
                    saved = f"progress up to update {update} is saved in {ckpt.directory}; "
                raise ValueError(
                    f"{e} (at update {update + 1}; {saved}rerun with "
                    "--config.data.on_bad_record=skip to skip and count such records, or "
                    "fix the record)") from None
            local = {k: local[k] for k in keys}
            if step_fn is None:
                shardings = _batch_shardings(run, local, micro_axis=True)
                step_fn = run.train_step(shardings)
            batch = make_global_batch(local, run.mesh, shardings)
            state, out = step_fn(state, ref_params, batch)  # dispatched, not waited for
            done = update + 1
            logger.step(done, out, local)  # writes the previous log step's metrics
            if evaluator is not None and _eval_due(config, done) or (
                    done % config.train.checkpoint_every == 0 or done == total
                    or preempted.is_set()):
                logger.flush()
            if _eval_due(config, done) and evaluator is not None:
                last_eval = evaluator(state.params, ref_params)
                writer.write(done, last_eval)
                bar.write(f"step {done}: " + _short(last_eval))
            if _eval_due(config, done) and config.rollout.enabled:
                it.log_samples(done, bar.write)
            if (done % config.train.checkpoint_every == 0 or done == total
                    or preempted.is_set()):
                _save(run, ckpt, state, it)
            if preempted.is_set():
                break
        logger.flush()
    finally:
        bar.close()
        writer.close()
        ckpt.close()  # waits for an asynchronous save to finish
    return {
        "step": int(state.step), "total_steps": total,
        "preempted": preempted.is_set() and int(state.step) < total,
        "resumed_from": resumed, "checkpoint_dir": ckpt.directory,
        "metrics_file": writer.path, "tensorboard_dir": os.path.join(workdir, "tensorboard"),
        "skipped_steps": int(logger.last.get("skipped_steps", 0)), "final": logger.last,
        "eval": last_eval,
    }


def evaluate(config: Config, workdir: str | None = None, *, untrained: bool = False
             ) -> dict[str, Any]:
    """Eval metrics (``eval/``-prefixed) on ``data.eval_files`` (or the synthetic held-out
    split) for the newest checkpoint in ``workdir`` (the untrained model only when asked)."""
    r = config.reference
    if config.rollout.enabled and r.mode == "precomputed" and not r.cache_dir:
        raise ValueError(
            "this on-policy run refreshed its reference every round (config.rollout."
            "refresh_reference), so there is no one reference to evaluate against: its "
            "held-out metrics against each round's reference are the eval/* lines of "
            f"{os.path.join(workdir or '<workdir>', 'metrics.jsonl')}; to evaluate the "
            "checkpoint against the starting model, add --config.reference.mode=model")
    train_files, eval_files = inputs.data_files(config, workdir or tempfile.mkdtemp("jaxpo"))
    if not eval_files:
        raise ValueError("config.data.eval_files is empty: nothing to evaluate on")
    # Batch shapes from the run's own training data, else from what is evaluated.
    config, run = resolved_run(config, train_files if config.data.train_files else eval_files)
    builders = _builders(run, train_files, eval_files)
    params, ref_params, step = load_params(run, workdir, untrained=untrained)
    evaluator = _Evaluator(run, eval_files, builders["eval"],
                           run.reference_mode == "precomputed")
    out = {"step": step, **evaluator(params, ref_params)}
    note = truncation_note(evaluator.counters, config)
    if note:
        print(note, file=sys.stderr)
    return out


def resolved_run(config: Config, train_files: tuple[str, ...]) -> tuple[Config, Run]:
    """The run with its batch shapes fixed from the data (``data.rows``, ``data.node_slots``,
    ``data.tokens_per_batch``: :func:`jaxpo.data.resolve_batch_shapes`, on a sample of the
    training records), and the config that holds them (what checkpoints store)."""
    run = build_run(config)
    builder = inputs.group_builder(config, run.tokenizer, run.label_mapping, run.objective.kinds)
    data = resolve_batch_shapes(config.data, inputs.source(config, train_files), builder,
                                row_multiple=run.mesh.shape["data"] * run.mesh.shape["fsdp"])
    if data == config.data:
        return config, run
    config = dataclasses.replace(config, data=data)
    return config, build_run(config)


def load_params(run: Run, workdir: str | None, *, untrained: bool = False
                ) -> tuple[Any, Any, int]:
    """``(policy params, reference params or None, step)`` of the newest checkpoint in
    ``workdir``. Without a checkpoint, the initial model (step 0) when it is a trained model of
    its own (``model.path`` or ``model.init_from``), else only with ``untrained=True``.

    Raises:
      ValueError: no checkpoint, a randomly initialised model and ``untrained`` False.
    """
    has = workdir and os.path.isdir(os.path.join(workdir, "checkpoints"))
    ckpt = ckpt_lib.Checkpointer(workdir, keep=run.config.train.keep_checkpoints) if has else None
    step = ckpt.latest_step() if ckpt else None
    initial = run.initial_params() if step is None or run.frozen_initial else None
    if step is None:
        if ckpt:
            ckpt.close()
        model = run.config.model
        if not (untrained or model.path or model.init_from):
            where = f"--workdir={workdir}: no checkpoint there (a typo, or a run that never " \
                "saved?)" if workdir else "no --workdir given"
            raise ValueError(f"{where}; the model would be the random init of "
                             f"model.preset={model.preset!r}: pass --untrained to use it anyway")
        if workdir:
            print(f"(no checkpoint in {workdir}: using the initial model)", file=sys.stderr)
        return run.trainable(initial), run.reference_params(initial), 0
    state = ckpt.restore(step, run.abstract_state())
    ckpt.close()
    return state.params, run.reference_params(initial), step


def load_policy(config: Config, workdir: str | None, *, untrained: bool = False):
    """The trained policy as a ``jaxpo.models.Transformer`` (for export and generation)."""
    from flax import nnx

    run = build_run(config)
    params, frozen, step = load_params(run, workdir, untrained=untrained)
    return nnx.merge(run.graphdef, run.spec.logp.policy_params(params, frozen)), step


def precompute_reference(config: Config, out_dir: str, workdir: str | None = None
                         ) -> dict[str, Any]:
    """Computes the reference log-probs of the train and eval files with the initial model and
    writes the cache to ``out_dir`` (see :mod:`jaxpo.train.reference`).

    Returns:
      ``{"dir", "hash", "records": {split: n}}``.
    """
    train_files, eval_files = inputs.data_files(config, workdir or out_dir)
    config, run = resolved_run(config, train_files)
    params = run.initial_params()
    files = {"train": train_files, "eval": eval_files}
    key = ref_lib.cache_key(run.model_cfg, params, inputs.tokenizer_dir(config), config.data,
                            files)

    def logps(p, b):
        with run.spec.rules_context():
            return sequence_logps(run.spec.logp.reference_graphdef, p, b, num_nodes=run.num_nodes,
                                  chunk_size=config.model.logprob_chunk_size).logps

    # Every process reads the same global batches and gets all of the [NG, K] log-probs
    # (replicated), so every process fills the same tables; process 0 writes them.
    fn = jax.jit(logps, out_shardings=NamedSharding(run.mesh, PartitionSpec()))
    builder = inputs.group_builder(config, run.tokenizer, run.label_mapping)
    tables = {}
    for split, paths in files.items():
        if not paths:
            continue
        num_records = len(inputs.source(config, paths))
        table = np.full((num_records, config.data.max_responses), np.nan, np.float32)
        for host in inputs.eval_iterator(config, paths, builder):
            local = {k: host[k] for k in BATCH_KEYS}
            batch = make_global_batch(local, run.mesh, _batch_shardings(run, local))
            ref_lib.fill_table(table, host, np.asarray(jax.device_get(fn(params, batch))))
        tables[split] = table
    if _is_main():
        ref_lib.write_cache(out_dir, key, tables)
    if jax.process_count() > 1:  # the cache exists for every process once this returns
        multihost_utils.sync_global_devices("jaxpo-precompute-reference")
    return {"dir": out_dir, "hash": key["hash"], "records": {k: len(v) for k, v in tables.items()}}


# ----------------------------------------------------------------------------- helpers


def _is_main() -> bool:
    return jax.process_index() == 0


class _Logger:
    """Writes an update's metrics every ``train.log_every`` updates (and at the last one), with
    the throughput since the previous record and the data iterator's counters; stops the run
    when the non-finite streak reaches ``train.max_skipped_steps``. Metrics stay on the device
    until the next log step (or an evaluation, a checkpoint, the end) fetches them."""

    def __init__(self, run: Run, it, writer: metrics_lib.MetricsWriter,
                 bar: metrics_lib.ProgressBar, start: int):
        self.run, self.it, self.writer, self.bar = run, it, writer, bar
        self.num_params = state_lib.count_params(  # the whole model's, for mfu
            run.base_abstract if run.lora else run.abstract_params)
        self.tokens, self.shown, self.t0 = 0, start, time.perf_counter()
        self.last: dict[str, Any] = {}
        self.truncation_reported = False
        self.pending: tuple | None = None
        self.losses: list[float] = []
        self.was_diverging = False

    def _diverging(self, loss: float) -> bool:
        """Whether ``loss`` is over 100 times the median of the last 50 logged losses (and the
        first logged step of such a rise is reported on the console)."""
        history = self.losses[-50:]
        flag = (len(history) >= 5 and np.isfinite(loss)
                and abs(loss) > 100.0 * max(abs(float(np.median(history))), 1e-8))
        if flag and not self.was_diverging:
            self.bar.write(f"warning: the loss ({loss:.4g}) is over 100x its running median "
                           f"({float(np.median(history)):.4g}): the run may be diverging "
                           "(lower optim.learning_rate?)")
        self.was_diverging = flag
        if np.isfinite(loss):
            self.losses.append(loss)
        return flag

    def step(self, done: int, out: dict[str, Any], local: dict[str, Any]) -> None:
        """Counts the update's tokens; on a log step, keeps its (device) metrics to write one
        log step later, so that the host never waits for the update it just dispatched."""
        self.tokens += int(np.count_nonzero(local["segment"]))  # real tokens, global batch
        cfg = self.run.config.train
        if done % cfg.log_every and done != cfg.steps:
            return
        self.flush()
        counters = dict(getattr(self.it, "counters", {}))
        self.pending = (done, out, counters, self.tokens, time.perf_counter())
        self.tokens = 0

    def flush(self) -> None:
        """Writes the kept metrics (waiting for their update if it is still running)."""
        if self.pending is None:
            return
        done, out, counters, tokens, now = self.pending
        self.pending = None
        cfg = self.run.config.train
        out = {k: float(v) for k, v in jax.device_get(out).items()}
        out |= metrics_lib.throughput(
            tokens=tokens, seconds=now - self.t0,
            num_params=self.num_params, peak_flops=cfg.peak_flops,
            num_devices=jax.device_count())
        out |= _data_counters(counters)
        out["diverging"] = float(self._diverging(out.get("loss", float("nan"))))
        note = truncation_note(counters, self.run.config)
        if note and not self.truncation_reported and _is_main():
            self.bar.write(note)
            self.truncation_reported = True
        self.writer.write(done, out)
        self.bar.update(done - self.shown, out)
        self.last, self.shown, self.t0 = out, done, now
        if out.get("nonfinite_streak", 0) >= cfg.max_skipped_steps:
            bad = next((k for k, v in out.items() if not np.isfinite(v)), "grad_norm")
            raise NonFiniteError(
                f"step {done}: {bad} was non-finite for {int(out['nonfinite_streak'])} updates "
                f"in a row (train.max_skipped_steps={cfg.max_skipped_steps}); those updates "
                "were skipped and the last good checkpoint is kept. Lower "
                "optim.learning_rate, check the data and the model weights.")


class WorkdirLock:
    """An exclusive lock on a workdir (``<workdir>/.lock``, taken by process 0): a second run on
    the same workdir fails at once, naming the pid and host of the one holding it."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self.file = None

    def __enter__(self) -> typing.Self:
        if not _is_main():
            return self
        try:
            self.file = open(self.path, "a+", encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot write in the workdir {os.path.dirname(self.path)}: "
                             f"{e.strerror}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(f"{os.path.dirname(self.path)} is in use by another jaxpo run "
                             f"({holder}); wait for it or choose another --workdir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


class _Flag:
    """Set by SIGTERM: the loop saves after the current update and stops."""

    def __init__(self):
        self._set = False

    def is_set(self) -> bool:
        return self._set

    @contextlib.contextmanager
    def on_sigterm(self):
        def handler(signum, frame):
            self._set = True

        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: no handler
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def _cache_key_needs_params(run: Run) -> bool:
    """Whether the run reads a precomputed reference cache (whose key fingerprints the
    initial params)."""
    return run.reference_mode == "precomputed" and bool(run.config.reference.cache_dir)


def _builders(run: Run, train_files, eval_files, initial: Any = None) -> dict[str, Any]:
    """Group builders per split; with a precomputed reference cache they attach its log-probs
    (without a cache dir the records carry them: ``ref_chosen_logps``/``ref_rejected_logps``
    for pairs, ``ref_logps`` for lists and unpaired records). ``initial``: the initial params
    when already loaded (the cache key fingerprints them)."""
    base = inputs.group_builder(run.config, run.tokenizer, run.label_mapping,
                                run.objective.kinds)
    if not _cache_key_needs_params(run):
        return {"train": base, "eval": base}
    cache_dir = run.config.reference.cache_dir
    files = {"train": tuple(train_files), "eval": tuple(eval_files)}
    if initial is None:
        initial = run.initial_params()
    key = ref_lib.cache_key(run.model_cfg, initial, inputs.tokenizer_dir(run.config),
                            run.config.data, files)
    tables = ref_lib.load_cache(cache_dir, key)
    return {split: inputs.WithReference(base, tables[split]) for split in tables}


# Config keys that a resumed run may change without train.allow_config_change.
SAFE_TO_CHANGE = frozenset({
    "train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.eval_every", "train.eval_batches", "train.peak_flops", "train.max_skipped_steps",
    "train.allow_config_change", "data.eval_files", "data.num_workers", "data.on_bad_record",
})


def _start(run: Run, ckpt: ckpt_lib.Checkpointer, it, initial: Any = None
           ) -> tuple[Any, Any, int | None]:
    """``(state, reference params, resumed step or None)``: restored or fresh (from
    ``initial``, the initial params if already loaded). A checkpoint that cannot be read is
    skipped (with a warning naming it) for the one before it."""
    steps = sorted(ckpt.all_steps(), reverse=True)
    if not steps or run.frozen_initial:
        initial = run.initial_params() if initial is None else initial
    else:
        initial = None
    if not steps:
        return run.new_state(run.trainable(initial)), run.reference_params(initial), None
    _check_resumable(run, ckpt, steps[0])
    for step in steps:
        try:
            state = ckpt.restore(step, run.abstract_state(), data=it)
        except ckpt_lib.LegacyCheckpointError:
            raise  # a complete checkpoint: not to be set aside
        except Exception as e:  # noqa: BLE001  (a truncated or corrupt checkpoint, any error)
            aside = ckpt.set_aside(step)
            print(f"warning: checkpoint {ckpt.directory}/{step} cannot be read "
                  f"({type(e).__name__}: {str(e)[:200]}); moved to {aside}, trying the one "
                  "before it", file=sys.stderr)
            continue
        return state, run.reference_params(initial), step
    raise ValueError(f"{ckpt.directory}: none of the checkpoints {steps} can be read")


def _check_resumable(run: Run, ckpt: ckpt_lib.Checkpointer, step: int) -> None:
    """The stored config equals the run's except for :data:`SAFE_TO_CHANGE` keys (or
    ``train.allow_config_change``); else a ValueError lists the differing keys."""
    stored = ckpt.read_json(step, "config")
    if stored is None:
        return
    try:
        old = from_dict(stored)
    except ValueError as e:  # a key this version does not know
        raise ValueError(f"{ckpt.directory}/{step}: its stored config does not load ({e})"
                         ) from None
    changed = {k: v for k, v in differences(old, run.config).items() if k not in SAFE_TO_CHANGE}
    if changed and not run.config.train.allow_config_change:
        lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(
            f"{os.path.dirname(ckpt.directory)} holds a run with another config ({lines}); "
            "resume it with its own config (omit --config to use the stored one), start a new "
            "--workdir, or pass --config.train.allow_config_change=true")


def _save(run: Run, ckpt: ckpt_lib.Checkpointer, state, it) -> None:
    ckpt.save(int(state.step), state, data=it, config=run.config.to_dict(),
              meta={"objective": run.objective.name})


def _batch_shardings(run: Run, local: dict[str, np.ndarray], *, micro_axis: bool = False
                     ) -> dict[str, Any]:
    """Shardings of the global host batch ``local`` (every process holds all of it; rows on
    the leading axis, or on the second after a micro-batch axis)."""
    one = {k: v[0] for k, v in local.items()} if micro_axis else local
    shardings = batch_shardings(one, run.mesh, run.rules)
    if not micro_axis:
        return shardings
    return {k: NamedSharding(run.mesh, PartitionSpec(None, *s.spec))
            for k, s in shardings.items()}


def truncation_note(counters: dict[str, Any], config: Config) -> str | None:
    """One line saying how much the length limits cut (None when nothing was cut).

    >>> from jaxpo.config import Config
    >>> note = truncation_note({"truncated/prompt": 2, "truncated/prompt_tokens": 30,
    ...                         "records_read": 8}, Config())
    >>> note.split(" of ")[0]
    'data: the length limits cut 2 prompts (30 tokens) and 0 responses (0 tokens)'
    """
    prompts, responses = counters.get("truncated/prompt", 0), counters.get("truncated/response", 0)
    if not prompts and not responses:
        return None
    d = config.data
    return (f"data: the length limits cut {prompts} prompts "
            f"({counters.get('truncated/prompt_tokens', 0)} tokens) and {responses} responses "
            f"({counters.get('truncated/response_tokens', 0)} tokens) of "
            f"{counters.get('records_read', 0)} records read (data.max_prompt_length="
            f"{d.max_prompt_length}, data.max_length={d.max_length}); counts in metrics as "
            "data/truncated/*")


def _data_counters(counters: dict[str, Any]) -> dict[str, float]:
    out = {f"data/{k}": float(v) for k, v in counters.items() if k != "batches"}
    out["skipped_records"] = float(counters.get("records_skipped", 0))
    return out


def _batch_keys(run: Run, with_ref: bool) -> tuple[str, ...]:
    """The batch entries the steps read."""
    return (BATCH_KEYS + (REFERENCE_KEYS[:1] if with_ref else ())
            + (KL_KEYS if run.mismatched_pairs else ())
            + (REWARD_KEYS if "rewards" in run.objective.needs else ()))


def _eval_due(config: Config, done: int) -> bool:
    every = config.train.eval_every
    return done == config.train.steps or (every > 0 and done % every == 0)


class _Evaluator:
    """``evaluator(params, ref_params) -> eval metrics`` over up to ``train.eval_batches``
    batches (0: all), with one compiled eval step for the whole run. Aggregated as TRL's
    evaluation does: ``loss`` is the mean over groups (each batch weighted by its groups),
    every other metric the mean over batches of the batch means. ``records``, when given,
    returns the records to evaluate instead of reading ``files`` (an iterative on-policy run's
    held-out records with the round's reference log-probs)."""

    def __init__(self, run: Run, files, builder, with_ref: bool, records=None):
        self.run, self.files, self.builder, self.with_ref = run, files, builder, with_ref
        self.records = records
        self.fn = run.eval_step()
        self.keys = _batch_keys(run, with_ref)

    def __call__(self, params, ref_params) -> dict[str, float]:
        run = self.run
        sums: dict[str, float] = {}
        batches, groups = 0, 0.0
        if self.records is None:
            it = inputs.eval_iterator(run.config, self.files, self.builder,
                                      with_ref_logps=self.with_ref,
                                      mismatched_pairs=run.mismatched_pairs)
        else:
            records = self.records()
            if not records:  # no round yet, or the length limits leave nothing
                self.counters = {}
                return {}
            it = make_eval_iterator(records, self.builder, run.config.data,
                                    with_ref_logps=self.with_ref)
        for i, local in enumerate(it):
            if run.config.train.eval_batches and i >= run.config.train.eval_batches:
                break
            local = {k: local[k] for k in self.keys}
            batch = make_global_batch(local, run.mesh, _batch_shardings(run, local))
            out = {k: float(v) for k, v in jax.device_get(
                self.fn(params, ref_params, batch)).items()}
            n = out.pop("groups")
            if n == 0:
                continue
            groups += n
            batches += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + (v * n if k == "loss" else v)
        self.counters = dict(getattr(it, "counters", {}))
        out = {f"eval/{k}": v / (max(groups, 1.0) if k == "loss" else max(batches, 1))
               for k, v in sums.items()} | {"eval/groups": groups}
        cut = {k: v for k, v in self.counters.items() if k.startswith("truncated/")}
        return out | {f"eval/data/{k}": float(v) for k, v in cut.items()}


def _short(metrics: dict[str, float]) -> str:
    keys = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/accuracy",
            "eval/margin")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
