"""Iterative DPO on the synthetic sorting task: rounds of samples, the reference refreshed each.

    jaxpo train --config=configs/sft_tiny.py --workdir=runs/sft_tiny     # warm-up, once
    jaxpo train --config=configs/iterative_dpo_tiny.py --workdir=runs/iterative_dpo_tiny \
        --config.model.init_from=runs/sft_tiny

Every 25 updates a round samples 4 responses to each of 256 prompts from the current policy,
scores them with the task's true reward and trains DPO on best-vs-worst pairs for the next 25
updates, against a reference refreshed to the policy at the start of the round
(``rollout.refresh_reference`` is on by default when ``rollout.every > 1``). Start it from
the SFT warm-up. A few minutes on a CPU.
"""


def get_config() -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
        "rollout": {"enabled": True, "every": 25, "prompts_per_rollout": 256, "num_samples": 4,
                    "temperature": 1.0, "max_new_tokens": 8, "reward": "task", "build": "pairs"},
        "train": {"steps": 100, "checkpoint_every": 25, "eval_every": 25, "log_every": 5},
    }
