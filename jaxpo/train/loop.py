"""The training loop, evaluation and reference precomputation: what ``jaxpo train``, ``jaxpo
eval`` and ``jaxpo precompute-ref`` call.

    summary = train(config, workdir)       # resumes from <workdir>/checkpoints when present
    metrics = evaluate(config, workdir)    # latest checkpoint, else the untrained model
    precompute_reference(config, out_dir)  # for reference.mode=precomputed

A run saves a checkpoint every ``train.checkpoint_every`` step calls, at the end, and after
the current step when it receives SIGTERM (then :func:`train` returns with
``summary["preempted"] = True``). Restarting with the same workdir continues from the newest
checkpoint and, on the same devices, produces bitwise the same parameters as a run that was
never interrupted: the state, the data iterator position and the phase are all restored.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
from typing import Any

import jax
import numpy as np

from jaxpo.data.sources import RecordSource
from jaxpo.sharding import batch_shardings, make_global_batch
from jaxpo.train import checkpoint as ckpt_lib
from jaxpo.train import inputs
from jaxpo.train import metrics as metrics_lib
from jaxpo.train import reference as ref_lib
from jaxpo.train import state as state_lib
from jaxpo.train import step as step_lib
from jaxpo.train.config import to_json_dict
from jaxpo.train.setup import Run, build_run


def train(config: Any, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Trains (or resumes training) and returns a summary.

    Args:
      config: the validated :class:`jaxpo.train.config.Config`.
      workdir: run directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``data/``.
      progress: show the console progress bar.

    Returns:
      ``{"step", "total_steps", "preempted", "resumed_from", "checkpoint_dir",
      "metrics_file", "tensorboard_dir", "final": {...last train metrics},
      "eval": {...last eval metrics}}``.
    """
    os.makedirs(workdir, exist_ok=True)
    run = build_run(config)
    train_files, eval_files = inputs.data_files(config, workdir)
    builder, ref_tables = _builder(run, train_files, eval_files)
    it = inputs.train_iterator(config, train_files, builder["train"],
                               with_ref_logps=ref_tables is not None)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    state, ref_params, resumed = _start(run, ckpt, it)
    start = int(state.step)
    writer = metrics_lib.MetricsWriter(workdir, resume_step=resumed, enabled=_is_main())
    bar = metrics_lib.ProgressBar(run.total_calls, start, enabled=progress and _is_main())
    logger = _Logger(run, it, writer, bar, start)
    preempted = _Flag()
    steps, batch_sh, last_eval = {}, None, {}
    with preempted.on_sigterm():
        for step in range(start, run.total_calls):
            phase = run.phase(step)
            if step == run.sft_calls > 0:
                state, ref_params = _begin_preference(run, state)
            local = next(it)
            batch_sh = batch_sh or _batch_shardings(run, local)
            if phase not in steps:
                steps[phase] = step_lib.TrainStep(run.train_step(phase, batch_sh),
                                                  ref_params if phase == "pref" else None)
            batch = make_global_batch({k: local[k] for k in batch_sh}, run.mesh, batch_sh)
            state, out = steps[phase](state, batch)
            done = step + 1
            logger.step(done, phase, out, local)
            if _eval_due(config, done, run.total_calls) and eval_files:
                params_ref = ref_params if phase == "pref" else state.params
                last_eval = _evaluate(run, state.params, params_ref, eval_files, builder["eval"],
                                      ref_tables is not None)
                writer.write(done, last_eval)
                bar.write(f"step {done}: " + _short(last_eval))
            if (done % config.train.checkpoint_every == 0 or done == run.total_calls
                    or preempted.is_set()):
                _save(run, ckpt, state, ref_params, it)
            if preempted.is_set():
                break
    bar.close()
    writer.close()
    ckpt.close()
    return {
        "step": int(state.step), "total_steps": run.total_calls,
        "preempted": preempted.is_set() and int(state.step) < run.total_calls,
        "resumed_from": resumed, "checkpoint_dir": ckpt.directory,
        "metrics_file": writer.path, "tensorboard_dir": os.path.join(workdir, "tensorboard"),
        "skipped_steps": int(state.skipped), "final": logger.last, "eval": last_eval,
    }


