"""Conformance fixtures for jaxpo.models: tiny random HF checkpoints and their logits.

    /work/refenv/bin/python scripts/make_conformance_fixtures.py make
    python scripts/make_conformance_fixtures.py export /tmp/jaxpo_export
    /work/refenv/bin/python scripts/make_conformance_fixtures.py verify /tmp/jaxpo_export

``make`` (needs torch + transformers) builds a LlamaForCausalLM (llama3 rope scaling, untied),
a Qwen2ForCausalLM (q/k/v bias, tied) and a Qwen3ForCausalLM (q/k norm, head_dim != D / H)
with random weights, and writes each under tests/fixtures/models/<name>/: config.json,
model.safetensors and expected.npz (``input_ids`` [2, 16], fp32 ``logits`` [2, 16, V]).
``export`` (jaxpo only) loads each fixture with jaxpo.models.load_hf and writes it back with
export_hf (single file and sharded) plus jaxpo's logits; ``verify`` (transformers) loads those
exported directories and compares transformers' logits with jaxpo's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "models")
SEQ_LEN = 16

_COMMON = {"vocab_size": 128, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
               "bos_token_id": 1, "eos_token_id": 2}
SPECS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        _COMMON, hidden_size=64, tie_word_embeddings=False, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        _COMMON, hidden_size=64, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        _COMMON, hidden_size=48, head_dim=16, tie_word_embeddings=False, rope_theta=1e6)),
}


def make() -> None:
    import torch
    import transformers

    for seed, (name, (config_cls, model_cls, kwargs)) in enumerate(sorted(SPECS.items())):
        torch.manual_seed(seed)
        config = getattr(transformers, config_cls)(**kwargs)
        model = getattr(transformers, model_cls)(config).eval()
        with torch.no_grad():  # larger-than-init weights so every parameter shows in the logits
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight") or "layernorm" in pname:
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.15 * torch.randn_like(p))
        out = os.path.join(FIXTURES, name)
        model.save_pretrained(out, safe_serialization=True)
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, kwargs["vocab_size"], (2, SEQ_LEN)).astype(np.int32)
        with torch.no_grad():
            logits = model(torch.from_numpy(ids).long()).logits.float().numpy()
        np.savez(os.path.join(out, "expected.npz"), input_ids=ids, logits=logits)
        for extra in ("generation_config.json",):
            if os.path.exists(os.path.join(out, extra)):
                os.remove(os.path.join(out, extra))
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{name}: {out} ({size / 1e3:.0f} kB), logits std {logits.std():.3f}, "
              f"transformers {transformers.__version__}")


def export(out_root: str) -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import jax.numpy as jnp

    from jaxpo.models import export_hf, load_hf

    for name in sorted(SPECS):
        expected = np.load(os.path.join(FIXTURES, name, "expected.npz"))
        model = load_hf(os.path.join(FIXTURES, name))
        logits = np.asarray(model(jnp.asarray(expected["input_ids"])))
        for variant, shard in (("single", "5GB"), ("sharded", 20_000)):
            out = os.path.join(out_root, f"{name}-{variant}")
            files = export_hf(model, out, max_shard_size=shard)
            np.savez(os.path.join(out, "jaxpo_logits.npz"), input_ids=expected["input_ids"],
                     logits=logits)
            print(f"{out}: {len(files)} file(s)")


def verify(out_root: str) -> None:
    import torch
    import transformers

    worst = 0.0
    for name in sorted(os.listdir(out_root)):
        path = os.path.join(out_root, name)
        ref = np.load(os.path.join(path, "jaxpo_logits.npz"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=False).eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(ref["input_ids"]).long()).logits.numpy()
        diff = float(np.abs(logits - ref["logits"]).max())
        worst = max(worst, diff)
        print(json.dumps({"dir": name, "class": type(model).__name__, "max_abs_diff": diff}))
    print(f"transformers {transformers.__version__}: worst max abs diff {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("transformers disagrees with jaxpo's export")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["make", "export", "verify"])
    parser.add_argument("dir", nargs="?", default="/tmp/jaxpo_export")
    args = parser.parse_args()
    if args.command == "make":
        make()
    elif args.command == "export":
        export(args.dir)
    else:
        verify(args.dir)


if __name__ == "__main__":
    main()
