"""Run configuration: schema defaults, overrides with coercion, validation messages, presets."""

import dataclasses
import textwrap

import pytest

from jaxpo import config as C
from jaxpo.train import setup


def test_schema_defaults():
    cfg = C.Config()
    assert (cfg.model.preset, cfg.model.path, cfg.model.dtype, cfg.model.remat) == (
        "tiny", "", "float32", "none")
    assert (cfg.data.format, cfg.data.layout, cfg.data.on_bad_record) == (
        "auto", "share_prefix", "error")
    assert (cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.batch_size) == (512, 0, 8)
    assert (cfg.loss.name, cfg.loss.beta, cfg.reference.mode) == ("dpo", None, "model")
    assert (cfg.optim.name, cfg.optim.learning_rate, cfg.optim.schedule) == (
        "adamw", 5e-6, "cosine")
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.rules) == (-1, 1, 1, "fsdp")
    assert (cfg.train.steps, cfg.train.checkpoint_every, cfg.train.max_skipped_steps) == (
        100, 50, 10)
    assert (cfg.model.attention, cfg.model.init_from, cfg.data.label_mapping) == (
        "blockwise", "", "")
    # Defaults meant for a user's own model and data (not the demo's).
    assert (cfg.train.log_every, cfg.train.allow_config_change, cfg.loss.kto_kl) == (
        10, False, "mismatched")
    assert (cfg.data.tokens_per_batch, cfg.data.max_record_bytes, cfg.model.attention_block) == (
        0, 16 * 2**20, 512)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        C.Config().train.steps = 3


def test_overrides_are_coerced_from_field_types():
    cfg = C.apply_overrides(C.Config(), [
        "--config.train.steps=7", "--config.optim.learning_rate=3e-4",
        "--config.data.shuffle=false", "--config.data.train_files=a.jsonl,b/*.jsonl",
        "--config.loss.beta=0.25", "--config.model.path=/m", "--config.train.seed=1e2",
    ])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.learning_rate == pytest.approx(3e-4)
    assert cfg.data.shuffle is False
    assert cfg.data.train_files == ("a.jsonl", "b/*.jsonl")
    assert cfg.loss.beta == 0.25 and cfg.model.path == "/m" and cfg.train.seed == 100
    assert C.apply_overrides(cfg, ["--config.loss.beta=None"]).loss.beta is None
    # Later overrides win; untouched fields keep their values.
    cfg2 = C.apply_overrides(cfg, ["--config.train.steps=1", "--config.train.steps=2"])
    assert cfg2.train.steps == 2 and cfg2.optim.learning_rate == cfg.optim.learning_rate


