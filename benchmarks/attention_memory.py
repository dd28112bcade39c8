"""Peak memory and speed of tree attention: blockwise (jaxpo default) vs. dense ``[S, S]``.

    JAX_PLATFORMS=cpu python benchmarks/attention_memory.py          # S = 2k, 8k, 16k
    JAX_PLATFORMS=cpu python benchmarks/attention_memory.py --seqs 2048 \
        --time-cases attention,layer

One forward + backward of ``loss = Σ out * w`` on one packed row (batch 1) of length S holding
four preference pairs (prompt, then chosen and rejected as sibling branches) and a little
padding, at 7B width: hidden 4096, 32 query heads, 8 key/value heads, head width 128. Case
``attention``: the attention function itself (gradients w.r.t. q, k, v); case ``layer``: a
:class:`jaxpo.models.attention.Attention` layer with its projections and RoPE (gradients w.r.t.
the input and all its parameters). ``dense`` is the reference path (``[1, S, S]`` mask,
``[1, H, S, S]`` fp32 scores); ``blockwise`` is :mod:`jaxpo.models.blockwise_attention`.

Peak memory is XLA's compiled memory analysis (temp + argument + output bytes), at full width
for every S (compiling is enough; dense at 16k needs far more memory than this machine has).
Time (case ``attention`` unless ``--time-cases`` says more) is the median wall of a few runs
after a warm-up, measured for both variants at the same number of heads: the full 32/8 where
the dense step fits in ``--time-budget-gib``, else the widest of 16/4, 8/2, 4/1 that fits (the
row says which), and only up to ``--time-max-seq``.
The Pallas path is not measured here: on CPU it runs in interpret mode, which says nothing
about the kernel. Results go to ``benchmarks/results/attention_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled
from jaxpo.models.attention import Attention, TreeLayout, tree_attention
from jaxpo.models.config import ModelConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 4096, 32, 8, 128
NARROWER = ((16, 4), (8, 2), (4, 1))  # head counts tried for timing when 32/8 does not fit
TARGETS = {"memory_seq": 16384, "memory_ratio": 0.10, "time_seq": 2048, "time_ratio": 1.5}


def tree_row(seq: int, pairs: int = 4) -> dict[str, np.ndarray]:
    """One packed row ``[1, S]``: ``pairs`` groups of prompt (40%) + chosen + rejected (30% each,
    siblings that never see each other), then S/32 padding tokens."""
    out = {name: np.zeros((1, seq), np.int32)
           for name in ("positions", "segment", "node_pre", "node_last")}
    bounds = np.linspace(0, seq - seq // 32, pairs + 1).astype(int)
    for g in range(pairs):
        start, end = bounds[g], bounds[g + 1]
        prompt = (end - start) * 2 // 5
        chosen = (end - start - prompt) // 2
        spans = [(start, start + prompt, 0), (start + prompt, start + prompt + chosen, prompt),
                 (start + prompt + chosen, end, prompt)]
        for node, (a, b, depth) in enumerate(spans):  # preorder: prompt, chosen, rejected
            out["positions"][0, a:b] = depth + np.arange(b - a)
            out["segment"][0, a:b] = g + 1
            out["node_pre"][0, a:b] = 3 * g + node
            out["node_last"][0, a:b] = 3 * g + (2 if node == 0 else node)
    return out


def model_config(variant: str, heads: int, kv_heads: int, block: int) -> ModelConfig:
    return ModelConfig(vocab_size=8, hidden_size=HIDDEN, intermediate_size=8, num_layers=1,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM,
                       attention=variant, attention_block=block)


def attention_case(cfg: ModelConfig, seq: int, concrete: bool):
    """The attention function: q ``[1, S, H, hd]``, k/v ``[1, S, K, hd]`` -> grads of q, k, v."""
    row = tree_row(seq)
    layout = TreeLayout(*(jnp.asarray(row[n]) for n in ("segment", "node_pre", "node_last")))
    real = layout.segment[..., None, None] != 0  # [1, S, 1, 1]

    def loss(q, k, v, w):
        out = tree_attention(q, k, v, layout, cfg)  # [1, S, H, hd]
        return jnp.sum(jnp.where(real, out, 0.0) * w)

    shapes = [(1, seq, h, HEAD_DIM) for h in (cfg.num_heads, cfg.num_kv_heads,
                                              cfg.num_kv_heads, cfg.num_heads)]
    args = _arrays(shapes, concrete)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), args


def layer_case(cfg: ModelConfig, seq: int, concrete: bool):
    """An Attention layer: x ``[1, S, D]`` -> grads of x and the q/k/v/o projections."""
    from flax import nnx

    row = tree_row(seq)
    layout = TreeLayout(*(jnp.asarray(row[n]) for n in ("segment", "node_pre", "node_last")))
    positions = jnp.asarray(row["positions"])
    real = layout.segment[..., None] != 0  # [1, S, 1]

    def make():
        return Attention(cfg, rngs=nnx.Rngs(0))

    graphdef, params = nnx.split(make() if concrete else nnx.eval_shape(make))

    def loss(params, x, w):
        y, _ = nnx.merge(graphdef, params)(x, positions, layout)  # [1, S, D]
        return jnp.sum(jnp.where(real, y, 0.0) * w)

    args = [params, *_arrays([(1, seq, HIDDEN)] * 2, concrete)]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), args


CASES = {"attention": attention_case, "layer": layer_case}


def _arrays(shapes, concrete: bool):
    if not concrete:
        return [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]


def peak_bytes(step, args) -> tuple[dict, object]:
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    out = {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    return out, compiled


def seconds(compiled, args, repeats: int) -> tuple[float, float, float]:
    """Loss value, median wall and median process-CPU seconds."""
    value = float(jax.block_until_ready(compiled(*args))[0])  # warm up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return value, statistics.median(wall), statistics.median(cpu)


def memory_rows(case: str, seq: int, block: int) -> list[dict]:
    rows = []
    for variant in ("dense", "blockwise"):
        step, args = CASES[case](model_config(variant, HEADS, KV_HEADS, block), seq, False)
        mem, _ = peak_bytes(step, args)
        rows.append({"case": case, "seq": seq, "variant": variant, "heads": HEADS,
                     "kv_heads": KV_HEADS, "block": block if variant == "blockwise" else None,
                     **mem})
    rows[1]["peak_vs_dense"] = rows[1]["peak_bytes"] / rows[0]["peak_bytes"]
    return rows


def time_rows(case: str, seq: int, block: int, budget: float, repeats: int) -> list[dict]:
    """Both variants timed at the widest head count whose dense step fits in ``budget`` bytes."""
    for heads, kv_heads in ((HEADS, KV_HEADS), *NARROWER):
        step, args = CASES[case](model_config("dense", heads, kv_heads, block), seq, False)
        dense_peak = peak_bytes(step, args)[0]["peak_bytes"]
        if dense_peak <= budget:
            break
    else:
        print(f"  {case} S={seq}: not timed, dense needs {dense_peak / 2**30:.1f} GiB even at "
              f"{heads}/{kv_heads} heads", flush=True)
        return []
    rows, values = [], []
    for variant in ("dense", "blockwise"):
        step, args = CASES[case](model_config(variant, heads, kv_heads, block), seq, True)
        mem, compiled = peak_bytes(step, args)
        value, wall, cpu = seconds(compiled, args, repeats)
        values.append(value)
        rows.append({"case": case, "seq": seq, "variant": variant, "heads": heads,
                     "kv_heads": kv_heads, "block": block if variant == "blockwise" else None,
                     **mem, "seconds": wall, "cpu_seconds": cpu})
        del compiled, step, args
    assert abs(values[1] - values[0]) <= 1e-4 * abs(values[0]) + 1e-3, values  # same loss
    rows[1]["time_vs_dense"] = rows[1]["seconds"] / rows[0]["seconds"]
    rows[1]["cpu_time_vs_dense"] = rows[1]["cpu_seconds"] / rows[0]["cpu_seconds"]
    return rows


def targets(memory: list[dict], timing: list[dict]) -> dict:
    """Whether blockwise meets the issue's targets (case ``attention``), and by how much."""
    def find(rows, seq):
        return next((r for r in rows if r["case"] == "attention" and r["seq"] == seq
                     and r["variant"] == "blockwise"), None)

    out = {}
    for name, rows, key, seq, limit in (
            ("memory", memory, "peak_vs_dense", TARGETS["memory_seq"], TARGETS["memory_ratio"]),
            ("time", timing, "time_vs_dense", TARGETS["time_seq"], TARGETS["time_ratio"])):
        row = find(rows, seq)
        if row is None:
            out[name] = {"seq": seq, "limit": limit, "measured": False}
            continue
        ratio = row[key]
        out[name] = {"seq": seq, "limit": limit, "ratio": ratio, "met": ratio <= limit,
                     "margin": limit / ratio if ratio <= limit else None,
                     "miss_by": None if ratio <= limit else ratio / limit}
        if name == "time":
            out[name]["heads"] = row["heads"]
            out[name]["cpu_ratio"] = row["cpu_time_vs_dense"]
    return out


