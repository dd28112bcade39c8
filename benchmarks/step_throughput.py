"""Tokens/s and MFU of the train step on a ~36M-parameter Llama, per data layout, on this CPU.

    JAX_PLATFORMS=cpu python benchmarks/step_throughput.py
    JAX_PLATFORMS=cpu python benchmarks/step_throughput.py --steps 3 --layouts share_prefix

The real train step (``Run.train_step``: policy forward + backward, frozen reference forward,
DPO, AdamW update, one ``jax.jit``) of a Llama-family decoder — hidden 512, 8 layers, 8 heads
(head width 64), MLP 1536, vocab 8192, untied, float32, no remat, blockwise attention — on 8
synthetic preference pairs per step (prompts of 80–120 tokens, chosen and rejected of 30–70,
token ids drawn uniformly; the same pairs for every layout), packed by
:func:`jaxpo.data.batcher.pack_groups`: ``padded`` (a row of the longest prompt + response per
response), ``packed`` and ``share_prefix`` (the fewest rows of ``--seq-len`` tokens the pairs
fit in, first fit). A last row repeats ``share_prefix`` with a smaller attention block
(``--small-block``), which skips more of the block pairs that the tree mask hides. Each step is
compiled and run once before timing; time is the median wall of ``--steps`` steps.

Useful tokens are the real (non-padding) tokens of the batch; ``pairs/s`` counts the same 8
pairs for every layout. ``mfu`` = model FLOPs per step / step time / measured peak, where model
FLOPs = ``8·N·T``: ``6·N·T`` policy forward + backward and ``2·N·T`` reference forward, ``N``
the parameters that multiply (all but the input embedding, a gather), ``T`` the real tokens.
``mfu+attn`` adds the attention matmuls of the visible keys, ``16·L·H·hd·Σ_q visible(q)``
(QKᵀ and PV, 3x for the policy's forward + backward, 1x for the reference). ``mfu cpu`` is
``mfu`` per process-CPU second against the matmul's FLOPs per CPU second (less sensitive to a
shared machine; it also forgives serial stretches). ``hfu`` is the matmul FLOPs the step
actually computes (counted from its jaxpr as in ``scale_projection.py``: padding, masked
attention blocks of the causal triangle, recomputation) / time / peak. The peak is measured:
the best of ``--peak-repeats`` runs of a jitted fp32 2048x2048x2048 matmul, before and after
the steps (the larger is used). Results go to ``benchmarks/results/step_throughput.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs uninstalled
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from scale_projection import matmul_flops

from jaxpo.config import Config, replace
from jaxpo.data.batcher import BatchConfig, pack_groups
from jaxpo.data.types import TokenizedGroup
from jaxpo.models.config import ModelConfig
from jaxpo.train import state as state_lib
from jaxpo.train.loss_inputs import BATCH_KEYS
from jaxpo.train.setup import Run, build_run
from jaxpo.train.step import stack

RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODEL = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8,
                    num_heads=8, num_kv_heads=8, head_dim=64, tie_word_embeddings=False)
TARGET = {"layout": "share_prefix", "mfu": 0.50}


def synthetic_pairs(count: int, seed: int, prompt: tuple[int, int], response: tuple[int, int],
                    vocab: int) -> list[TokenizedGroup]:
    """``count`` pairs: a prompt and two responses of lengths drawn uniformly in the ranges."""
    rng = np.random.default_rng(seed)

    def ids(bounds):
        return rng.integers(3, vocab, int(rng.integers(bounds[0], bounds[1] + 1)), np.int32)

    return [TokenizedGroup(id=i, kind="pair", node_tokens=[ids(prompt), ids(response),
                                                           ids(response)],
                           node_parent=[-1, 0, 0], responses=[[1], [2]],
                           scores=np.array([1.0, 0.0], np.float32)) for i in range(count)]


def pack(groups: list[TokenizedGroup], layout: str, seq_len: int) -> tuple[dict, BatchConfig]:
    """The batch of ``groups`` in ``layout``: padded rows of the longest prompt + response, or
    the fewest rows of ``seq_len`` that first-fit packing fits them in."""
    n, k = len(groups), 2
    if layout == "padded":
        longest = max(len(g.node_tokens[0]) + len(g.node_tokens[r]) for g in groups
                      for r in (1, 2))
        cfg = BatchConfig("padded", batch_size=n, seq_len=longest, max_responses=k,
                          node_slots=2)
        return pack_groups(groups, cfg), cfg
    per_group = 2 * k if layout == "packed" else 1 + k  # node slots of one pair
    for rows in range(1, n + 1):
        cfg = BatchConfig(layout, batch_size=n, seq_len=seq_len, max_responses=k,
                          node_slots=per_group * n, rows=rows)
        try:
            return pack_groups(groups, cfg), cfg
        except ValueError as e:
            if "no room left" not in str(e):
                raise
    raise ValueError(f"{n} pairs do not fit {n} rows of {seq_len} tokens in {layout}")


def visible_keys(batch: dict) -> int:
    """Σ over real query tokens of the keys each sees (itself and its tree ancestors)."""
    total = 0
    for seg, pre, last in zip(batch["segment"], batch["node_pre"], batch["node_last"]):
        real = seg != 0
        s, p, e = seg[real], pre[real], last[real]
        q = np.arange(len(s))
        vis = ((s[:, None] == s[None, :]) & (q[None, :] <= q[:, None])
               & (p[None, :] <= p[:, None]) & (p[:, None] <= e[None, :]))  # [q, k]
        total += int(vis.sum())
    return total


def with_model(run: Run, model_cfg: ModelConfig, num_nodes: int) -> Run:
    """``run`` with ``model_cfg`` and batches of ``num_nodes`` node slots per row."""
    graphdef, abstract = state_lib.abstract_model(model_cfg)
    logp = dataclasses.replace(run.spec.logp, graphdef=graphdef, num_nodes=num_nodes)
    return dataclasses.replace(
        run, model_cfg=model_cfg, abstract_params=abstract,
        spec=dataclasses.replace(run.spec, logp=logp),
        state_shardings=state_lib.state_shardings(abstract, run.tx, run.mesh, run.rules))


def matmul_peak(size: int, repeats: int) -> tuple[float, float]:
    """Best FLOP/s of a jitted fp32 ``size``³ matmul (after a warm-up): per wall second and per
    process-CPU second (all threads together)."""
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((size, size), np.float32)) for _ in range(2))
    f = jax.jit(jnp.matmul)
    jax.block_until_ready(f(a, b))
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(a, b))
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return 2.0 * size**3 / wall, 2.0 * size**3 / cpu


def time_layout(run: Run, groups, layout: str, seq_len: int, steps: int, params,
                model_cfg: ModelConfig) -> dict:
    batch, cfg = pack(groups, layout, seq_len)
    r = with_model(run, model_cfg, cfg.node_slots)
    host = stack({k: batch[k] for k in BATCH_KEYS})  # one micro-batch: [1, ...]
    device_batch = jax.device_put(host)
    ref = r.reference_params(params)
    state = r.new_state(params)
    step = r.train_step()
    counted = matmul_flops(step.trace(state, ref, device_batch).jaxpr.jaxpr)["total"]
    start = time.perf_counter()
    state, metrics = step(state, ref, device_batch)  # compile + first step
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        state, metrics = step(state, ref, device_batch)
        jax.block_until_ready(metrics)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    loss = float(metrics["loss"])
    assert np.isfinite(loss), loss
    real = int(np.count_nonzero(batch["segment"]))
    unique = sum(len(t) for g in groups for t in g.node_tokens)
    slots = cfg.num_rows * cfg.seq_len
    return {"layout": layout, "attention_block": model_cfg.attention_block,
            "rows": cfg.num_rows, "seq_len": cfg.seq_len, "node_slots": cfg.node_slots,
            "slots": slots, "real_tokens": real, "unique_tokens": unique, "fill": real / slots,
            "visible_keys": visible_keys(batch), "pairs": len(groups),
            "seconds": statistics.median(wall), "cpu_seconds": statistics.median(cpu),
            "all_seconds": wall, "compile_seconds": compile_seconds, "loss": loss,
            "counted_flops": counted}


def flops(row: dict, cfg: ModelConfig) -> tuple[float, float]:
    """``(8·N·T, attention matmul FLOPs)`` of one step."""
    n = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # the input embedding is a gather
    model = 8.0 * n * row["real_tokens"]
    attention = 16.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * row["visible_keys"]
    return model, attention


def print_header():
    print(f"{'layout':>12} {'block':>5} {'R x S':>9} {'fill':>5} {'real tok':>8} {'sec/step':>8} "
          f"{'cpu s':>6} {'tok/s':>6} {'pairs/s':>7} {'GFLOP/s':>7} {'mfu':>6} {'mfu cpu':>7} "
          f"{'mfu+attn':>8} {'hfu':>6}", flush=True)


def print_row(r: dict):
    shape = f"{r['rows']}x{r['seq_len']}"
    print(f"{r['layout']:>12} {r['attention_block']:>5} {shape:>9} {r['fill']:>5.2f} "
          f"{r['real_tokens']:>8} {r['seconds']:>8.2f} {r['cpu_seconds']:>6.2f} "
          f"{r['tokens_per_sec']:>6.0f} "
          f"{r['pairs_per_sec']:>7.3f} {r['model_flops_per_sec'] / 1e9:>7.1f} {r['mfu']:>6.3f} "
          f"{r['mfu_cpu']:>7.3f} {r['mfu_with_attention']:>8.3f} {r['hfu']:>6.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", default="padded,packed,share_prefix")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024,
                        help="row length of packed / share_prefix")
    parser.add_argument("--attention-block", type=int, default=MODEL.attention_block,
                        help="blockwise attention block (the model default unless set)")
    parser.add_argument("--small-block", type=int, default=128,
                        help="also time share_prefix with this attention block (0 = no)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per layout")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--peak-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "step_throughput.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    model_cfg = MODEL.replace(attention_block=args.attention_block)
    groups = synthetic_pairs(args.pairs, args.seed, (80, 120), (30, 70), model_cfg.vocab_size)
    config = replace(Config(), {"loss": {"name": "dpo"}, "reference": {"mode": "model"},
                                "mesh": {"data": 1, "fsdp": 1, "tensor": 1}})
    run = with_model(build_run(config), model_cfg, 2)
    params = run.initial_params()
    peaks = [matmul_peak(args.peak_size, args.peak_repeats)]
    print(f"fp32 {args.peak_size}^3 matmul: {peaks[0][0] / 1e9:.1f} GFLOP/s wall, "
          f"{peaks[0][1] / 1e9:.1f} GFLOP per CPU-second ({os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.1f}); model {state_lib.count_params(params) / 1e6:.1f}M "
          f"params", flush=True)
    rows = []
    cases = [(layout, model_cfg) for layout in args.layouts.split(",")]
    if args.small_block and args.small_block != model_cfg.attention_block:
        cases.append(("share_prefix", model_cfg.replace(attention_block=args.small_block)))
    for layout, cfg in cases:
        row = time_layout(run, groups, layout, args.seq_len, args.steps, params, cfg)
        model, attention = flops(row, cfg)
        row |= {"model_flops": model, "attention_flops": attention,
                "tokens_per_sec": row["real_tokens"] / row["seconds"],
                "pairs_per_sec": row["pairs"] / row["seconds"],
                "model_flops_per_sec": model / row["seconds"]}
        rows.append(row)
        print(f"  {layout} (block {cfg.attention_block}): {row['seconds']:.2f} s/step "
              f"(compile + first step "
              f"{row['compile_seconds']:.1f} s)", flush=True)
    peaks.append(matmul_peak(args.peak_size, args.peak_repeats))
    peak, peak_cpu = max(p[0] for p in peaks), max(p[1] for p in peaks)
    print_header()
    for row in rows:
        row["mfu"] = row["model_flops_per_sec"] / peak
        row["mfu_cpu"] = row["model_flops"] / row["cpu_seconds"] / peak_cpu
        row["mfu_with_attention"] = (row["model_flops"] + row["attention_flops"]) / (
            row["seconds"] * peak)
        row["hfu"] = row["counted_flops"] / row["seconds"] / peak
        print_row(row)
    print(f"peak {peak / 1e9:.1f} GFLOP/s wall (before {peaks[0][0] / 1e9:.1f}, after "
          f"{peaks[1][0] / 1e9:.1f}), {peak_cpu / 1e9:.1f} GFLOP per CPU-second")
    target = next((r for r in rows if r["layout"] == TARGET["layout"]
                   and r["attention_block"] == model_cfg.attention_block), None)
    verdict = None
    if target is not None:
        met = target["mfu"] >= TARGET["mfu"]
        verdict = {**TARGET, "measured": target["mfu"], "measured_cpu_time": target["mfu_cpu"],
                   "met": met, "miss_by": None if met else TARGET["mfu"] / target["mfu"]}
        result = "met" if met else f"missed by {TARGET['mfu'] / target['mfu']:.2f}x"
        print(f"target: {TARGET['layout']} mfu >= {TARGET['mfu']}: {target['mfu']:.3f} "
              f"({result}; {target['mfu_cpu']:.3f} per CPU-second)")
    seconds = time.perf_counter() - start
    n = model_cfg.num_params()
    result = {
        "benchmark": "step_throughput",
        "what": "Run.train_step (policy fwd+bwd, reference fwd, DPO, AdamW) on "
                f"{args.pairs} synthetic pairs per step (prompt 80-120, responses 30-70 "
                f"tokens), per layout; median of {args.steps} steps after the compiling first "
                f"one; the last row share_prefix again with attention block {args.small_block}",
        "model": dataclasses.asdict(model_cfg) | {
            "num_params": n, "matmul_params": n - model_cfg.vocab_size * model_cfg.hidden_size},
        "mfu_formula": "8*N*T / seconds / peak; N = params minus the input embedding, T = real "
                       "(non-padding) tokens; mfu_cpu: the same per process-CPU second "
                       "against the matmul's FLOP per CPU-second; mfu_with_attention adds "
                       "16*L*H*hd*sum_q visible(q); hfu: matmul FLOPs the step computes "
                       "(counted from its jaxpr: padding, masked attention blocks, recompute) "
                       "/ seconds / peak",
        "peak": f"best of {args.peak_repeats} jitted fp32 {args.peak_size}^3 matmuls, "
                "before and after the steps; the larger is used",
        "peak_flops": peak, "peak_flops_per_cpu_second": peak_cpu,
        "peaks": [{"wall": w, "per_cpu_second": c} for w, c in peaks],
        "target": verdict,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "seconds": seconds,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
