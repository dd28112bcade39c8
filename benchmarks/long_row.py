"""A 16k-token ``share_prefix`` row through a 1-layer model of 7B width: does fwd+bwd compile on
a CPU within this machine's memory, and what does XLA plan for it?

    JAX_PLATFORMS=cpu python benchmarks/long_row.py                  # S = 16384
    JAX_PLATFORMS=cpu python benchmarks/long_row.py --seq 8192 --attention dense

The model is ``llama3-8b`` with one layer (hidden 4096, 32 heads, 8 kv heads, mlp 14336, vocab
128256), fp32 parameters. The row holds one group laid out as in ``share_prefix``: a 1024-token
prompt and 15 responses of 1024 tokens each that share it (node slots: the prompt and the 15
responses). The loss is the sum of the responses' log-probs (jaxpo.train.loss_inputs
.sequence_logps); its gradients w.r.t. every parameter are taken. Nothing is allocated: the
program is lowered from abstract inputs and compiled; XLA's memory analysis gives the planned
bytes (arguments, outputs, temporaries), and the process's peak RSS shows what compiling took.
Writes ``benchmarks/results/long_row.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled
from jaxpo.models.config import get_preset
from jaxpo.train.loss_inputs import sequence_logps
from jaxpo.train.state import abstract_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 2.0 ** 30
LIMIT_GIB = 24.0  # this machine's memory


def share_prefix_row(seq: int, responses: int) -> dict[str, np.ndarray]:
    """One row: a prompt node and ``responses`` sibling response nodes of equal length."""
    node_len = seq // (responses + 1)
    node = np.minimum(np.arange(seq) // node_len, responses)  # [S] node of each token
    start = node * node_len
    positions = np.where(node == 0, np.arange(seq), np.arange(seq) - start + node_len)
    pred = np.where(node == 0, -1, np.where(np.arange(seq) == start, node_len - 1,
                                            np.arange(seq) - 1))
    row = {
        "tokens": np.zeros(seq, np.int32), "positions": positions.astype(np.int32),
        "segment": np.ones(seq, np.int32), "node_pre": node.astype(np.int32),
        "node_last": np.where(node == 0, responses, node).astype(np.int32),
        "pred_index": pred.astype(np.int32), "node_slot": node.astype(np.int32),
    }
    batch = {k: v[None] for k, v in row.items()}  # [1, S]
    batch["response_nodes"] = np.arange(1, responses + 1, dtype=np.int32).reshape(1, responses, 1)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--responses", type=int, default=15)
    parser.add_argument("--attention", default="blockwise")
    args = parser.parse_args()

    cfg = get_preset("llama3-8b", num_layers=1, dtype="float32", param_dtype="float32",
                     attention=args.attention)
    graphdef, abstract = abstract_model(cfg)
    batch = share_prefix_row(args.seq, args.responses)
    num_nodes = args.responses + 1

    def loss(params, batch):
        out = sequence_logps(graphdef, params, batch, num_nodes=num_nodes, chunk_size=256)
        return jnp.sum(out.logps)

    fn = jax.jit(jax.value_and_grad(loss))
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    t0 = time.perf_counter()
    compiled = fn.lower(abstract, abstract_batch).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    planned = {"arguments": mem.argument_size_in_bytes / GIB,
               "outputs": mem.output_size_in_bytes / GIB,
               "temporaries": mem.temp_size_in_bytes / GIB}
    planned["total"] = sum(planned.values())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    result = {
        "seq": args.seq, "responses": args.responses, "attention": args.attention,
        "model": "llama3-8b width, 1 layer, fp32", "parameters": params,
        "planned_gib": planned, "compile_seconds": seconds, "peak_rss_gib": rss,
        "limit_gib": LIMIT_GIB, "fits": planned["total"] < LIMIT_GIB and rss < LIMIT_GIB,
        "machine": {"platform": platform.platform(), "devices": str(jax.devices())},
    }
    print(f"S={args.seq} share_prefix row, 1 layer at 7B width ({params / 1e6:.0f}M params), "
          f"attention={args.attention}, fwd+bwd:")
    for name, value in planned.items():
        print(f"  planned {name:<12} {value:8.2f} GiB")
    print(f"  compile {seconds:.1f} s, peak RSS {rss:.2f} GiB; fits {LIMIT_GIB:.0f} GiB: "
          f"{result['fits']}")
    os.makedirs(RESULTS, exist_ok=True)
    name = "long_row.json" if args.attention == "blockwise" else f"long_row_{args.attention}.json"
    with open(os.path.join(RESULTS, name), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
