"""DPO with LoRA adapters on the synthetic sorting task: only rank-8 adapters on every projection
are trained; the frozen reference is the base model with the adapters off (docs/lora.md).

    jaxpo train --config=configs/sft_tiny.py --workdir=runs/sft_tiny     # warm-up, once
    jaxpo train --config=configs/lora_dpo_tiny.py --workdir=runs/lora_dpo_tiny \
        --config.model.init_from=runs/sft_tiny
    jaxpo export --workdir=runs/lora_dpo_tiny --out=runs/adapter          # PEFT adapter
    jaxpo export --workdir=runs/lora_dpo_tiny --out=runs/merged --merge   # merged weights

The same task and data as configs/dpo_tiny.py; adapters start at zero (the policy is the base
model at step 0) and take a larger learning rate than full fine-tuning.
"""


def get_config() -> dict:
    return {
        "model": {"preset": "tiny", "lora": {"rank": 8, "alpha": 16.0}},
        "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"learning_rate": 3e-3, "warmup_steps": 10},
        "train": {"steps": 300, "checkpoint_every": 100, "eval_every": 100},
    }
