"""Per-chip memory and FLOPs of the Llama-3-8B DPO train step, projected from 2 and 4 layers.

    python benchmarks/scale_projection.py                     # 8 fake CPU devices, + 32 check
    python benchmarks/scale_projection.py --check-devices 0   # skip the 32-device check

Lowers and compiles the real train step (``Run.train_step``: one ``jax.jit`` with the run's
explicit shardings, state donated) of ``configs/dpo_llama3_8b_tpu_v5p.py`` — Llama-3-8B shapes
(``get_preset("llama3-8b")``: hidden 4096, 32/8 heads, MLP 14336, vocab 128256) with the
preset's dtypes (float32 parameters and optimiser state, bfloat16 compute), remat ``block``,
log-prob chunk 512, reference model in the step, ``share_prefix`` pairs, rules ``fsdp`` — with
``jax.ShapeDtypeStruct`` inputs only (no weight is allocated), on ``--devices`` fake CPU devices
(mesh ``fsdp=devices``), for 2 and 4 layers. The batch per device is the preset's batch per chip
at ``--chips`` chips: ``rows / chips`` rows of ``S = 4095`` tokens (2 rows, 4 pairs at 32 chips).

Per-device memory comes from ``compiled.memory_analysis()`` (the parameter, optimiser-state and
reference shares of the arguments from the shardings); each part is extrapolated linearly in
the layer count to 32 layers. From ``--devices`` to ``--chips``, the sharded state is scaled by
``devices / chips`` and temp is kept (same rows per device; the part of temp that is sharded
state, e.g. gradients, shrinks with more chips, so this is an upper bound). ``--check-devices``
repeats the compile on that many fake devices, which needs no device scaling. XLA:CPU keeps
some bf16 activations in f32, so a lower estimate is printed beside: temp growing per layer by
only the activations the layer scan saves, at their program size (from the jaxpr).

FLOPs per step are counted from the step's jaxpr (matmuls: ``2·M·N·K`` per ``dot_general``,
scan bodies times their length, remat recomputation included), because XLA's
``cost_analysis()`` counts a loop body once (the scanned layers, the log-prob chunks and the
attention blocks), so its number does not grow with the layers; it is recorded beside. The
blockwise attention's key-block loops have a data-dependent length: counted as the causal
triangle ``(n+1)/2`` blocks per query block, every block pair computed (no skipping of wholly
masked pairs: an upper bound). Compared against ``8·N·T``: ``6·N·T`` policy forward + backward
and ``2·N·T`` reference forward, ``N`` parameters, ``T = rows · S`` positions per step.
Results go to ``benchmarks/results/scale_projection.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


def _device_count(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 8


if __name__ == "__main__":  # fake CPU devices must be requested before jax is imported
    os.environ["JAX_PLATFORMS"] = "cpu"
    _FLAGS = [f for f in os.environ.get("XLA_FLAGS", "").split()
              if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(
        _FLAGS + [f"--xla_force_host_platform_device_count={_device_count(sys.argv)}"])

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore
from jax.sharding import NamedSharding, PartitionSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs uninstalled
from jaxpo.config import from_preset_file, replace
from jaxpo.data.batcher import BatchConfig
from jaxpo.models import lora
from jaxpo.sharding import batch_shardings, param_shardings
from jaxpo.train import state as state_lib
from jaxpo.train.checkpoint import abstract_like
from jaxpo.train.loss_inputs import BATCH_KEYS
from jaxpo.train.setup import Run, build_run

RESULTS = os.path.join(ROOT, "benchmarks", "results")
PRESET = os.path.join(ROOT, "configs", "dpo_llama3_8b_tpu_v5p.py")
GIB = 1 << 30
HBM_GIB = 95.0  # TPU v5p HBM per chip
TOKEN_KEYS = ("tokens", "positions", "segment", "node_pre", "node_last", "pred_index",
              "node_slot")
PARTS = ("params", "opt_state", "reference", "batch", "temp", "peak")


# ------------------------------------------------------------------------- FLOPs from the jaxpr


def _dot_flops(eqn) -> float:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * float(np.prod(out)) * float(np.prod([lhs[d] for d in contract]))


def _jaxprs(value):
    for x in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(x, jcore.ClosedJaxpr):
            yield x.jaxpr
        elif isinstance(x, jcore.Jaxpr):
            yield x


def matmul_flops(jaxpr, scan_length: int | None = None) -> dict[str, float]:
    """``{"total", "in_while"}`` matmul FLOPs of ``jaxpr`` (global, all devices together).

    Scan bodies count ``length`` times; a ``while`` (the blockwise attention's causal
    key-block loops, the only ones in the step) ``(n + 1) / 2`` times, ``n`` the length of the
    enclosing scan (the loop over query blocks); a ``cond`` its most expensive branch.
    """
    total = in_while = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            (body,) = _jaxprs(eqn.params["jaxpr"])
            sub = matmul_flops(body, eqn.params["length"])
            total += eqn.params["length"] * sub["total"]
            in_while += eqn.params["length"] * sub["in_while"]
        elif name == "while":
            if scan_length is None:
                raise ValueError("a while loop outside a scan: its trip count is unknown")
            (body,) = _jaxprs(eqn.params["body_jaxpr"])
            sub = matmul_flops(body, scan_length)
            trips = (scan_length + 1) / 2
            total += trips * sub["total"]
            in_while += trips * sub["total"]
        elif name == "cond":
            subs = [matmul_flops(b, scan_length) for b in _jaxprs(eqn.params["branches"])]
            best = max(subs, key=lambda s: s["total"])
            total += best["total"]
            in_while += best["in_while"]
        else:  # jit, remat, custom_vjp_call, custom_jvp_call, ...: once each
            for value in eqn.params.values():
                for sub_jaxpr in _jaxprs(value):
                    sub = matmul_flops(sub_jaxpr, scan_length)
                    total += sub["total"]
                    in_while += sub["in_while"]
    return {"total": total, "in_while": in_while}


def layer_residual_bytes(jaxpr, layers: int) -> int | None:
    """Bytes (global) of the activations the layer scan saves for the backward pass: the
    stacked outputs ``[L, ...]`` of the forward scan over the layers, in the program's dtypes
    (what the TPU compiler would keep, modulo layout); None when not found exactly once."""
    found = []

    def walk(j):
        for eqn in j.eqns:
            p = eqn.params
            if eqn.primitive.name == "scan" and p["length"] == layers and not p["reverse"]:
                ys = eqn.outvars[p["num_carry"]:]
                if ys:
                    found.append(sum(int(np.prod(v.aval.shape)) * v.aval.dtype.itemsize
                                     for v in ys))
            for value in p.values():
                for sub in _jaxprs(value):
                    walk(sub)

    walk(jaxpr)
    return found[0] if len(found) == 1 else None


# ------------------------------------------------------------------------------- the step


def base_run(devices: int, param_dtype: str | None, lora_rank: int = 0) -> Run:
    """The preset's run on ``devices`` fake devices (mesh fsdp=devices), model from the
    ``llama3-8b`` preset (no checkpoint on disk); with ``lora_rank``, LoRA adapters of that
    rank on every projection (only they are trained)."""
    config = from_preset_file(PRESET)
    model = {"path": "", "preset": "llama3-8b", "lora": {"rank": lora_rank}}
    if param_dtype:
        model["param_dtype"] = param_dtype
    config = replace(config, {"model": model, "mesh": {"data": 1, "fsdp": devices, "tensor": 1},
                              "data": {"train_files": (), "eval_files": ()}})
    return build_run(config)


def with_layers(run: Run, layers: int) -> Run:
    """``run`` with a ``layers``-deep model: what :func:`build_run` derives from the model."""
    model_cfg = run.model_cfg.replace(num_layers=layers)
    graphdef, abstract = state_lib.abstract_model(model_cfg)
    logp = dataclasses.replace(run.spec.logp, graphdef=graphdef)
    base = {}
    if run.lora:  # the trained params are the adapters; the base weights are frozen
        base_graphdef, base_abstract = state_lib.abstract_model(model_cfg.replace(lora=None))
        abstract = lora.split(abstract)[1]
        logp = dataclasses.replace(logp, base_graphdef=base_graphdef)
        base = {"base_abstract": base_abstract,
                "base_shardings": param_shardings(base_abstract, run.mesh, run.rules)}
    return dataclasses.replace(
        run, model_cfg=model_cfg, abstract_params=abstract,
        spec=dataclasses.replace(run.spec, logp=logp),
        state_shardings=state_lib.state_shardings(abstract, run.tx, run.mesh, run.rules), **base)


def batch_shapes(config, devices: int, chips: int) -> tuple[dict, dict]:
    """Abstract batch ``[1, ...]`` (one micro-batch) with the preset's rows per chip on each
    device, and its sizes."""
    full = BatchConfig.from_data_config(config.data)
    rows_global, groups_global = full.num_rows, full.batch_size
    if rows_global % chips or groups_global % chips:
        raise ValueError(f"the preset's {rows_global} rows / {groups_global} groups do not "
                         f"divide over {chips} chips")
    rows, groups = rows_global // chips * devices, groups_global // chips * devices
    S, N, K, M = full.seq_len, full.node_slots, full.max_responses, full.max_steps
    shapes = {k: ((rows, S), jnp.int32) for k in TOKEN_KEYS}
    shapes |= {"response_nodes": ((groups, K, M), jnp.int32),
               "scores": ((groups, K), jnp.float32), "response_mask": ((groups, K), jnp.bool_),
               "group_mask": ((groups,), jnp.bool_)}
    assert set(shapes) == set(BATCH_KEYS), sorted(set(shapes) ^ set(BATCH_KEYS))
    sizes = {"rows": rows, "seq_len": S, "groups": groups, "node_slots": N, "responses": K,
             "steps": M, "rows_global_preset": rows_global, "groups_global_preset": groups_global}
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}, sizes


def device_bytes(tree) -> int:
    """Bytes one device holds of ``tree`` (``ShapeDtypeStruct`` leaves with shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape)) * jnp.dtype(x.dtype).itemsize
    return total


