"""Train-step speed of the batch layouts with rows sized from a token budget, side by side.

    JAX_PLATFORMS=cpu python benchmarks/layout_throughput.py
    JAX_PLATFORMS=cpu python benchmarks/layout_throughput.py --records 256 --repeats 3

A Llama of about 4.1M parameters (D = 256, 4 layers, 4 query / 2 KV heads of 64, MLP 1024,
``tests/fixtures/data/tokenizer_llama3``'s 400-token vocabulary) and plain-text preference
pairs whose prompt + chosen + rejected is about 130 tokens (prompt ~80, responses ~25 each), 8
pairs per batch at ``max_length=256``. Each variant batches the same records over one epoch
(``make_train_iterator``) and times, in one run and interleaved, the jitted forward + backward
of the policy log-probs (``jaxpo.train.loss_inputs.sequence_logps`` under
``jax.value_and_grad`` over all parameters: the train step without the reference model, the
loss and the optimiser):

- ``padded``: a row of ``max_length`` per response (``R = 2 * NG``);
- ``packed`` / ``share_prefix`` ``(R = NG)``: the config-only shapes, one row per group (the
  default before rows were sized from a token budget);
- ``packed`` / ``share_prefix`` (default): ``jaxpo.data.resolve_batch_shapes`` on the records;
- ``share_prefix rows=2, node_slots=16``: hand-tuned;
- ``share_prefix seq_len=256`` (derived R, N): rows shorter than the longest group
  ``max_length`` allows (511), which every group of this data fits; longer groups would be
  dropped (``groups_dropped_too_long``). Shows what the row length costs (attention is
  quadratic in it).

Reported per variant: the batch shape ``R×S``, real (non-padding) tokens per batch, groups per
batch and the fraction of full batches (all ``NG`` groups; the epoch's last batch excluded),
step time (the fastest of ``--repeats`` interleaved steps; the median is in the JSON), and
speedups over ``padded``: per step, and per group (a batch that carries fewer groups does less
work per step: ``speedup × groups per batch / NG``). Results go to
``benchmarks/results/layout_throughput.json``; ratios, not absolute times, are the point.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from jaxpo.data import make_train_iterator, plan_batch_shapes
from jaxpo.data.batcher import BatchConfig
from jaxpo.data.groups import GroupBuilder
from jaxpo.data.layout import group_units
from jaxpo.data.sources import RecordSource
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models import Transformer
from jaxpo.models.config import ModelConfig
from jaxpo.train.loss_inputs import sequence_logps

RESULTS = os.path.join(ROOT, "benchmarks", "results")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "data", "tokenizer_llama3")
MAX_LENGTH, NG = 256, 8
TEXT = ("the a model answer question data token step value list tree pair prompt reply good "
        "bad better worse first then next last sum add divide result because so and or not "
        "is are was blue green red seven twelve")
# name → DataConfig overrides; "resolve": shapes from the records by plan_batch_shapes.
VARIANTS = {
    "padded": {"layout": "padded"},
    "packed (R = NG)": {"layout": "packed", "rows": NG},
    "packed (default)": {"layout": "packed", "resolve": True},
    "share_prefix (R = NG)": {"layout": "share_prefix", "rows": NG},
    "share_prefix (default)": {"layout": "share_prefix", "resolve": True},
    "share_prefix rows=2, node_slots=16": {"layout": "share_prefix", "rows": 2,
                                           "node_slots": 16},
    "share_prefix seq_len=256 (derived R, N)": {"layout": "share_prefix", "seq_len": 256,
                                                "resolve": True},
}


def write_records(path: str, n: int, seed: int = 0) -> None:
    """Pairs of ~130 tokens: a prompt of 20–32 words (~80 tokens), responses of 5–11 (~25)."""
    rng = np.random.default_rng(seed)
    words = TEXT.split()

    def text(lo, hi):
        return " ".join(rng.choice(words, rng.integers(lo, hi + 1)))

    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": text(20, 32), "chosen": " " + text(5, 11),
                                 "rejected": " " + text(5, 11)}) + "\n" for _ in range(n))


def model_config(vocab_size: int, attention_block: int = 0) -> ModelConfig:
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=1024,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                      max_position_embeddings=1024)
    return cfg.replace(attention_block=attention_block) if attention_block else cfg


def epoch(source, builder, cfg: DataConfig) -> dict:
    """One epoch of batches: the first batch and per-batch statistics."""
    it = make_train_iterator(source, builder, cfg, seed=0, num_epochs=1)
    batches = list(it)
    groups = [int(b["group_mask"].sum()) for b in batches]
    real = [int((b["segment"] > 0).sum()) for b in batches]
    return {"first": batches[0], "batches": len(batches), "groups": groups, "real": real,
            "dropped": it.counters["groups_dropped_too_long"]}


def make_step(graphdef, num_nodes: int):
    """Jitted value and gradient of the policy's summed response log-probs."""

    def loss(params, batch):
        r = sequence_logps(graphdef, params, batch, num_nodes=num_nodes, chunk_size=256)
        return -jnp.sum(jnp.where(batch["response_mask"], r.logps, 0.0))

    return jax.jit(jax.value_and_grad(loss))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--attention-block", type=int, default=0,
                        help="the model's attention_block; 0 = ModelConfig's default")
    parser.add_argument("--out", default=os.path.join(RESULTS, "layout_throughput.json"))
    args = parser.parse_args()

    tokenizer = Tokenizer.from_dir(TOKENIZER)
    base = DataConfig(max_length=MAX_LENGTH, batch_size=NG, max_responses=2, shuffle=True)
    builder = GroupBuilder(tokenizer, base)
    mcfg = model_config(tokenizer.vocab_size, args.attention_block)
    graphdef, params = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(0)))
    results, steps = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pairs.jsonl")
        write_records(path, args.records)
        source = RecordSource(path)
        groups = [builder(source[i]) for i in range(len(source))]
        group_tokens = {layout: [sum(u.num_tokens for u in group_units(g, layout))
                                 for g in groups] for layout in ("packed", "share_prefix")}
        for name, spec in VARIANTS.items():
            spec = dict(spec)
            resolve = spec.pop("resolve", False)
            cfg = dataclasses.replace(base, **spec)
            plan = None
            if resolve:
                plan = plan_batch_shapes(cfg, source, builder)
                cfg = plan.config
            shapes = BatchConfig.from_data_config(cfg)
            stats = epoch(source, builder, cfg)
            batch = {k: jnp.asarray(v) for k, v in stats["first"].items()}
            steps[name] = (make_step(graphdef, shapes.node_slots), batch)
            full = [g == NG for g in stats["groups"][:-1]]
            results.append({
                "variant": name, "layout": cfg.layout, "rows": shapes.num_rows,
                "seq_len": shapes.seq_len, "node_slots": shapes.node_slots,
                "tokens_per_batch": shapes.num_rows * shapes.seq_len,
                "real_tokens_per_batch": round(float(np.mean(stats["real"])), 1),
                "fill": round(float(np.mean(stats["real"])) / (shapes.num_rows
                                                               * shapes.seq_len), 3),
                "batches": stats["batches"],
                "groups_per_batch": round(float(np.mean(stats["groups"])), 2),
                "full_batches": round(float(np.mean(full)), 3),
                "dropped_too_long": stats["dropped"],
                "predicted_full_batches": None if plan is None else round(plan.full_fraction, 3),
            })
        for fn, batch in steps.values():  # compile everything first
            jax.block_until_ready(fn(params, batch))
        times = {name: [] for name in steps}
        for _ in range(args.repeats):  # interleaved, so that load drifts hit all alike
            for name, (fn, batch) in steps.items():
                start = time.perf_counter()
                jax.block_until_ready(fn(params, batch))
                times[name].append(time.perf_counter() - start)

    # The fastest of the interleaved repeats: other load on the machine only adds time.
    padded = min(times["padded"])
    for r in results:
        t = min(times[r["variant"]])
        r["step_ms"] = round(1e3 * t, 1)
        r["step_ms_median"] = round(1e3 * statistics.median(times[r["variant"]]), 1)
        r["speedup"] = round(padded / t, 2)
        r["speedup_per_group"] = round(padded / t * r["groups_per_batch"] / NG, 2)
        r["token_ratio"] = round(results[0]["tokens_per_batch"] / r["tokens_per_batch"], 2)

    header = (f"{'variant':<41}{'R×S':>9}{'N':>4}{'tokens':>8}{'real':>8}{'groups/b':>9}"
              f"{'full':>6}{'step ms':>9}{'speedup':>9}{'per group':>10}")
    print(f"model: {mcfg.num_params() / 1e6:.2f}M parameters; {NG} pairs per batch; group "
          f"tokens (share_prefix) mean {np.mean(group_tokens['share_prefix']):.1f}, "
          f"p90 {np.percentile(group_tokens['share_prefix'], 90):.0f}; "
          f"backend {jax.default_backend()}")
    print(header)
    for r in results:
        shape = f"{r['rows']}×{r['seq_len']}"
        print(f"{r['variant']:<41}{shape:>9}{r['node_slots']:>4}{r['tokens_per_batch']:>8}"
              f"{r['real_tokens_per_batch']:>8}{r['groups_per_batch']:>9}{r['full_batches']:>6}"
              f"{r['step_ms']:>9}{r['speedup']:>9}{r['speedup_per_group']:>10}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {
        "benchmark": "layout_throughput", "records": args.records, "repeats": args.repeats,
        "max_length": MAX_LENGTH, "batch_size": NG,
        "model": {"params": mcfg.num_params(), "hidden_size": mcfg.hidden_size,
                  "num_layers": mcfg.num_layers, "vocab_size": mcfg.vocab_size,
                  "attention": mcfg.attention, "attention_block": mcfg.attention_block},
        "group_tokens": {layout: {"mean": round(float(np.mean(v)), 1),
                                  "p90": float(np.percentile(v, 90)), "max": int(np.max(v))}
                         for layout, v in group_tokens.items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "jax_backend": jax.default_backend()},
        "rows": results}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
