"""A Bradley–Terry reward model on the synthetic sorting task's preference pairs.

    jaxpo train --config=configs/rm_tiny.py --workdir=runs/rm_tiny
    jaxpo score --workdir=runs/rm_tiny --in=records.jsonl --out=rewards.jsonl
    jaxpo export --workdir=runs/rm_tiny --out=rm_hf    # LlamaForSequenceClassification

The tiny decoder with a scalar head (model.head=reward) read at each response's last token,
trained with −log σ(r_chosen − r_rejected) (loss.kwargs=margin=... for a margin; list data,
data.format=list with data.max_responses=4, trains with Plackett–Luce). No reference model.
Held-out pair accuracy (eval/accuracy) rises from about 0.5 to about 0.8 (0.46 -> 0.79, seed 0)
in under a minute on a CPU.
"""


def get_config() -> dict:
    return {
        "model": {"preset": "tiny", "head": "reward"},
        "data": {"format": "pair", "max_length": 32, "max_prompt_length": 16, "batch_size": 16},
        "loss": {"name": "bradley_terry"},
        "reference": {"mode": "none"},
        "optim": {"learning_rate": 1e-3, "warmup_steps": 10},
        "train": {"steps": 200, "checkpoint_every": 100, "eval_every": 50},
    }