@pytest.mark.parametrize("override, message", [
    ("--config.train.stpes=3", "did you mean train.steps"),
    ("--config.trian.steps=3", "did you mean train.steps"),
    ("--config.optim.lr=1", "unknown config key 'optim.lr'"),
    ("--config.train.steps=1.5", "config.train.steps='1.5': expected int"),
    ("--config.data.shuffle=maybe", "config.data.shuffle='maybe': expected a boolean"),
    ("--config.train.steps", "has no value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        C.apply_overrides(C.Config(), [override])


@pytest.mark.parametrize("section, field, value, allowed", [
    ("data", "layout", "tight", "'padded', 'packed', 'share_prefix'"),
    ("data", "format", "pairs", "'auto', 'pair', 'list', 'tree', 'unpaired'"),
    ("data", "on_bad_record", "ignore", "'error', 'skip'"),
    ("reference", "mode", "frozen", "'model', 'precomputed', 'none'"),
    ("optim", "name", "adam", "'adamw', 'sgd', 'adafactor'"),
    ("optim", "schedule", "step", "'cosine', 'linear', 'constant'"),
    ("mesh", "rules", "tp", "'fsdp', 'dp', 'fsdp_tp'"),
    ("model", "dtype", "float16", "'float32', 'bfloat16'"),
    ("model", "remat", "all", "'none', 'block', 'full'"),
])
def test_choice_errors_name_field_and_allowed_values(section, field, value, allowed):
    with pytest.raises(ValueError) as e:
        C.apply_overrides(C.Config(), [f"--config.{section}.{field}={value}"])
    assert f"config.{section}.{field}={value!r}" in str(e.value)
    assert allowed in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (["--config.train.steps=-1"], "config.train.steps=-1 must be >= 0"),
    (["--config.data.max_prompt_length=600"], "must be smaller than config.data.max_length"),
    (["--config.optim.b2=1.0"], "config.optim.b2=1.0 must be in"),
    (["--config.optim.learning_rate=nan"], "config.optim.learning_rate='nan' must be a finite"),
    (["--config.optim.learning_rate=inf"], "config.optim.learning_rate='inf' must be a finite"),
    (["--config.loss.beta=nan"], "config.loss.beta='nan' must be a finite"),
    (["--config.loss.kwargs=gamma=inf"], "gamma=inf must be finite"),
    (["--config.loss.weights=dpo:1,sft:0.2"], ("was removed: write the weights in "
                                                "config.loss.name")),
    (["--config.train.sft_warmup_steps=5"], "was removed: run the SFT warm-up"),
])
def test_range_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        C.apply_overrides(C.Config(), overrides)


@pytest.mark.parametrize("overrides, message", [
    (["--config.loss.name=dpoo"], "unknown objective 'dpoo'"),
    (["--config.reference.mode=none"], "needs a reference"),
    (["--config.data.format=list"], "not supported by config.loss.name='dpo'"),
    (["--config.loss.kwargs=gama=0.5"], "has no hyperparameter 'gama'"),
    (["--config.loss.name=tdpo", "--config.reference.mode=precomputed",
      "--config.reference.cache_dir=/x"], "is token-level"),
    (["--config.model.preset=tiny-llama"], "is not a model preset; choose from"),
    (["--config.loss.name=dpo + 0.2*sfft"], "unknown objective 'sfft'"),
])
def test_cross_section_checks_run_when_the_run_is_built(overrides, message):
    """The leaf config checks each field; objective-vs-reference/data checks need jaxpo.losses
    and run in one place, jaxpo.train.setup.check."""
    config = C.load_config(None, overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        setup.check(config, setup.build_objective(config)[0])


def test_kwargs_parse_errors_at_load():
    with pytest.raises(ValueError, match="not of the form name=value"):
        C.load_config(None, ["--config.loss.kwargs=gamma"])


def test_build_objective_single_and_combined():
    def build(**loss):
        return setup.build_objective(C.replace(C.Config(), {"loss": loss}))

    obj, hp = build(name="simpo", beta=2.5, kwargs="gamma=0.3")
    assert obj.name == "simpo" and hp == {"beta": 2.5, "gamma": 0.3}
    obj, hp = build(name="dpo + 0.2*sft", beta=0.3)
    assert hp == {} and obj.hyperparameters["dpo"]["beta"] == 0.3
    assert [w for _, w in obj.components] == [1.0, 0.2]
    obj, _ = build(name="dpo+sft")
    assert [o.name for o, _ in obj.components] == ["dpo", "sft"]


def test_preset_file_dict_and_config(tmp_path):
    path = tmp_path / "p.py"
    path.write_text(textwrap.dedent("""
        def get_config():
            return {"loss": {"name": "ipo", "beta": 0.2}, "train": {"steps": 9}}
    """))
    cfg = C.load_config(str(path), ["--config.train.seed=3"])
    assert (cfg.loss.name, cfg.loss.beta, cfg.train.steps, cfg.train.seed) == ("ipo", 0.2, 9, 3)
    assert cfg.optim == C.OptimConfig()  # untouched sections keep the schema defaults
    path.write_text("from jaxpo.config import Config\ndef get_config():\n"
                    "    return Config()\n")
    assert C.load_config(str(path)) == C.Config()


def test_preset_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        C.load_config(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'train': {'step': 1}}\n")
    with pytest.raises(ValueError, match=r"bad\.py: unknown config key 'train\.step'"):
        C.load_config(str(bad))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="must define get_config"):
        C.load_config(str(empty))


def test_dict_round_trip_and_defaults_are_not_the_demo():
    cfg = C.load_config(None, ["--config.data.eval_files=x.jsonl"])
    assert C.from_dict(cfg.to_dict()) == cfg
    # No --config means the defaults, meant for a user's own model and data: not the demo's
    # short rows (the demo keeps its settings in jaxpo.demo).
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 0)


def test_attention_settings_reach_the_model_config():
    from jaxpo.data.tokenize import Tokenizer
    from jaxpo.train import inputs

    cfg = C.apply_overrides(C.Config(), ["--config.model.attention=dense",
                                         "--config.model.attention_block=128"])
    tok = Tokenizer.from_dir(inputs.tokenizer_dir(cfg))
    model_cfg = inputs.model_config(cfg, tok)
    assert (model_cfg.attention, model_cfg.attention_block) == ("dense", 128)
    with pytest.raises(ValueError, match="config.model.attention_block=0 must be >= 1"):
        C.apply_overrides(C.Config(), ["--config.model.attention_block=0"])


def test_differences_name_the_keys():
    new = C.apply_overrides(C.Config(), ["--config.optim.learning_rate=1e-3"])
    assert C.differences(C.Config(), new) == {"optim.learning_rate": (5e-6, 1e-3)}