def print_row(r):
    gib = 1 << 30
    timing = (f"{r['seconds']:>8.2f} {r['cpu_seconds']:>8.2f}" if "seconds" in r
              else f"{'-':>8} {'-':>8}")
    ratio = r.get("peak_vs_dense", r.get("time_vs_dense"))
    print(f"{r['case']:>9} {r['seq']:>6} {r['variant']:>9} {r['heads']:>3}/{r['kv_heads']:<2} "
          f"{r['block'] or '-'!s:>5} {r['peak_bytes'] / gib:>9.3f} "
          f"{r['temp_bytes'] / gib:>9.3f} "
          f"{timing} {'' if ratio is None else f'{ratio:.4f}':>9}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="attention,layer", help="attention and/or layer")
    parser.add_argument("--time-cases", default="attention", help="cases that are also timed")
    parser.add_argument("--seqs", default="2048,8192,16384")
    parser.add_argument("--block", type=int, default=ModelConfig.attention_block)
    parser.add_argument("--time-max-seq", type=int, default=8192)
    parser.add_argument("--time-budget-gib", type=float, default=8.0,
                        help="largest dense peak (compiled) that is actually run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS, "attention_memory.json"))
    args = parser.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    result = {
        "benchmark": "attention_memory",
        "what": "forward+backward of sum(attention(...) * w), batch 1, one packed row of 4 "
                "pairs (prompt + 2 sibling responses) and S/32 padding; hidden 4096, head_dim "
                "128; case attention: gradients w.r.t. q, k, v; case layer: an Attention layer, "
                "gradients w.r.t. input and parameters",
        "peak": "XLA compiled memory analysis: temp + argument + output bytes, 32/8 heads",
        "time": f"median wall (seconds) and process CPU (cpu_seconds) of {args.repeats} runs "
                f"after a warm-up; both variants at the heads in the row (32/8 unless dense "
                f"needs more than {args.time_budget_gib} GiB, then fewer); S <= "
                f"{args.time_max_seq}",
        "target": "blockwise peak <= 0.10 x dense at S=16384; blockwise time <= 1.5 x dense at "
                  "S=2048 (case attention)",
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "memory": [],
        "timing": [],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    def write():  # after every step, so an interrupted run keeps what it measured
        result["targets"] = targets(result["memory"], result["timing"])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    print(f"{'case':>9} {'S':>6} {'variant':>9} {'H/K':>6} {'block':>5} {'peak GiB':>9} "
          f"{'temp GiB':>9} {'sec':>8} {'cpu s':>8} {'vs dense':>9}")
    for case in args.cases.split(","):
        for seq in seqs:
            for row in memory_rows(case, seq, args.block):
                result["memory"].append(row)
                print_row(row)
            write()
    budget = args.time_budget_gib * 2**30
    for case in args.time_cases.split(","):
        for seq in (s for s in seqs if s <= args.time_max_seq):
            for row in time_rows(case, seq, args.block, budget, args.repeats):
                result["timing"].append(row)
                print_row(row)
            write()
    for name, t in result["targets"].items():
        print(f"target {name}: {t}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