def evaluate(config: Any, workdir: str | None = None) -> dict[str, Any]:
    """Eval metrics (``eval/``-prefixed) on ``data.eval_files`` (or the synthetic held-out
    split) for the newest checkpoint in ``workdir``, else for the untrained model."""
    run = build_run(config)
    train_files, eval_files = inputs.data_files(config, workdir or tempfile.mkdtemp("jaxpo"))
    if not eval_files:
        raise ValueError("config.data.eval_files is empty: nothing to evaluate on")
    builder, ref_tables = _builder(run, train_files, eval_files)
    with_ref = ref_tables is not None
    params, ref_params, step = load_params(run, workdir)
    out = _evaluate(run, params, ref_params, eval_files, builder["eval"], with_ref)
    return {"step": step, **out}


def load_params(run: Run, workdir: str | None) -> tuple[Any, Any, int]:
    """``(policy params, reference params or None, step)`` of the newest checkpoint in
    ``workdir``, or of the untrained model when there is none."""
    ckpt = ckpt_lib.Checkpointer(workdir, keep=run.config.train.keep_checkpoints) if (
        workdir and os.path.isdir(os.path.join(workdir, "checkpoints"))) else None
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        params = run.initial_params()
        ref = state_lib.copy_params(params, run.shardings["pref"].params)
        return params, ref if run.config.reference.mode == "model" else None, 0
    state, ref = _restore(run, ckpt, step)
    ckpt.close()
    if run.config.reference.mode == "model" and ref is None:
        # During the warm-up the policy is its own reference; without one, the initial model.
        ref = state.params if run.sft_calls else run.initial_params()
    return state.params, ref, step


def load_policy(config: Any, workdir: str | None):
    """The trained policy as a ``jaxpo.models.Transformer`` (for export and generation)."""
    from flax import nnx

    run = build_run(config)
    params, _, step = load_params(run, workdir)
    return nnx.merge(run.graphdef, params), step


def precompute_reference(config: Any, out_dir: str, workdir: str | None = None) -> dict[str, Any]:
    """Computes the reference log-probs of the train and eval files with the initial model and
    writes the cache to ``out_dir`` (see :mod:`jaxpo.train.reference`).

    Returns:
      ``{"dir", "hash", "records": {split: n}}``.
    """
    run = build_run(config)
    train_files, eval_files = inputs.data_files(config, workdir or out_dir)
    params = run.initial_params()
    files = {"train": train_files, "eval": eval_files}
    key = ref_lib.cache_key(run.model_cfg, params, inputs.tokenizer_dir(config), config.data,
                            files)
    fn = jax.jit(lambda p, b: step_lib.sequence_logps(
        run.graphdef, p, b, num_nodes=run.num_nodes,
        chunk_size=config.model.logprob_chunk_size).logps)
    builder = inputs.group_builder(config, run.tokenizer)
    tables = {}
    for split, paths in files.items():
        if not paths:
            continue
        it = inputs.eval_iterator(config, paths, builder)
        num_records = len(RecordSource(list(paths)))
        table = np.full((num_records, config.data.max_responses), np.nan, np.float32)
        for local in it:
            keys = step_lib.BATCH_KEYS
            logps = np.asarray(jax.device_get(fn(params, {k: local[k] for k in keys})))
            ref_lib.fill_table(table, local, logps)
        tables[split] = table
    ref_lib.write_cache(out_dir, key, tables)
    return {"dir": out_dir, "hash": key["hash"], "records": {k: len(v) for k, v in tables.items()}}


# ----------------------------------------------------------------------------- helpers


def _is_main() -> bool:
    return jax.process_index() == 0


