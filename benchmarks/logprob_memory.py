"""Peak memory and speed of the log-prob loss: chunked (jaxpo) vs. full ``[B, S, V]`` logits.

    JAX_PLATFORMS=cpu python benchmarks/logprob_memory.py            # V = 32k and 128k, S = 2048
    JAX_PLATFORMS=cpu python benchmarks/logprob_memory.py --vocab 32768 --chunk-sizes 128,256

One forward + backward of ``loss = Σ token log-probs`` at batch 1, row length S, width D: case
``head`` from given hidden states (gradients w.r.t. them and the unembedding), case ``decoder``
through a 1-layer :class:`jaxpo.models.Transformer` (gradients w.r.t. all its parameters).
Both variants gather the hidden state at ``pred_index``; ``unchunked`` then forms the full
fp32 logits and a ``log_softmax``, ``chunked`` is :func:`jaxpo.models.logprobs.token_logps`.
Peak memory is XLA's compiled memory analysis (temp + argument + output bytes); time is the
median wall time of a few runs. Both are measured side by side in one run and written to
``benchmarks/results/logprob_memory.json``.
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
from jaxpo.models.logprobs import DEFAULT_CHUNK_SIZE, token_logps

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def unchunked_logps(hidden, unembedding, tokens, pred_index):
    """The plain computation: full fp32 logits ``[B, S, V]``, log_softmax, pick the token."""
    valid = pred_index >= 0
    h = jnp.take_along_axis(hidden, jnp.where(valid, pred_index, 0)[..., None], axis=1)
    logits = jnp.einsum("bsd,vd->bsv", h, unembedding, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, 0.0)


def head_case(vocab: int, seq: int, dim: int, logps_fn):
    """The loss from hidden states: gradients w.r.t. hidden ``[1, S, D]`` and unembedding."""

    def loss(hidden, unembedding, tokens, pred_index):
        return jnp.sum(logps_fn(hidden, unembedding, tokens, pred_index))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), make_inputs(vocab, seq, dim)


def decoder_case(vocab: int, seq: int, dim: int, logps_fn):
    """The loss through a 1-layer decoder: gradients w.r.t. all its parameters."""
    from flax import nnx

    from jaxpo.models import ModelConfig, Transformer

    cfg = ModelConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=4 * dim,
                      num_layers=1, num_heads=dim // 64, num_kv_heads=dim // 64, head_dim=64,
                      tie_word_embeddings=False)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    _, _, tokens, pred_index = make_inputs(vocab, seq, 8)
    positions = jnp.arange(seq, dtype=jnp.int32)[None]
    ones, zeros = jnp.ones_like(tokens), jnp.zeros_like(tokens)

    def loss(params, tokens, pred_index):
        model = nnx.merge(graphdef, params)
        hidden = model.hidden(tokens, positions, ones, zeros, zeros)
        return jnp.sum(logps_fn(hidden, model.unembedding(), tokens, pred_index))

    return jax.jit(jax.value_and_grad(loss)), (params, tokens, pred_index)


CASES = {"head": head_case, "decoder": decoder_case}


def peak_bytes(step, args) -> dict:
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    out = {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }
    out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
    return out, compiled


def seconds(compiled, args, repeats: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds (CPU time is less sensitive to a busy machine)."""
    jax.block_until_ready(compiled(*args))  # warm up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(*args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def make_inputs(vocab: int, seq: int, dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((1, seq, dim), np.float32))
    unembedding = jnp.asarray(rng.standard_normal((vocab, dim), np.float32) / np.sqrt(dim))
    tokens = jnp.asarray(rng.integers(0, vocab, (1, seq), dtype=np.int32))
    pred_index = jnp.asarray(np.arange(seq, dtype=np.int32)[None] - 1)  # first token unscored
    return hidden, unembedding, tokens, pred_index


def run(cases, vocabs, seq, dim, chunk_sizes, repeats, on_row=lambda rows: None) -> list[dict]:
    rows = []
    for case in cases:
        for vocab in vocabs:
            variants = [("unchunked", None, unchunked_logps)]
            for c in chunk_sizes:
                fn = lambda h, w, t, p, c=c: token_logps(h, w, t, p, chunk_size=c)
                variants.append(("chunked", c, fn))
            base, values = None, {}
            for name, chunk, fn in variants:
                step, args = CASES[case](vocab, seq, dim, fn)
                mem, compiled = peak_bytes(step, args)
                wall, cpu = seconds(compiled, args, repeats)
                values[(name, chunk)] = float(compiled(*args)[0])
                row = {"case": case, "vocab": vocab, "seq": seq, "dim": dim, "variant": name,
                       "chunk_size": chunk, **mem, "seconds": wall, "cpu_seconds": cpu}
                base = base or row
                row["peak_vs_unchunked"] = row["peak_bytes"] / base["peak_bytes"]
                row["time_vs_unchunked"] = row["seconds"] / base["seconds"]
                row["cpu_time_vs_unchunked"] = row["cpu_seconds"] / base["cpu_seconds"]
                rows.append(row)
                print_row(row)
                on_row(rows)
                del compiled, step, args
            ref = values[("unchunked", None)]
            for key, value in values.items():  # the variants compute the same loss
                assert abs(value - ref) <= 1e-4 * abs(ref), (key, value, ref)
    return rows


def print_header():
    print(f"{'case':>7} {'V':>7} {'S':>5} {'D':>4} {'variant':>9} {'chunk':>5} {'peak MiB':>9} "
          f"{'temp MiB':>9} {'peak/unch':>9} {'sec':>7} {'time/unch':>9} {'cpu s':>7} "
          f"{'cpu/unch':>8}")


def print_row(r):
    mib = 1 << 20
    print(f"{r['case']:>7} {r['vocab']:>7} {r['seq']:>5} {r['dim']:>4} {r['variant']:>9} "
          f"{r['chunk_size'] or '-'!s:>5} {r['peak_bytes'] / mib:>9.1f} "
          f"{r['temp_bytes'] / mib:>9.1f} {r['peak_vs_unchunked']:>9.3f} "
          f"{r['seconds']:>7.3f} {r['time_vs_unchunked']:>9.3f} {r['cpu_seconds']:>7.2f} "
          f"{r['cpu_time_vs_unchunked']:>8.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="head,decoder", help="head and/or decoder")
    parser.add_argument("--vocab", default="32768,131072")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-sizes", default=str(DEFAULT_CHUNK_SIZE))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(RESULTS, "logprob_memory.json"))
    args = parser.parse_args()
    vocabs = [int(v) for v in args.vocab.split(",")]
    chunks = [int(c) for c in args.chunk_sizes.split(",")]
    print_header()
    result = {
        "benchmark": "logprob_memory",
        "what": "forward+backward of sum(token log-probs), batch 1; case head: gradients "
                "w.r.t. hidden and unembedding; case decoder: through a 1-layer decoder, "
                "gradients w.r.t. all its parameters",
        "peak": "XLA compiled memory analysis: temp + argument + output bytes",
        "time": f"median wall (seconds) and process CPU (cpu_seconds) of {args.repeats} runs "
                "after a warm-up",
        "target": "chunked <= 0.35 x unchunked peak at V=131072, S=2048; time within 1.10 x",
        "default_chunk_size": DEFAULT_CHUNK_SIZE,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "rows": [],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    def write(rows):  # after every row, so an interrupted run keeps what it measured
        result["rows"] = rows
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    run(args.cases.split(","), vocabs, args.seq, args.dim, chunks, args.repeats, write)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
