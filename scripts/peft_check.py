"""Checks that `peft` loads jaxpo's LoRA export and computes jaxpo's logits.

Two steps, in two environments (jaxpo's does not depend on torch or peft):

    python scripts/peft_check.py export /tmp/peft_check          # jaxpo's venv
    /path/to/peft-venv/bin/python scripts/peft_check.py check /tmp/peft_check

``export`` builds a tiny adapted model (the tiny preset, rank-4 adapters on every projection,
random ``B`` so that the adapters matter), and writes the base model as a Hugging Face checkpoint
(``base/``), the adapters as a PEFT adapter (``adapter/``), and jaxpo's logits of the adapted and
base models on fixed tokens (``logits.npz``). ``check`` (torch, transformers, peft) loads
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`` and compares
its logits with jaxpo's, checks that every adapter tensor was loaded (PEFT's own state dict
equals the file) and that ``adapter_config.json`` holds only fields of peft's ``LoraConfig``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

RANK, ALPHA = 4, 8.0


def export(out: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxpo.models import export_hf, get_preset, lora
    from jaxpo.models.transformer import Transformer

    cfg = get_preset("tiny", vocab_size=128, attention="dense")
    model = Transformer(cfg.replace(lora=lora.Lora(RANK, ALPHA)),
                        rngs=nnx.Rngs(params=0, lora=1))
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
    for i, (path, var) in enumerate(sorted(flat.items())):
        if path[-1] == "b":
            var.set_value(0.1 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    nnx.update(model, nnx.from_flat_state(flat))
    base_params = lora.split(nnx.state(model, nnx.Param))[0]
    base = nnx.merge(nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0))), base_params)
    export_hf(base, os.path.join(out, "base"))
    lora.export_peft(model, os.path.join(out, "adapter"),
                     base_model_name_or_path=os.path.join(out, "base"))
    tokens = (jnp.arange(40, dtype=jnp.int32).reshape(2, 20) * 7) % cfg.vocab_size
    np.savez(os.path.join(out, "logits.npz"), tokens=np.asarray(tokens),
             adapted=np.asarray(model(tokens)), base=np.asarray(base(tokens)))
    print(f"wrote {out}/base, {out}/adapter, {out}/logits.npz")


def check(out: str) -> None:
    import dataclasses

    import peft
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    saved = np.load(os.path.join(out, "logits.npz"))
    adapter_dir = os.path.join(out, "adapter")
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        fields = set(json.load(f))
    known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields <= known, f"adapter_config.json fields peft does not know: {fields - known}"

    base = AutoModelForCausalLM.from_pretrained(os.path.join(out, "base"),
                                                dtype=torch.float32)
    tokens = torch.tensor(saved["tokens"], dtype=torch.long)
    with torch.no_grad():
        base_logits = base(tokens).logits.numpy()
    model = peft.PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    with torch.no_grad():
        adapted = model(tokens).logits.numpy()
    state = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
    written = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert state.keys() == written.keys(), sorted(set(state) ^ set(written))[:4]
    for key, value in written.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    base_err = float(np.max(np.abs(base_logits - saved["base"])))
    err = float(np.max(np.abs(adapted - saved["adapted"])))
    moved = float(np.max(np.abs(saved["adapted"] - saved["base"])))
    print(json.dumps({"peft": peft.__version__, "torch": torch.__version__,
                      "adapter_tensors": len(written), "max_abs_diff_base": base_err,
                      "max_abs_diff_adapted": err, "adapters_move_logits_by": moved}))
    assert base_err < 1e-4 and err < 1e-4 and moved > 1e-2


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("export", "check"):
        sys.exit(__doc__)
    {"export": export, "check": check}[sys.argv[1]](sys.argv[2])
