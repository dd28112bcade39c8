"""Records/s of the data pipeline per layout, beside the time of a tiny-model train step.

    JAX_PLATFORMS=cpu python benchmarks/data_throughput.py              # 50k records
    JAX_PLATFORMS=cpu python benchmarks/data_throughput.py --records 5000 --workers 2

Writes 50k synthetic preference pairs (plain text, a prompt of 20–40 words and two responses
of 5–15) to a JSONL file, then for each layout runs the whole pipeline — JSONL → parse and
validate → tokenise (``tests/fixtures/data/tokenizer_llama3``) → shuffle → pack into
fixed-shape batches — over one epoch and reports records/s; ``pack only`` repeats the packing
stage on groups tokenised beforehand. In the same run it times one forward/backward of a tiny
decoder (``get_preset("tiny")``: 2 layers, D = 64) on a batch of that layout: ``hidden`` +
chunked token log-probs + response sums, gradients w.r.t. all parameters (a stand-in for the
train step, without the optimiser update). ``headroom`` = pipeline records/s ÷ records/s the step
consumes (groups per batch ÷ step time); above 1 the pipeline is not the bottleneck. Results go
to ``benchmarks/results/data_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs uninstalled
from jaxpo.config import DataConfig
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.pipeline import make_train_iterator
from jaxpo.data.sources import RecordSource
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models import Transformer, get_preset
from jaxpo.models.logprobs import response_logps, token_logps

RESULTS = os.path.join(ROOT, "benchmarks", "results")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "data", "tokenizer_llama3")
MAX_LENGTH, NG, N = 256, 16, 8
SHAPES = {  # layout → (seq_len S, rows R); padded has R = NG * K
    "padded": (MAX_LENGTH, None),
    "packed": (2 * MAX_LENGTH, 12),
    "share_prefix": (2 * MAX_LENGTH, 8),
}
TEXT = ("the a model answer question data token step value list tree pair prompt reply good "
        "bad better worse first then next last sum add divide result because so and or not "
        "is are was blue green red seven twelve")


def write_records(path: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(TEXT.split(), rng.integers(lo, hi + 1)))

    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": text(20, 40), "chosen": " " + text(5, 15),
                                 "rejected": " " + text(5, 15)}) + "\n" for _ in range(n))


def data_config(layout: str = "share_prefix", workers: int = 0) -> DataConfig:
    seq_len, rows = SHAPES[layout]
    return DataConfig(layout=layout, max_length=MAX_LENGTH, batch_size=NG, seq_len=seq_len,
                      max_responses=2, node_slots=N, rows=rows or 0, num_workers=workers)


def iterator(source, builder, layout, workers):
    return make_train_iterator(source, builder, data_config(layout, workers), seed=0,
                               num_epochs=1)


def run_pipeline(source, builder, layout, workers):
    """(seconds, first batch, real tokens, token cells, counters) for one epoch."""
    it = iterator(source, builder, layout, workers)
    first, real, cells = None, 0, 0
    start = time.perf_counter()
    for batch in it:
        first = batch if first is None else first
        real += int((batch["segment"] > 0).sum())
        cells += batch["tokens"].size
    seconds = time.perf_counter() - start
    if workers:
        it.close()
    return seconds, first, real, cells, it.counters


def step_seconds(model, batch, repeats):
    """Median seconds of a jitted forward/backward on ``batch``."""

    @nnx.jit
    def step(model, b):
        def loss_fn(model):
            hidden = model.hidden(b["tokens"], b["positions"], b["segment"], b["node_pre"],
                                  b["node_last"])  # [R, S, D]
            lp = token_logps(hidden, model.unembedding(), b["tokens"], b["pred_index"])
            r = response_logps(lp, b["node_slot"], b["pred_index"], b["response_nodes"], N)
            return -jnp.sum(jnp.where(b["response_mask"], r.logps, 0.0))

        return nnx.value_and_grad(loss_fn)(model)

    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    jax.block_until_ready(step(model, arrays))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(model, arrays))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes")
    parser.add_argument("--repeats", type=int, default=5, help="timed train steps")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_dir(TOKENIZER)
    builder = GroupBuilder(tokenizer, data_config())
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size), rngs=nnx.Rngs(0))
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        write_records(path, args.records)
        source = RecordSource(path)
        groups = [g for g in (builder(source[i]) for i in range(len(source))) if g is not None]
        for layout in SHAPES:
            seconds, first, real, cells, counters = run_pipeline(source, builder, layout,
                                                                 args.workers)
            pack_seconds = run_pipeline(groups, None, layout, 0)[0]
            groups_per_batch = counters["groups_packed"] / counters["batches"]
            step = step_seconds(model, first, args.repeats)
            pipeline_rps = counters["records_read"] / seconds
            step_rps = groups_per_batch / step
            rows_out.append({
                "layout": layout, "records": counters["records_read"],
                "batches": counters["batches"], "batch_shape": list(first["tokens"].shape),
                "groups_per_batch": round(groups_per_batch, 2),
                "fill": round(real / cells, 3), "pipeline_records_per_s": round(pipeline_rps, 1),
                "pack_only_records_per_s": round(len(groups) / pack_seconds, 1),
                "step_ms": round(1e3 * step, 2), "step_records_per_s": round(step_rps, 1),
                "headroom": round(pipeline_rps / step_rps, 2),
                "dropped": counters["groups_dropped_too_long"],
                "skipped": counters["records_skipped"]})

    header = (f"{'layout':<13}{'batch R×S':>11}{'groups/b':>9}{'fill':>7}{'pipeline r/s':>14}"
              f"{'pack-only r/s':>15}{'step ms':>9}{'step r/s':>10}{'headroom':>10}")
    print(header)
    for r in rows_out:
        shape = "×".join(map(str, r["batch_shape"]))
        print(f"{r['layout']:<13}{shape:>11}{r['groups_per_batch']:>9}{r['fill']:>7}"
              f"{r['pipeline_records_per_s']:>14}{r['pack_only_records_per_s']:>15}"
              f"{r['step_ms']:>9}{r['step_records_per_s']:>10}{r['headroom']:>10}")
    os.makedirs(RESULTS, exist_ok=True)
    result = {
        "benchmark": "data_throughput", "records": args.records, "workers": args.workers,
        "max_length": MAX_LENGTH, "batch_size": NG, "node_slots": N,
        "model": "tiny (2 layers, D=64)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax_backend": jax.default_backend()},
        "rows": rows_out}
    with open(os.path.join(RESULTS, "data_throughput.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