def measure(run: Run, layers: int, devices: int, chips: int) -> dict:
    """Compiles the ``layers``-deep step on abstract inputs; memory and FLOPs per device."""
    r = with_layers(run, layers)
    one, sizes = batch_shapes(r.config, devices, chips)
    shardings = batch_shardings(one, r.mesh, r.rules)  # rows over ("data", "fsdp")
    shardings = {k: NamedSharding(r.mesh, PartitionSpec(None, *s.spec))  # micro-batch axis
                 for k, s in shardings.items()}
    batch = {k: jax.ShapeDtypeStruct((1, *v.shape), v.dtype, sharding=shardings[k])
             for k, v in one.items()}
    state = r.abstract_state()
    ref = (abstract_like(r.base_abstract, r.base_shardings) if r.lora  # the frozen base
           else abstract_like(r.abstract_params, r.state_shardings.params))
    step = r.train_step(shardings)
    start = time.perf_counter()
    traced = step.trace(state, ref, batch)
    compiled = traced.lower().compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = matmul_flops(traced.jaxpr.jaxpr)
    residuals = layer_residual_bytes(traced.jaxpr.jaxpr, layers)
    parts = {"params": device_bytes(state.params), "opt_state": device_bytes(state.opt_state),
             "reference": device_bytes(ref), "batch": device_bytes(batch),
             "temp": int(mem.temp_size_in_bytes)}
    other_args = int(mem.argument_size_in_bytes) - sum(
        parts[k] for k in ("params", "opt_state", "reference", "batch"))
    unaliased_out = int(mem.output_size_in_bytes) - int(mem.alias_size_in_bytes)
    # Live at once: arguments (the donated state is reused for the new one), temp, and the
    # outputs that are not aliased to an argument (the metrics).
    peak = int(mem.argument_size_in_bytes) + parts["temp"] + unaliased_out
    return {
        "devices": devices, "layers": layers, "num_params": r.model_cfg.num_params(),
        **sizes, **parts, "peak": peak, "other_argument_bytes": other_args,
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
        "xla_cost_flops_per_device": float(cost.get("flops", float("nan"))),
        "counted_flops_global": flops["total"], "counted_attention_flops_global":
            flops["in_while"], "counted_flops_per_device": flops["total"] / devices,
        "layer_residual_bytes_per_device":
            None if residuals is None else residuals / devices,
        "compile_seconds": seconds,
    }


