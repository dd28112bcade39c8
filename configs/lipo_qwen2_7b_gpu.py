"""LiPO-lambda of Qwen2 7B Instruct on ranked lists of 8 responses, one 8-GPU node (H100/A100).

    jaxpo train --config=configs/lipo_qwen2_7b_gpu.py --workdir=runs/lipo-qwen2-7b \
        --config.model.path=/data/Qwen2-7B-Instruct \
        --config.data.train_files=/data/lists/train.parquet

Paths are placeholders. The mesh is 4-way FSDP x 2-way tensor parallel (``fsdp_tp`` rules:
MLP, heads and vocabulary split over ``tensor``); bfloat16 parameters and compute with full
rematerialisation to fit 8 responses of up to 1024 tokens per prompt; the prompt is laid out
once per list (``share_prefix``).

bfloat16 parameters get fp32 master weights (``jaxpo.train.optim.with_master_weights``): at
lr 1e-6 an AdamW update is far below bf16's resolution (8 significant bits), and without them 10
updates changed 1.9% of the weights (99.99% in fp32). The optimiser state keeps an fp32 copy
that the updates accumulate in, with fp32 moments, and the bf16 weights are that copy rounded
after each update. Memory for Qwen2-7B's 7.6 B parameters, over the 8 GPUs: bf16 params 2 +
fp32 master 4 + fp32 AdamW moments 8 = 14 bytes per parameter, 13.3 GB per GPU (bf16 moments
and no master would take 5.7 GB, and lose the updates), plus the bf16 reference, 1.9 GB.
"""


def get_config() -> dict:
    return {
        "model": {
            "path": "/data/Qwen2-7B-Instruct",  # placeholder: an HF model directory
            "dtype": "bfloat16",
            "param_dtype": "bfloat16",
            "remat": "full",
            "logprob_chunk_size": 256,
        },
        "data": {
            "train_files": ("/data/lists/train.parquet",),  # placeholder
            "eval_files": ("/data/lists/test.parquet",),  # placeholder
            "format": "list",
            "layout": "share_prefix",
            "on_bad_record": "skip",
            "max_length": 2048,  # prompt + one response
            "max_prompt_length": 1024,
            "batch_size": 32,
            "max_responses": 8,
        },
        "loss": {"name": "lipo_lambda", "beta": 0.05},
        "reference": {"mode": "model"},
        "optim": {
            "name": "adamw",
            "learning_rate": 1e-6,
            "schedule": "cosine",
            "warmup_steps": 50,
            "max_grad_norm": 1.0,
            "grad_accum_steps": 4,
        },
        "mesh": {"data": 1, "fsdp": 4, "tensor": 2, "rules": "fsdp_tp"},
        "train": {
            "steps": 1000,
            "checkpoint_every": 100,
            "keep_checkpoints": 2,
            "eval_every": 100,
            "peak_flops": 989e12,  # H100 SXM dense bf16 per GPU
        },
    }
