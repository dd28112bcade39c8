"""Online DPO on the synthetic sorting task: the policy's own samples, scored by the true reward.

    jaxpo train --config=configs/sft_tiny.py --workdir=runs/sft_tiny     # warm-up, once
    jaxpo train --config=configs/online_dpo_tiny.py --workdir=runs/online_dpo_tiny \
        --config.model.init_from=runs/sft_tiny

Every update samples 4 responses to each of 16 prompts from the current policy (temperature 1),
scores them with the task's true reward (``rollout.reward=task``) and trains DPO on the best
vs the worst sample of each prompt; the reference stays the starting model. Start it from the
SFT warm-up: the untrained model's samples are noise whose rewards tie (see docs/onpolicy.md).
About two minutes on a CPU; ``rollout/reward_mean`` in metrics.jsonl goes up.
"""


def get_config() -> dict:
    return {
        "model": {"preset": "tiny"},
        "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
        "loss": {"name": "dpo", "beta": 0.1},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
        "rollout": {"enabled": True, "every": 1, "prompts_per_rollout": 16, "num_samples": 4,
                    "temperature": 1.0, "max_new_tokens": 8, "reward": "task", "build": "pairs"},
        "train": {"steps": 100, "checkpoint_every": 50, "eval_every": 50, "log_every": 10},
    }