class _Logger:
    """Writes a step's metrics every ``train.log_every`` steps (and at the last one), with the
    throughput since the previous record and the data iterator's counters."""

    def __init__(self, run: Run, it, writer: metrics_lib.MetricsWriter,
                 bar: metrics_lib.ProgressBar, start: int):
        self.run, self.it, self.writer, self.bar = run, it, writer, bar
        self.num_params = state_lib.count_params(run.abstract_params)
        self.tokens, self.shown, self.t0 = 0, start, time.perf_counter()
        self.last: dict[str, Any] = {}

    def step(self, done: int, phase: str, out: dict[str, Any], local: dict[str, Any]) -> None:
        self.tokens += int(np.count_nonzero(local["segment"]))  # real tokens, this process
        cfg = self.run.config.train
        if done % cfg.log_every and done != self.run.total_calls:
            return
        out = {k: float(v) for k, v in jax.device_get(out).items()}  # waits for the step
        now = time.perf_counter()
        out |= metrics_lib.throughput(
            tokens=self.tokens * jax.process_count(), seconds=now - self.t0,
            num_params=self.num_params, peak_flops=cfg.peak_flops,
            num_devices=jax.device_count())
        out |= _data_counters(self.it)
        out["phase"] = phase
        self.writer.write(done, out)
        self.bar.update(done - self.shown, out, phase)
        self.last, self.tokens, self.shown, self.t0 = out, 0, done, now


class _Flag:
    """Set by SIGTERM: the loop saves after the current step and stops."""

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


def _builder(run: Run, train_files, eval_files) -> tuple[dict[str, Any], Any]:
    """Group builders per split; with a precomputed reference they attach its log-probs."""
    base = inputs.group_builder(run.config, run.tokenizer)
    if run.config.reference.mode != "precomputed":
        return {"train": base, "eval": base}, None
    if not run.config.reference.cache_dir:
        # The records carry the reference log-probs (``ref_chosen_logps``/``ref_rejected_logps``
        # for pairs, ``ref_logps`` for lists and unpaired records).
        return {"train": base, "eval": base}, {}
    params = run.initial_params()
    files = {"train": tuple(train_files), "eval": tuple(eval_files)}
    cache_dir = run.config.reference.cache_dir
    key = ref_lib.cache_key(run.model_cfg, params, inputs.tokenizer_dir(run.config),
                            run.config.data, files)
    tables = ref_lib.load_cache(cache_dir, key)
    out = {split: inputs.WithReference(base, tables[split]) for split in tables}
    return out, tables


def _start(run: Run, ckpt: ckpt_lib.Checkpointer, it) -> tuple[Any, Any, int | None]:
    """``(state, reference params, resumed step or None)``: restored or fresh."""
    step = ckpt.latest_step()
    mode = run.config.reference.mode
    if step is None:
        params = run.initial_params()
        phase = run.phase(0)
        # new_state copies the params into the (donated) state: the originals are the reference.
        ref = params if phase == "pref" and mode == "model" else None
        return run.new_state(params, phase), ref, None
    state, ref = _restore(run, ckpt, step)
    data_state = ckpt.read_json(step, "data")
    if data_state is not None:
        states = data_state["processes"]
        if len(states) != jax.process_count():
            raise ValueError(f"{ckpt.directory}/{step}: saved by {len(states)} processes, "
                             f"resumed by {jax.process_count()}; the data order cannot resume")
        it.set_state(states[jax.process_index()])
    if mode == "model" and run.sft_calls == 0:
        ref = run.initial_params()  # no warm-up: the reference is the initial model
    elif mode == "model" and step > run.sft_calls and ref is None:
        raise ValueError(f"{ckpt.directory}/{step}: the checkpoint has no reference params")
    return state, ref, step


def _restore(run: Run, ckpt: ckpt_lib.Checkpointer, step: int) -> tuple[Any, Any]:
    phase = run.checkpoint_phase(step)
    shardings = run.shardings[phase]
    abstract_state = ckpt_lib.abstract_like(
        jax.eval_shape(lambda p: state_lib.new_state(p, run.tx[phase]), run.abstract_params),
        shardings)
    abstract_ref = ckpt_lib.abstract_like(run.abstract_params, run.shardings["pref"].params)
    restored = ckpt.restore(step, abstract_state, abstract_reference=abstract_ref)
    stored = (restored["config"] or {}).get("model", {})
    current = to_json_dict(run.config)["model"]
    for field in ("preset", "path", "param_dtype"):
        if field in stored and stored[field] != current[field]:
            raise ValueError(f"{ckpt.directory}/{step}: the checkpoint was made with "
                             f"config.model.{field}={stored[field]!r}, not {current[field]!r}")
    return state_lib.TrainState(*restored["state"]), restored["reference"]


