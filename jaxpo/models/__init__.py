"""jaxpo.models: the Llama-family decoder, Hugging Face checkpoints and generation."""

from jaxpo.models.attention import TreeLayout, tree_attention, tree_mask
from jaxpo.models.config import (
    ModelConfig,
    RopeScaling,
    canonical_dtype,
    get_preset,
    preset_names,
)
from jaxpo.models.generate import GenerateOutput, generate
from jaxpo.models.hf_io import export_hf, load_hf, load_hf_params, read_config
from jaxpo.models.transformer import Transformer

__all__ = [
    "GenerateOutput",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "TreeLayout",
    "canonical_dtype",
    "export_hf",
    "generate",
    "get_preset",
    "load_hf",
    "load_hf_params",
    "preset_names",
    "read_config",
    "tree_attention",
    "tree_mask",
]