def extrapolate(a: dict, b: dict, layers: int) -> dict:
    """Linear in the layer count through the rows ``a`` and ``b`` (keys of PARTS and FLOPs)."""
    keys = (*PARTS, "counted_flops_per_device", "counted_flops_global",
            "counted_attention_flops_global")
    out = {}
    for k in keys:
        slope = (b[k] - a[k]) / (b["layers"] - a["layers"])
        out[k] = a[k] + slope * (layers - a["layers"])
        out[f"{k}_per_layer"] = slope
    return out


def project(rows: list[dict], devices: int, chips: int, layers: int) -> dict:
    """Per-device numbers at ``layers`` (from this device count's rows), then per chip at
    ``chips``: sharded state x devices/chips, temp and batch unchanged (same rows per device)."""
    a, b = sorted((r for r in rows if r["devices"] == devices), key=lambda r: r["layers"])[:2]
    per_device = extrapolate(a, b, layers)
    scale = devices / chips
    chip = {k: per_device[k] * scale for k in ("params", "opt_state", "reference")}
    chip["batch"] = per_device["batch"]
    chip["temp"] = per_device["temp"]
    other = per_device["peak"] - sum(per_device[k] for k in ("params", "opt_state", "reference",
                                                              "batch", "temp"))
    chip["peak"] = sum(chip[k] for k in ("params", "opt_state", "reference", "batch", "temp"))
    chip["peak"] += other
    out = {"from_devices": devices, "layers": layers, "chips": chips, "compiled_rows": a["rows"],
           "per_device_at_layers": per_device, "per_chip": chip,
           "fits": chip["peak"] <= HBM_GIB * GIB, "hbm_gib": HBM_GIB,
           "headroom_gib": HBM_GIB - chip["peak"] / GIB}
    saved = [r["layer_residual_bytes_per_device"] for r in (a, b)]
    if None not in saved:
        # XLA:CPU keeps some bf16 activations in f32. A lower estimate: temp growing per
        # layer by only the activations the program saves, at their program size (bf16).
        per_layer = saved[1] / b["layers"]
        lower = chip["peak"] - (per_device["temp_per_layer"] - per_layer) * layers
        out |= {"saved_activation_bytes_per_layer": per_layer,
                "peak_lower_estimate": lower}
    return out