def _begin_preference(run: Run, state: state_lib.TrainState):
    """End of the SFT warm-up: the warmed-up policy becomes the reference; a fresh optimizer."""
    # new_state copies the params into the new state: the old buffers become the reference.
    ref = state.params if run.config.reference.mode == "model" else None
    fresh = run.new_state(state.params, "pref")
    return fresh._replace(step=state.step, skipped=state.skipped), ref


def _save(run: Run, ckpt: ckpt_lib.Checkpointer, state, ref_params, it) -> None:
    step = int(state.step)
    keep_ref = ref_params is not None and run.sft_calls > 0 and step > run.sft_calls
    ckpt.save(step, state, reference=ref_params if keep_ref else None, data=_data_states(it),
              config=to_json_dict(run.config),
              meta={"phase": run.checkpoint_phase(step), "skipped": int(state.skipped)})


def _data_states(it) -> dict[str, list]:
    """Every process's iterator state (a JSON item is written by process 0 only)."""
    state = it.get_state()
    if jax.process_count() == 1:
        return {"processes": [state]}
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size])).reshape(-1)  # [P]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    every = multihost_utils.process_allgather(padded)  # [P, L]
    return {"processes": [json.loads(bytes(every[p, :n])) for p, n in enumerate(sizes)]}


def _batch_shardings(run: Run, local: dict[str, np.ndarray]) -> dict[str, Any]:
    keys = [k for k in step_lib.BATCH_KEYS + step_lib.OPTIONAL_KEYS if k in local]
    procs = jax.process_count()
    shapes = {k: jax.ShapeDtypeStruct((local[k].shape[0] * procs, *local[k].shape[1:]),
                                      local[k].dtype) for k in keys}
    return batch_shardings(shapes, run.mesh, run.rules)


def _data_counters(it) -> dict[str, float]:
    counters = getattr(it, "counters", {})
    out = {f"data/{k}": float(v) for k, v in counters.items() if k != "batches"}
    out["skipped_records"] = float(counters.get("records_skipped", 0))
    return out


def _eval_due(config: Any, done: int, total: int) -> bool:
    every = config.train.eval_every
    return done == total or (every > 0 and done % every == 0)


def _evaluate(run: Run, params, ref_params, files, builder, with_ref: bool) -> dict[str, float]:
    """The eval step's metrics over up to ``train.eval_batches`` batches (0: all), aggregated as TRL's
    evaluation does: ``loss`` is the mean over groups (each batch weighted by its groups), every
    other metric the mean over batches of the batch means."""
    fn = run.eval_step()
    sums: dict[str, float] = {}
    batches, groups = 0, 0.0
    it = inputs.eval_iterator(run.config, files, builder, with_ref_logps=with_ref)
    keys = step_lib.BATCH_KEYS + (("ref_logps",) if with_ref else ())
    for i, local in enumerate(it):
        if run.config.train.eval_batches and i >= run.config.train.eval_batches:
            break
        sh = _batch_shardings(run, local)
        batch = make_global_batch({k: local[k] for k in keys}, run.mesh, sh)
        out = {k: float(v) for k, v in jax.device_get(fn(params, ref_params, batch)).items()}
        n = out.pop("groups")
        if n == 0:
            continue
        groups += n
        batches += 1
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + (v * n if k == "loss" else v)
    return {f"eval/{k}": v / (max(groups, 1.0) if k == "loss" else max(batches, 1))
            for k, v in sums.items()} | {"eval/groups": groups}


def _short(metrics: dict[str, float]) -> str:
    keys = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins")
    return ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
