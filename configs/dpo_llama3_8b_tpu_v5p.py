"""DPO of Llama 3 8B Instruct on a TPU v5p pod slice (e.g. v5p-64: 32 chips), FSDP.

    jaxpo train --config=configs/dpo_llama3_8b_tpu_v5p.py --workdir=/mnt/shared/runs/dpo-8b \
        --config.model.path=/data/Meta-Llama-3-8B-Instruct \
        --config.data.train_files=/data/prefs/train-*.jsonl \
        --config.data.eval_files=/data/prefs/test.jsonl

Run the same command on every host of the slice (docs/tpu.md); the workdir must be on a
filesystem all hosts share. Paths are placeholders: the model directory holds config.json,
*.safetensors and tokenizer.json (Hugging Face layout).
Parameters and optimiser state in float32, sharded over all chips (ZeRO-3 style); compute in
bfloat16 with per-block rematerialisation; prompts shared between chosen and rejected. (With
``model.param_dtype=bfloat16`` the optimiser would keep fp32 master weights: 14 instead of 16
bytes per parameter.) Every host builds the same global batch and uploads the rows of its own
chips, whatever order JAX gives the slice's devices (v5p slices interleave the hosts).
"""


def get_config() -> dict:
    return {
        "model": {
            "path": "/data/Meta-Llama-3-8B-Instruct",  # placeholder: an HF model directory
            "dtype": "bfloat16",
            "param_dtype": "float32",
            "remat": "block",
            "logprob_chunk_size": 512,
        },
        "data": {
            "train_files": ("/data/prefs/train-*.jsonl",),  # placeholder
            "eval_files": ("/data/prefs/test.jsonl",),  # placeholder
            "format": "pair",
            "layout": "share_prefix",
            "on_bad_record": "skip",
            "max_length": 2048,
            "max_prompt_length": 1024,
            "batch_size": 128,
            "rows": 64,  # two pairs per 4095-token row on average (one prompt, two responses)
        },
        "loss": {"name": "dpo", "beta": 0.1},
        "reference": {"mode": "model"},
        "optim": {
            "name": "adamw",
            "learning_rate": 5e-7,
            "weight_decay": 0.0,
            "schedule": "cosine",
            "warmup_steps": 100,
            "max_grad_norm": 1.0,
        },
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1, "rules": "fsdp"},
        "train": {
            "steps": 2000,
            "checkpoint_every": 200,
            "keep_checkpoints": 2,
            "eval_every": 200,
            "eval_batches": 16,
            "peak_flops": 459e12,  # v5p bf16 per chip
        },
    }
