"""What a run writes and shows: ``<workdir>/metrics.jsonl``, TensorBoard events, a progress bar.

``metrics.jsonl`` holds one JSON object per logged step, ``{"step": 10, "loss": 0.61, ...}``,
and one per evaluation with ``eval/``-prefixed names. On a resumed run the file is appended to;
records of steps after the checkpoint that was restored (written before the interruption) are
dropped first, so every step appears once, and a last line cut short by a kill is dropped. A
fresh run never deletes an earlier file: it is moved aside to ``metrics.jsonl.1`` (``.2``, ...).
Only process 0 writes.

>>> throughput(tokens=1000, seconds=2.0, num_params=10, peak_flops=0.0, num_devices=1)
{'tokens_per_sec': 500.0}
>>> throughput(tokens=1000, seconds=2.0, num_params=10, peak_flops=1e5, num_devices=2)["mfu"]
0.15
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import tqdm

# Shown on the progress bar, in this order, under these short names.
BAR_KEYS = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
            ("accuracy", "acc"), ("margin", "margin"))  # the last two: a reward model's


def throughput(*, tokens: int, seconds: float, num_params: int, peak_flops: float,
               num_devices: int) -> dict[str, float]:
    """``tokens_per_sec`` and, when ``peak_flops`` (per device) is known, ``mfu``.

    ``mfu = 6 · params · tokens / seconds / (peak_flops · devices)`` (forward + backward of the
    policy; the reference's forward is not counted).
    """
    out = {"tokens_per_sec": tokens / max(seconds, 1e-9)}
    if peak_flops > 0:
        out["mfu"] = 6.0 * num_params * out["tokens_per_sec"] / (peak_flops * num_devices)
    return out


def _clean(value: Any) -> Any:
    value = float(value) if not isinstance(value, (str, bool, int)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf: "nan", "inf"
    return value


class MetricsWriter:
    """Appends metrics to ``metrics.jsonl`` and TensorBoard event files in ``workdir``.

    Args:
      workdir: the run directory.
      resume_step: the step the run resumes from; records after it are dropped.
      enabled: False on processes other than 0 (nothing is written).
      tensorboard: also write TensorBoard events (``<workdir>/tensorboard``).
    """

    def __init__(self, workdir: str, *, resume_step: int | None = None, enabled: bool = True,
                 tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            _truncate_after(self.path, resume_step)
        elif resume_step is None and os.path.exists(self.path):
            os.rename(self.path, _free_name(self.path))  # a fresh run in a reused directory
        if tensorboard:
            from tensorboardX import SummaryWriter  # local: only when writing

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                     purge_step=resume_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes one record ``{"step": step, **metrics}``."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def _truncate_after(path: str, step: int) -> None:
    """Keeps the records up to ``step``; lines that are not JSON (a line cut by a kill) go."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(json.dumps(record) + "\n")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def _free_name(path: str) -> str:
    n = 1
    while os.path.exists(f"{path}.{n}"):
        n += 1
    return f"{path}.{n}"


class ProgressBar:
    """A console progress bar with the loss, accuracy and margin of the latest logged step."""

    def __init__(self, total: int, initial: int = 0, *, enabled: bool = True):
        # Redrawn a few times a second on a terminal; every 30 s into a log file.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self._bar = tqdm.tqdm(total=total, initial=initial, disable=not enabled,
                              dynamic_ncols=True, file=sys.stderr, unit="step",
                              mininterval=interval, maxinterval=max(interval, 10.0))

    def update(self, steps: int, metrics: Mapping[str, Any] | None = None) -> None:
        if metrics:
            shown = {short: f"{float(metrics[key]):.4g}" for key, short in BAR_KEYS
                     if key in metrics}
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(steps)

    def write(self, text: str) -> None:
        self._bar.write(text)

    def close(self) -> None:
        self._bar.close()