def flops_summary(projection: dict, sizes: dict, num_params: int, chips: int,
                  peak_flops: float) -> dict:
    """Counted FLOPs per chip and step at the preset's batch vs. 8·N·T."""
    per_device = projection["per_device_at_layers"]
    devices = projection["from_devices"]
    to_preset = sizes["rows_global_preset"] / projection["compiled_rows"]  # -> global batch
    global_counted = per_device["counted_flops_global"] * to_preset
    tokens = sizes["rows_global_preset"] * sizes["seq_len"]
    model = 8.0 * num_params * tokens
    attention = per_device["counted_attention_flops_global"] * to_preset
    return {
        "num_params": num_params, "tokens_per_step": tokens, "from_devices": devices,
        "counted_flops_per_step": global_counted,
        "counted_attention_flops_per_step": attention,
        "counted_flops_per_chip": global_counted / chips,
        "model_flops_per_step_8NT": model, "model_flops_per_chip_8NT": model / chips,
        "counted_over_8NT": global_counted / model,
        "seconds_per_step_at_peak": global_counted / chips / peak_flops,
        "peak_flops_per_chip": peak_flops,
    }


# ------------------------------------------------------------------------------- printing


def print_measure_header():
    print(f"{'devices':>7} {'layers':>6} {'params':>8} {'opt':>8} {'ref':>8} {'batch':>7} "
          f"{'temp':>8} {'peak':>8}  (GiB per device) {'xla flops/dev':>14} "
          f"{'counted/dev':>12} {'compile s':>9}")


def print_measure(r: dict):
    g = [r[k] / GIB for k in PARTS]
    print(f"{r['devices']:>7} {r['layers']:>6} {g[0]:>8.3f} {g[1]:>8.3f} {g[2]:>8.3f} "
          f"{g[3]:>7.4f} {g[4]:>8.3f} {g[5]:>8.3f} {'':>16} "
          f"{r['xla_cost_flops_per_device']:>14.4g} {r['counted_flops_per_device']:>12.4g} "
          f"{r['compile_seconds']:>9.1f}", flush=True)


