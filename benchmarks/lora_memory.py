"""Per-chip memory of the Llama-3-8B DPO train step: full fine-tuning vs LoRA rank 16.

    python benchmarks/lora_memory.py            # 8 fake CPU devices, about a minute

The same measurement as ``benchmarks/scale_projection.py`` (whose functions it uses): the real
train step of ``configs/dpo_llama3_8b_tpu_v5p.py`` with Llama-3-8B shapes, lowered and
compiled on abstract inputs (no weight is allocated) on ``--devices`` fake CPU devices (mesh
``fsdp=devices``) at 2 and 4 layers, extrapolated linearly to 32 layers and scaled to the
preset's 32 chips. Once as the preset has it (every parameter trained, the reference a frozen
copy of the initial weights) and once with ``model.lora.rank=16`` on all seven projections
(only the adapters are trained and held by the optimiser; the base weights are the step's one
frozen argument and also the reference, adapters off). Parameters and optimiser state in the
preset's float32, compute in bfloat16. Per chip: trained params, optimiser state, reference /
frozen base, temp (activations, gradients, workspace) and the peak. The exact per-chip state
at 32 layers, from the shardings, is recorded beside. Results go to
``benchmarks/results/lora_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

if __name__ == "__main__":  # fake CPU devices must be requested before jax is imported
    os.environ["JAX_PLATFORMS"] = "cpu"
    _FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(_FLAGS + ["--xla_force_host_platform_device_count=8"])

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale_projection as sp  # (after the device flags)

RANK = 16


def state_bytes(run, devices: int, chips: int, layers: int) -> dict[str, float]:
    """Exact per-chip bytes of the trained params, the optimiser state and the frozen weights
    at ``layers`` layers, from the shardings (sharded state scales by devices / chips)."""
    r = sp.with_layers(run, layers)
    state = r.abstract_state()
    frozen = (sp.abstract_like(r.base_abstract, r.base_shardings) if r.lora
              else sp.abstract_like(r.abstract_params, r.state_shardings.params))
    scale = devices / chips
    return {"params": sp.device_bytes(state.params) * scale,
            "opt_state": sp.device_bytes(state.opt_state) * scale,
            "reference": sp.device_bytes(frozen) * scale}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=32)
    parser.add_argument("--out", default=os.path.join(sp.RESULTS, "lora_memory.json"))
    args = parser.parse_args()
    devices, layers, target = jax.device_count(), (2, 4), 32
    start = time.perf_counter()
    results = {}
    sp.print_measure_header()
    for name, rank in (("full", 0), (f"lora_r{RANK}", RANK)):
        run = sp.base_run(devices, None, lora_rank=rank)
        rows = []
        for n in layers:
            rows.append(sp.measure(run, n, devices, args.chips))
            sp.print_measure(rows[-1])
        projection = sp.project(rows, devices, args.chips, target)
        results[name] = {"lora_rank": rank, "rows": rows, "projection": projection,
                         "exact_state_per_chip": state_bytes(run, devices, args.chips, target)}
    gib = {name: {k: v / sp.GIB for k, v in r["projection"]["per_chip"].items()}
           for name, r in results.items()}
    print(f"\nper chip at {target} layers, {args.chips} chips (GiB):")
    print(f"{'part':>10} " + " ".join(f"{name:>10}" for name in gib))
    for part in sp.PARTS:
        print(f"{part:>10} " + " ".join(f"{g[part]:>10.2f}" for g in gib.values()))
    full, lora = gib["full"], gib[f"lora_r{RANK}"]
    state = ("params", "opt_state", "reference")
    saved_state = sum(full[k] for k in state) - sum(lora[k] for k in state)
    print(f"params + optimiser + reference: {sum(full[k] for k in state):.2f} -> "
          f"{sum(lora[k] for k in state):.2f} GiB per chip (saves {saved_state:.2f}); peak "
          f"{full['peak']:.2f} -> {lora['peak']:.2f} GiB (saves {full['peak'] - lora['peak']:.2f})")
    summary = {"per_chip_gib": gib, "state_saved_gib_per_chip": saved_state,
               "peak_saved_gib_per_chip": full["peak"] - lora["peak"],
               "trained_params": {name: sum(
                   x.size for x in jax.tree.leaves(sp.with_layers(
                       sp.base_run(devices, None, lora_rank=r["lora_rank"]), target
                   ).abstract_params)) for name, r in results.items()}}
    out = {
        "benchmark": "lora_memory",
        "what": "the real train step of configs/dpo_llama3_8b_tpu_v5p.py (llama3-8b shapes), "
                "full fine-tuning vs LoRA rank 16 on q,k,v,o,gate,up,down, compiled on abstract "
                f"inputs on {devices} fake CPU devices at {list(layers)} layers, extrapolated "
                f"to {target} layers and scaled to {args.chips} chips as in scale_projection",
        "assumptions": [
            ("float32 parameters and optimiser state (the preset's), bfloat16 compute, remat "
             "block, adamw (two moments per trained parameter)"),
            ("full: the reference is a frozen copy of the initial weights; LoRA: the frozen base "
             "weights are the step's one non-donated argument and also the reference"),
            ("temp is XLA:CPU's; the sharded part of temp (e.g. full fine-tuning's gradients) "
             "is not rescaled from devices to chips, so it is an upper bound there"),
        ],
        "summary": summary, "results": results,
        "backend": jax.default_backend(), "machine": platform.machine(),
        "jax": jax.__version__, "seconds": time.perf_counter() - start,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
