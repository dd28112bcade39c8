"""SimPO (reference-free, length-normalised, target margin gamma) on the synthetic pairs.

    jaxpo train --config=configs/sft_tiny.py --workdir=runs/sft_tiny     # warm-up, once
    jaxpo train --config=configs/simpo_tiny.py --workdir=runs/simpo_tiny \
        --config.model.init_from=runs/sft_tiny

A tiny model on the bundled synthetic task (no data files: jaxpo writes the task's
pair split into the workdir); runs on a CPU in a few minutes.
Without ``model.init_from`` it starts from the untrained model.
"""


def get_config() -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
        "loss": {"name": "simpo", "beta": 2.0, "kwargs": "gamma=0.5"},
        "reference": {"mode": "none"},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
        "train": {"steps": 200, "checkpoint_every": 100, "eval_every": 100},
    }
