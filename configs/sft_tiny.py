"""SFT on the synthetic sorting task's chosen responses: the warm-up the tiny presets start from.

    jaxpo train --config=configs/sft_tiny.py --workdir=runs/sft_tiny
    jaxpo train --config=configs/dpo_tiny.py --workdir=runs/dpo_tiny \
        --config.model.init_from=runs/sft_tiny

The second run starts from the SFT run's weights, which are also its frozen reference.
"""


def get_config() -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
        "loss": {"name": "sft"},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
        "train": {"steps": 400, "checkpoint_every": 400, "eval_every": 0},
    }