def per_layer(projection: dict, part: str) -> float:
    """Bytes per chip that one more layer adds to ``part``."""
    if part == "peak":
        return sum(per_layer(projection, k) for k in PARTS if k != "peak")
    value = projection["per_device_at_layers"][part + "_per_layer"]
    if part in ("params", "opt_state", "reference"):  # sharded over the chips
        value *= projection["from_devices"] / projection["chips"]
    return value


def print_projection(projections: list[dict]):
    print(f"\nprojected to {projections[0]['layers']} layers, per chip at "
          f"{projections[0]['chips']} chips (GiB):")
    print(f"{'part':>10} " + " ".join(f"{'from ' + str(p['from_devices']) + ' dev':>12}"
                                      for p in projections)
          + " " + " ".join(f"{'/layer@' + str(p['from_devices']):>12}" for p in projections))
    for part in PARTS:
        vals = " ".join(f"{p['per_chip'][part] / GIB:>12.2f}" for p in projections)
        slopes = " ".join(f"{per_layer(p, part) / GIB:>12.3f}" for p in projections)
        print(f"{part:>10} {vals} {slopes}")
    for p in projections:
        print(f"from {p['from_devices']} devices: peak {p['per_chip']['peak'] / GIB:.1f} GiB per "
              f"chip vs {p['hbm_gib']:.0f} GiB HBM: {'fits' if p['fits'] else 'DOES NOT FIT'} "
              f"(headroom {p['headroom_gib']:.1f} GiB)")
        if "saved_activation_bytes_per_layer" in p:
            print(f"  temp per layer {p['per_device_at_layers']['temp_per_layer'] / GIB:.3f} GiB, "
                  f"of which the program saves {p['saved_activation_bytes_per_layer'] / GIB:.3f} "
                  f"GiB of bf16 activations; lower estimate (temp per layer = those): peak "
                  f"{p['peak_lower_estimate'] / GIB:.1f} GiB")


# ------------------------------------------------------------------------------- main


