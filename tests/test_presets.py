"""Every preset in configs/ loads and validates; the tiny ones build their model and data."""

import glob
import os

import jax
import pytest
from flax import nnx

from jaxpo import losses
from jaxpo.config import Config, load_config
from jaxpo.data import batcher
from jaxpo.data.tokenize import Tokenizer
from jaxpo.models import Transformer
from jaxpo.tasks import synthetic
from jaxpo.train import inputs
from jaxpo.train.setup import build_objective, build_run, check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
TINY = [p for p in PRESETS if p.endswith("_tiny.py")]
EXPECTED = {  # preset -> (objective, data kind)
    "dpo_tiny": ("dpo", "pair"), "ipo_tiny": ("ipo", "pair"), "simpo_tiny": ("simpo", "pair"),
    "orpo_tiny": ("orpo", "pair"), "kto_tiny": ("kto", "unpaired"),
    "lipo_tiny": ("lipo_lambda", "list"), "tpo_tiny": ("tpo", "tree"),
    "dpo_llama3_8b_tpu_v5p": ("dpo", "pair"), "lipo_qwen2_7b_gpu": ("lipo_lambda", "list"),
    "sft_tiny": ("sft", "pair"),
}


def _name(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_the_issue_presets_exist():
    assert set(EXPECTED) <= {_name(p) for p in PRESETS}


@pytest.mark.parametrize("path", PRESETS, ids=_name)
def test_preset_loads_and_validates(path):
    cfg = load_config(path, ["--config.train.seed=1"])
    assert isinstance(cfg, Config) and cfg.train.seed == 1
    objective, _ = build_objective(cfg)
    check(cfg, objective)
    assert cfg.data.format in objective.kinds
    if _name(path) in EXPECTED:
        assert (cfg.loss.name, cfg.data.format) == EXPECTED[_name(path)]


@pytest.mark.parametrize("name, rules", [("dpo_llama3_8b_tpu_v5p", "fsdp"),
                                         ("lipo_qwen2_7b_gpu", "fsdp_tp")])
def test_realistic_presets(name, rules):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.py"))
    assert cfg.model.path and cfg.model.dtype == "bfloat16" and cfg.mesh.rules == rules
    assert cfg.data.train_files and cfg.data.max_length >= 2048 and cfg.train.peak_flops > 0
    assert cfg.model.remat != "none"


@pytest.mark.parametrize("path", TINY, ids=_name)
def test_tiny_preset_builds_model_and_a_batch(path, tmp_path):
    cfg = load_config(path)
    assert cfg.train.steps <= 1000  # a few minutes on a CPU
    run = build_run(cfg)
    # A reference-free objective runs no reference forward, whatever reference.mode says.
    assert (run.reference_mode == "none") == (not run.objective.needs_reference)
    tokenizer = Tokenizer.from_dir(inputs.tokenizer_dir(cfg))
    model_cfg = inputs.model_config(cfg, tokenizer)
    assert model_cfg.vocab_size == len(synthetic.VOCAB)
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) > 0
    train_files, eval_files = inputs.data_files(cfg, str(tmp_path))
    assert os.path.exists(train_files[0]) and os.path.exists(eval_files[0])
    builder = inputs.group_builder(cfg, tokenizer, run.label_mapping)
    batch = next(iter(inputs.eval_iterator(cfg, eval_files, builder)))
    assert batch["group_mask"].sum() == cfg.data.batch_size  # every record fits
    assert batch["tokens"].shape[1] == batcher.row_length(cfg.data)  # any group within the limits fits
    assert cfg.data.format in losses.get(cfg.loss.name).kinds
