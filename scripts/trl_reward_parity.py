"""Records TRL's reward-model numbers on a tiny Llama reward model, for jaxpo's parity test.

Run in the reference venv (torch, transformers, trl, datasets; jaxpo never imports them):

    /work/refenv/bin/python scripts/trl_reward_parity.py

It writes tests/fixtures/parity_rm/:

- ``model/``: a tiny random ``LlamaForSequenceClassification`` (``num_labels`` 1, random
  ``score`` head) with the ``tokenizer_llama3`` fixture's tokenizer files. That tokenizer has
  no padding token, so TRL pads with its end-of-sequence token and transformers reads each
  row's reward at the last token before it; ``config.json`` is saved without a
  ``pad_token_id``, as a user's checkpoint may be;
- ``pairs_<form>.jsonl``: explicit-prompt pairs, the same pairs with a per-record ``margin``
  column, conversational pairs and implicit-prompt pairs;
- ``rm_expected.json``: per form, TRL's token ids of each chosen and rejected sequence (after
  its EOS appending and chat template), the reward of each from the model's own forward pass,
  and ``RewardTrainer.evaluate``'s metrics (``loss``, ``accuracy``, ``margin``,
  ``mean_reward``, ``min_reward``, ``max_reward``) with all records in one batch; and
  ``centered``: the explicit pairs' metrics with ``center_rewards_coefficient`` 0.05.

``tests/test_parity_trl_reward.py`` recomputes them with jaxpo from the files alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "fixtures", "parity_rm")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "data", "tokenizer_llama3")
sys.path.insert(0, HERE)
from trl_parity import RECORDS as DPO_RECORDS
from trl_parity import tiny_llama_config  # the same tiny shape

METRICS = ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward")

EXPLICIT = [
    {"prompt": "What color is the sky?", "chosen": " It is blue.", "rejected": " It is green."},
    {"prompt": "Add 20 and 1.", "chosen": " The result is 21.", "rejected": " 12."},
    {"prompt": "Name the capital of France.", "chosen": " Paris.", "rejected": " Berlin."},
    {"prompt": "Tell me a joke about cats.", "chosen": " Cats are blue and they sing.",
     "rejected": " No."},
    {"prompt": "Why is the sky blue?", "chosen": " Light scatters in the air.",
     "rejected": " Because it is."},
]
RECORDS = {
    "explicit": EXPLICIT,
    "margin": [dict(r, margin=m) for r, m in zip(EXPLICIT, (0.5, 0.0, 2.0, -1.0, 1.25))],
    "conversational": DPO_RECORDS["conversational"][:2] + [  # the DPO fixture's, short
        {"prompt": [{"role": "user", "content": "Hello!"},
                    {"role": "assistant", "content": "How can I help you today?"},
                    {"role": "user", "content": "Tell me a joke."}],
         "chosen": [{"role": "assistant", "content": "Cats are blue."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
    ],
    "implicit": [
        {"chosen": "What color is the sky? It is blue.",
         "rejected": "What color is the sky? It is green."},
        {"chosen": "Tell me a joke about cats. Cats are blue.",
         "rejected": "Tell me a joke about cats. No."},
    ],
}


def build_model(out: str) -> None:
    import torch
    from transformers import LlamaForSequenceClassification

    cfg = tiny_llama_config(num_labels=1)
    path = os.path.join(out, "model")
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), os.path.join(path, f))


CENTER = 0.05  # center_rewards_coefficient of the "centered" run (explicit-prompt pairs)


def trl_form(out: str, records: list[dict], workdir: str, center: float | None = None) -> dict:
    """TRL's ids, per-sequence rewards and evaluate() metrics for one form (with
    ``center_rewards_coefficient=center`` when given)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    path = os.path.join(out, "model")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    args = RewardConfig(output_dir=workdir, report_to="none", use_cpu=True, seed=0, bf16=False,
                        fp16=False, per_device_eval_batch_size=len(records),
                        per_device_train_batch_size=len(records),
                        center_rewards_coefficient=center)
    ds = Dataset.from_list(records)
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds,
                            processing_class=tok)
    metrics = trainer.evaluate()
    processed = trainer.eval_dataset
    ids = [{"chosen_ids": list(processed[i]["chosen_ids"]),
            "rejected_ids": list(processed[i]["rejected_ids"])} for i in range(len(processed))]
    pad = model.config.pad_token_id  # TRL set it (the EOS when the tokenizer has no pad)
    rewards = {"chosen": [], "rejected": []}
    with torch.no_grad():
        for row in ids:
            for side in ("chosen", "rejected"):
                x = torch.tensor([row[f"{side}_ids"]])
                rewards[side].append(float(model(input_ids=x).logits[0, 0]))
    return {"ids": ids, "rewards": rewards, "pad_token_id": pad,
            "metrics": {k: metrics[f"eval_{k}"] for k in METRICS}}


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    build_model(OUT)
    expected = {"forms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for form, records in RECORDS.items():
            with open(os.path.join(OUT, f"pairs_{form}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            expected["forms"][form] = trl_form(OUT, records, tmp)
        expected["centered"] = trl_form(OUT, RECORDS["explicit"], tmp, CENTER)["metrics"]
        expected["centered"]["center_rewards_coefficient"] = CENTER
    with open(os.path.join(OUT, "rm_expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1)
    print(json.dumps({form: r["metrics"] for form, r in expected["forms"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