def run_child(devices: int, args) -> list[dict]:
    """The same measurements on ``devices`` fake devices, in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--devices", str(devices),
               "--chips", str(args.chips), "--layers", args.layers, "--rows-out", out,
               "--check-devices", "0"]
        if args.param_dtype:
            cmd += ["--param-dtype", args.param_dtype]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (mesh fsdp)")
    parser.add_argument("--chips", type=int, default=32,
                        help="chips of the projected slice (v5p-64: 32 chips)")
    parser.add_argument("--layers", default="2,4", help="two depths to compile")
    parser.add_argument("--target-layers", type=int, default=32)
    parser.add_argument("--check-devices", type=int, default=32,
                        help="also compile on this many fake devices (0 = no check)")
    parser.add_argument("--param-dtype", default="", help="override the preset's param_dtype")
    parser.add_argument("--rows-out", default="", help=argparse.SUPPRESS)  # child processes
    parser.add_argument("--out", default=os.path.join(RESULTS, "scale_projection.json"))
    args = parser.parse_args()
    if jax.device_count() != args.devices:
        raise RuntimeError(f"asked for {args.devices} fake devices, jax sees "
                           f"{jax.device_count()}")
    layers = [int(x) for x in args.layers.split(",")]
    if len(layers) != 2:
        raise ValueError("--layers takes two depths, e.g. 2,4")
    start = time.perf_counter()
    run = base_run(args.devices, args.param_dtype or None)
    if not args.rows_out:
        print_measure_header()
    rows = []
    for n in layers:
        rows.append(measure(run, n, args.devices, args.chips))
        if not args.rows_out:  # a child's rows are printed by its parent
            print_measure(rows[-1])
    if args.rows_out:  # a child: hand the rows back
        with open(args.rows_out, "w") as f:
            json.dump(rows, f)
        return
    if args.check_devices and args.check_devices != args.devices:
        for row in run_child(args.check_devices, args):
            rows.append(row)
            print_measure(row)
    device_counts = sorted({r["devices"] for r in rows})
    projections = [project(rows, d, args.chips, args.target_layers) for d in device_counts]
    print_projection(projections)
    full_cfg = run.model_cfg.replace(num_layers=args.target_layers)
    _, sizes = batch_shapes(run.config, args.devices, args.chips)
    peak_flops = run.config.train.peak_flops
    flops = [flops_summary(p, sizes, full_cfg.num_params(), args.chips, peak_flops)
             for p in projections]
    # The exact per-chip state at the target depth, from the shardings (no extrapolation).
    exact_run = with_layers(run, args.target_layers)
    exact_state = exact_run.abstract_state()
    exact = {"params": device_bytes(exact_state.params) * args.devices / args.chips,
             "opt_state": device_bytes(exact_state.opt_state) * args.devices / args.chips}
    for f in flops:
        print(f"FLOPs per step (from {f['from_devices']} devices, counted, {args.target_layers} "
              f"layers, {sizes['rows_global_preset']} rows x {sizes['seq_len']}): "
              f"{f['counted_flops_per_step']:.4g} ({f['counted_attention_flops_per_step']:.3g} "
              f"attention); 8NT = {f['model_flops_per_step_8NT']:.4g}; counted / 8NT = "
              f"{f['counted_over_8NT']:.3f}; per chip {f['counted_flops_per_chip']:.4g} = "
              f"{f['seconds_per_step_at_peak']:.2f} s at {f['peak_flops_per_chip']:.3g} FLOP/s")
    print(f"exact state per chip at {args.target_layers} layers, {args.chips} chips: params "
          f"{exact['params'] / GIB:.2f} GiB, optimiser {exact['opt_state'] / GIB:.2f} GiB")
    seconds = time.perf_counter() - start
    result = {
        "benchmark": "scale_projection",
        "what": "the real train step (Run.train_step, explicit shardings, state donated) of "
                "configs/dpo_llama3_8b_tpu_v5p.py with the llama3-8b model preset's shapes, "
                "lowered and compiled on abstract inputs (no weights) on fake CPU devices, "
                f"mesh fsdp=devices, at {layers} layers; extrapolated linearly in the layers",
        "preset": os.path.relpath(PRESET, ROOT),
        "model": {k: getattr(full_cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "dtype", "param_dtype", "remat", "attention",
            "attention_block")} | {"num_params": full_cfg.num_params(),
                                   "logprob_chunk_size": run.spec.logp.chunk_size,
                                   "reference_mode": run.reference_mode,
                                   "optimizer": run.config.optim.name},
        "batch_per_device": sizes,
        "assumptions": [
            (f"{args.chips} chips (v5p-64, the preset's example slice); mesh data=1, "
             f"fsdp={args.chips}; the preset's {sizes['rows_global_preset']} rows x "
             f"{sizes['seq_len']} tokens ({sizes['groups_global_preset']} pairs) give "
             f"{sizes['rows']} rows per device here, as per chip there"),
            (f"from {args.devices} devices: params, optimiser state and reference x "
             f"{args.devices}/{args.chips}; temp (activations, gradients, gathered weights) "
             "kept per device (an upper bound: its sharded-state part shrinks with more "
             "chips); the compile on the check devices needs no such scaling"),
            ("memory is XLA:CPU's buffer assignment; it keeps some bf16 activations in f32 "
             "(a toy scan of bf16 matmuls under the same remat policy takes the same temp as "
             "its f32 twin), and the TPU compiler schedules and fuses differently (e.g. "
             "prefetching the next layer's all-gather)"),
            "peak = arguments + temp + outputs not aliased to a donated argument",
            ("FLOPs: matmuls counted from the jaxpr (global), attention as the causal triangle "
             "with every block pair computed; XLA cost_analysis counts loop bodies once"),
            (f"HBM {HBM_GIB} GiB per v5p chip; peak {peak_flops:.3g} FLOP/s per chip "
             "(train.peak_flops of the preset)"),
        ],
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "seconds": seconds,
        "rows": rows,
        "projections": projections,
        "exact_state_per_chip": exact,
        "flops": flops,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out} ({seconds:.0f} s)")


if __name__ == "__main__":
    main()
