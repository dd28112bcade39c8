"""ModelConfig: HF config.json parsing, errors that name the field, presets."""

import json
import os

import jax
import pytest
from flax import nnx

from jaxpo.models import ModelConfig, RopeScaling, Transformer, get_preset, preset_names

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "models")


def _hf(name):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


def test_fixture_configs_parse():
    llama = ModelConfig.from_hf(_hf("llama"))
    assert llama.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 16)
    assert not llama.tie_word_embeddings and not llama.qkv_bias and not llama.qk_norm
    qwen2 = ModelConfig.from_hf(_hf("qwen2"))
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    assert qwen2.rope_theta == 1e6
    qwen3 = ModelConfig.from_hf(_hf("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 16 and qwen3.hidden_size == 48


def test_legacy_rope_fields_parse():
    hf = dict(_hf("llama"))
    params = hf.pop("rope_parameters")
    hf["rope_theta"] = params.pop("rope_theta")
    hf["rope_scaling"] = params
    assert ModelConfig.from_hf(hf) == ModelConfig.from_hf(_hf("llama"))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_to_hf_round_trip(name):
    cfg = ModelConfig.from_hf(_hf(name))
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "gpt2", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("mlp_bias", True, "mlp_bias"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "yarn"),
    ("use_sliding_window", True, "use_sliding_window"),
    ("layer_types", ["full_attention", "sliding_attention"], "layer_types"),
])
def test_unsupported_fields_name_the_field(field, value, match):
    hf = dict(_hf("qwen3"), **{field: value})
    with pytest.raises(ValueError, match=match) as err:
        ModelConfig.from_hf(hf, source="ckpt/config.json")
    assert "ckpt/config.json" in str(err.value)


def test_mistral_sliding_window_rejected_and_none_accepted():
    hf = dict(_hf("llama"), model_type="mistral", architectures=["MistralForCausalLM"])
    hf.pop("rope_parameters")
    assert ModelConfig.from_hf(dict(hf, sliding_window=None)).model_type == "mistral"
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_hf(dict(hf, sliding_window=4096))


def test_missing_required_field():
    hf = _hf("llama")
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf(hf)


def test_invalid_values_and_overrides():
    with pytest.raises(ValueError, match="num_kv_heads"):
        get_preset("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        get_preset("tiny", remat="sometimes")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        get_preset("tiny").replace(hidden=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("huge")


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_builds_abstractly(name):
    cfg = get_preset(name)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    sizes = [x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert sum(sizes) == cfg.num_params()
    assert ModelConfig.from_hf(cfg.to_hf(), dtype=cfg.dtype, param_dtype=cfg.param_dtype) == cfg


def test_realistic_sizes():
    assert round(get_preset("llama3-8b").num_params() / 1e9, 2) == 8.03
    assert round(get_preset("qwen2-7b").num_params() / 1e9, 2) == 7.62
