"""Sharded loading of HF checkpoints: ``load_hf_params`` builds each parameter as a global array
whose device shards read only their own slices of each layer's tensor, and equals ``load_hf`` +
``jax.device_put`` bit for bit (8 fake CPU devices, ``fsdp`` and ``fsdp_tp`` meshes; the run's
``initial_params`` for ``model.path`` uses it)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from _multidevice import run_snippet
from flax import nnx

from jaxpo.models import load_hf, load_hf_params, read_config
from jaxpo.models.safetensors_io import SafetensorsFile
from jaxpo.train import state as state_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "models")

SNIPPET = """
import json, os, shutil, sys, tempfile
import jax, numpy as np, safetensors.numpy
from flax import nnx
from jaxpo.config import Config, replace
from jaxpo.models import export_hf, load_hf, load_hf_params, read_config, safetensors_io
from jaxpo.sharding import get_rules, make_mesh, param_shardings
from jaxpo.tasks import synthetic
from jaxpo.train import setup, state as state_lib

FIXTURES = "tests/fixtures/models"
MESHES = {"fsdp": (1, 8, 1), "fsdp_tp": (2, 2, 2)}

# Record every read: (tensor name, [start, stop] per axis, or None for the whole tensor).
reads = []
read = safetensors_io.SafetensorsFile.read
def recording_read(self, name, index=None):
    reads.append((name, None if index is None else [[s.start, s.stop] for s in index]))
    return read(self, name, index)
safetensors_io.SafetensorsFile.read = recording_read

def bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)

def compare(got, want):
    # Same structure, same shardings, bitwise equal values and device shards.
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.sharding == b.sharding and a.dtype == b.dtype, (a.sharding, b.sharding)
        if not np.array_equal(bits(a), bits(b)):
            return False
        for sa, sb in zip(a.addressable_shards, b.addressable_shards):
            if sa.index != sb.index or not np.array_equal(bits(sa.data), bits(sb.data)):
                return False
    return True

def load(path, preset, **dtypes):
    mesh = make_mesh(*MESHES[preset])
    cfg = read_config(path, **dtypes)
    shardings = param_shardings(state_lib.abstract_model(cfg)[1], mesh, get_rules(preset))
    reads.clear()
    got = load_hf_params(path, cfg, shardings)
    recorded = list(reads)
    want = jax.device_put(state_lib.split_model(load_hf(path, **dtypes))[1], shardings)
    specs = {"/".join(map(str, k)): str(v.get_value().spec)
             for k, v in nnx.to_flat_state(shardings)}
    return compare(got, want), recorded, specs

out = {"equal": {}, "reads": {}, "specs": {}}
for name in ("llama", "qwen2", "qwen3"):
    for preset in MESHES:
        equal, recorded, specs = load(os.path.join(FIXTURES, name), preset)
        out["equal"][f"{name}/{preset}"] = equal
        out["reads"][f"{name}/{preset}"] = recorded
        out["specs"][f"{name}/{preset}"] = specs
# bf16 parameters from an fp32 file: cast per slice.
out["equal"]["llama/fsdp/bf16"] = load(os.path.join(FIXTURES, "llama"), "fsdp",
                                       param_dtype="bfloat16")[0]
tmp = tempfile.mkdtemp()
# A checkpoint sharded over several files (with an index).
multi = os.path.join(tmp, "multi")
files = export_hf(load_hf(os.path.join(FIXTURES, "qwen3")), multi, max_shard_size="40KB")
out["files"] = len(files)
out["equal"]["qwen3-multi-file/fsdp_tp"] = load(multi, "fsdp_tp")[0]
# A NaN is found in the slice that holds it and named.
bad = os.path.join(tmp, "bad")
shutil.copytree(os.path.join(FIXTURES, "llama"), bad)
tensors = safetensors.numpy.load_file(os.path.join(bad, "model.safetensors"))
tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = np.nan
safetensors.numpy.save_file(tensors, os.path.join(bad, "model.safetensors"))
try:
    load(bad, "fsdp_tp")
except ValueError as e:
    out["nan_error"] = str(e)
# The run's initial params for model.path: the sharded load.
config = replace(Config(), {"model": {"path": os.path.join(FIXTURES, "llama"),
                                      "tokenizer": synthetic.tokenizer_dir()},
                            "mesh": {"data": 2, "fsdp": 2, "tensor": 2, "rules": "fsdp_tp"}})
run = setup.build_run(config)
reads.clear()
params = run.initial_params()
out["run_whole_reads"] = sum(index is None for _, index in reads)
want = jax.device_put(
    state_lib.split_model(load_hf(config.model.path))[1], run.state_shardings.params)
out["equal"]["run.initial_params"] = compare(params, want)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight():
    return run_snippet(SNIPPET, devices=8, timeout=400)


