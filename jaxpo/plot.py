"""``jaxpo plot --workdir=DIR``: PNG curves of a run's ``metrics.jsonl``.

One panel per quantity that the run logged: loss, reward margins, preference accuracy and KL
(``kl`` or any metric whose name contains ``kl``), train and ``eval/`` curves together.
Writes ``<workdir>/plots/metrics.png`` with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import os
from typing import Any

# (panel title, metric names in the train records; eval records use "eval/" + name)
PANELS = (
    ("loss", ("loss",)),
    ("reward margin", ("rewards/margins",)),
    ("preference accuracy", ("rewards/accuracies", "ranking/accuracy")),
)


def read_records(path: str) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` file (malformed lines name the line)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
    return records


def series(records: list[dict[str, Any]], name: str, phase: str | None = None
           ) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of metric ``name`` (non-numeric values skipped), of one ``phase``
    (``sft`` or ``pref``, as logged) when given.

    >>> series([{"step": 1, "loss": 0.5}, {"step": 2, "loss": "nan"}], "loss")
    ([1], [0.5])
    """
    steps, values = [], []
    for r in records:
        if phase is not None and r.get("phase") != phase:
            continue
        value = r.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in r:
            steps.append(int(r["step"]))
            values.append(float(value))
    return steps, values


def _panels(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    names = {k for r in records for k in r}
    out = []
    for title, keys in PANELS:
        present = [n for k in keys for n in (k, f"eval/{k}") if n in names]
        if present:
            out.append((title, present))
    kl = sorted(n for n in names if "kl" in n.lower().split("/")[-1])
    if kl:
        out.append(("KL", kl))
    return out


def plot_metrics(workdir: str, out: str | None = None) -> str:
    """Writes the curves of ``<workdir>/metrics.jsonl`` to a PNG and returns its path.

    Args:
        workdir: the run directory.
        out: the PNG path (default ``<workdir>/plots/metrics.png``).

    Raises:
        FileNotFoundError: when the run has no ``metrics.jsonl``.
        ValueError: when it holds none of the plotted metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (train first: jaxpo train --workdir=...)")
    records = read_records(path)
    panels = _panels(records)
    if not panels:
        raise ValueError(f"{path}: none of loss, rewards/margins, rewards/accuracies, KL found")
    out = out or os.path.join(workdir, "plots", "metrics.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            phases = sorted({r.get("phase") for r in records if name in r}, key=str)
            for phase in phases if len(phases) > 1 else [None]:
                steps, values = series(records, name, phase)
                style = {"marker": "o", "linestyle": "--"} if name.startswith("eval/") else {}
                label = name if phase is None else f"{name} ({phase})"
                ax.plot(steps, values, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
