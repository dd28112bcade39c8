"""TPO (tree preference optimisation) on trees of one letter per step, leaves scored.

    jaxpo train --config=configs/sft_tiny.py --workdir=runs/sft_tiny     # warm-up, once
    jaxpo train --config=configs/tpo_tiny.py --workdir=runs/tpo_tiny \
        --config.model.init_from=runs/sft_tiny

A tiny model on the bundled synthetic task (no data files: jaxpo writes the task's
tree split into the workdir); runs on a CPU in a few minutes.
Without ``model.init_from`` it starts from the untrained model.
"""


def get_config() -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": {
            "format": "tree", "max_length": 64, "max_prompt_length": 16, "batch_size": 8,
            "max_responses": 4, "max_steps": 4,
        },
        "loss": {"name": "tpo", "beta": 0.1},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
        "train": {"steps": 200, "checkpoint_every": 100, "eval_every": 100},
    }