def test_sharded_load_equals_load_hf_and_device_put_bitwise(eight):
    assert eight["equal"] == {
        "llama/fsdp": True, "llama/fsdp_tp": True, "qwen2/fsdp": True, "qwen2/fsdp_tp": True,
        "qwen3/fsdp": True, "qwen3/fsdp_tp": True, "llama/fsdp/bf16": True,
        "qwen3-multi-file/fsdp_tp": True, "run.initial_params": True}
    assert eight["files"] > 3
    specs = eight["specs"]["llama/fsdp_tp"]
    assert specs["layers/mlp/up"] == "P(None, 'fsdp', 'tensor')"  # the layer axis replicated
    assert specs["layers/attn/q"] == "P(None, 'fsdp', 'tensor', None)"


def _reads_of(reads, name):
    return sorted(tuple(map(tuple, index)) if index else None for n, index in reads if n == name)


def test_each_device_reads_only_its_own_slice(eight):
    # llama: D = 64, F = 96, H = 4, K = 2, hd = 16, V = 128, 2 layers.
    fsdp, tp = eight["reads"]["llama/fsdp"], eight["reads"]["llama/fsdp_tp"]
    # fsdp over 8: up [L, D, F] is split along D; HF up_proj is [F, D]: 8 column blocks.
    assert _reads_of(fsdp, "model.layers.1.mlp.up_proj.weight") == [
        ((0, 96), (8 * k, 8 * k + 8)) for k in range(8)]
    # fsdp_tp (data 2, fsdp 2, tensor 2): D halves x F halves, each read once although the two
    # data replicas hold each.
    assert _reads_of(tp, "model.layers.1.mlp.up_proj.weight") == [
        ((f, f + 48), (d, d + 32)) for f in (0, 48) for d in (0, 32)]
    # q [L, D, H, hd] by (fsdp, tensor): HF q_proj [H * hd, D] rows of 2 heads, D halves.
    assert _reads_of(tp, "model.layers.0.self_attn.q_proj.weight") == [
        ((h, h + 32), (d, d + 32)) for h in (0, 32) for d in (0, 32)]
    # o [L, H, hd, D] by (tensor, fsdp): HF o_proj [D, H * hd].
    assert _reads_of(tp, "model.layers.0.self_attn.o_proj.weight") == [
        ((d, d + 32), (h, h + 32)) for d in (0, 32) for h in (0, 32)]
    assert _reads_of(tp, "model.embed_tokens.weight") == [
        ((v, v + 64), (d, d + 32)) for v in (0, 64) for d in (0, 32)]
    assert _reads_of(tp, "model.layers.1.input_layernorm.weight") == [((0, 32),), ((32, 64),)]
    # A replicated parameter (qwen3's per-head q norm [L, hd]): one whole read per layer.
    qwen3 = eight["reads"]["qwen3/fsdp_tp"]
    assert _reads_of(qwen3, "model.layers.1.self_attn.q_norm.weight") == [None]
    # Every tensor is read exactly once in all: whole, or in distinct slices that add up to it.
    for key, reads in eight["reads"].items():
        with SafetensorsFile(os.path.join(FIXTURES, key.split("/")[0], "model.safetensors")) as f:
            shapes = {name: f.shape(name) for name in f.names()}
        read = {name for name, _ in reads}
        assert {n for n in shapes if n.startswith("model.")} <= read <= set(shapes), key
        for name in read:
            slices = [index for n, index in reads if n == name]
            if slices == [None]:
                continue
            assert None not in slices and len({str(index) for index in slices}) == len(slices)
            assert sum(np.prod([stop - start for start, stop in index]) for index in slices) == (
                np.prod(shapes[name])), (key, name)


def test_non_finite_slice_is_named(eight):
    assert eight["nan_error"].startswith("tensor 'model.layers.1.self_attn.k_proj.weight' in ")
    assert eight["nan_error"].endswith(
        "is not finite: 1 NaN and 0 inf values in its slice [0:16, 0:32]")


def test_run_initial_params_reads_slices(eight):
    assert eight["equal"]["run.initial_params"] is True
    # Under fsdp_tp every llama parameter is sharded: no tensor is read whole.
    assert eight["run_whole_reads"] == 0


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_unsharded_load_hf_params_equals_load_hf(name):
    path = os.path.join(FIXTURES, name)
    cfg = read_config(path)
    params = load_hf_params(path, cfg)
    want = state_lib.split_model(load_hf(path))[1]
    for (p, a), (q, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(want)):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


def test_config_mismatch_is_named():
    path = os.path.join(FIXTURES, "llama")
    with pytest.raises(ValueError, match="config.json has num_layers=2, but the model config "
                                         "has 3"):
        load_hf_params(path, read_config(path).replace(num_layers=3))
