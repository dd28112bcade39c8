"""Records TRL's DPO numbers on a tiny Llama checkpoint and compares jaxpo's to them.

Run in the reference venv (torch, transformers, trl, datasets; jaxpo never imports them):

    /work/refenv/bin/python scripts/trl_parity.py            # rebuild fixtures, record, compare
    /work/refenv/bin/python scripts/trl_parity.py --no-check # only rebuild and record

It writes tests/fixtures/parity/:

- ``model/``: a tiny random ``LlamaForCausalLM`` (vocabulary of the ``tokenizer_llama3`` fixture,
  whose ``tokenizer.json`` / ``tokenizer_config.json`` are copied next to the weights);
- ``ref_model/``: a second random model of the same shape (a reference that differs from the
  policy, so rewards and margins are not zero);
- ``pairs_<form>.jsonl`` for the three pair forms (explicit prompt, conversational, implicit
  prompt), and ``pairs_<form>_ref.jsonl``: the same records with ``ref_chosen_logps`` /
  ``ref_rejected_logps`` computed by TRL with ``ref_model/``;
- ``dpo_expected.json``: per form, TRL's tokenised ids (after its collator's ``max_length``
  truncation), the policy and reference log-probs per record, and the step-0 eval metrics of
  ``DPOTrainer.evaluate`` with the reference = the policy and with ``ref_model/``.

The comparison then runs ``python3 tests/test_parity_trl.py`` (system python, jaxpo) which
prints jaxpo's numbers on the same files as JSON, and prints a table of the differences.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(ROOT, "tests", "fixtures", "parity")
TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "data", "tokenizer_llama3")

BETA = 0.1
MAX_LENGTH = 48  # TRL's collator truncation (keep_start); the long records exceed it
LONG = " It has been blue since the start, and it will stay blue until the sun sets tonight."

RECORDS = {
    "explicit": [
        {"prompt": "What color is the sky?", "chosen": " It is blue.", "rejected": " It is green."},
        {"prompt": "Add 20 and 1.", "chosen": " The result is 21.", "rejected": " 12."},
        {"prompt": "Name the capital of France.", "chosen": " Paris.", "rejected": " Berlin."},
        {"prompt": "Tell me a joke about cats.", "chosen": " Cats are blue." + LONG,
         "rejected": " No."},
        {"prompt": "Why is the sky blue?", "chosen": " Scattering." + LONG,
         "rejected": " Because." + LONG},
    ],
    "conversational": [
        {"prompt": [{"role": "user", "content": "What color is the sky?"}],
         "chosen": [{"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "assistant", "content": "It is green."}]},
        {"prompt": [{"role": "system", "content": "Answer step by step."},
                    {"role": "user", "content": "Add 20 and 1."}],
         "chosen": [{"role": "assistant", "content": "First, add the numbers. The result is 21."}],
         "rejected": [{"role": "assistant", "content": "12."}]},
        {"prompt": [{"role": "user", "content": "Hello!"},
                    {"role": "assistant", "content": "How can I help you today?"},
                    {"role": "user", "content": "Tell me a joke."}],
         "chosen": [{"role": "assistant", "content": "Cats are blue." + LONG}],
         "rejected": [{"role": "assistant", "content": "No."}]},  # prompt >= MAX_LENGTH: dropped
        {"prompt": [{"role": "user", "content": "Tell me a joke."}],
         "chosen": [{"role": "assistant", "content": "Cats are blue." + LONG}],
         "rejected": [{"role": "assistant", "content": "No." + LONG}]},
    ],
    "implicit": [
        {"chosen": "What color is the sky? It is blue.",
         "rejected": "What color is the sky? It is green."},
        {"chosen": "Tell me a joke about cats. Cats are blue.",
         "rejected": "Tell me a joke about cats. No."},
        {"chosen": "The capital of France is Paris." + LONG,
         "rejected": "The capital of France is Berlin."},
    ],
}


# ----------------------------------------------------------------------------- fixtures


def tiny_llama_config(**extra):
    """The parity fixtures' tiny Llama shape on the ``tokenizer_llama3`` fixture's vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5,
                       initializer_range=0.2, tie_word_embeddings=False,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)


def build_models(out: str) -> None:
    """``out/model`` (policy, with the tokenizer files) and ``out/ref_model`` (weights only)."""
    import torch
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    for name, seed in (("model", 0), ("ref_model", 1)):
        path = os.path.join(out, name)
        shutil.rmtree(path, ignore_errors=True)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).to(torch.float32)
        model.save_pretrained(path, safe_serialization=True)
        gen = os.path.join(path, "generation_config.json")
        if os.path.exists(gen):
            os.remove(gen)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), os.path.join(out, "model", f))


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


# ----------------------------------------------------------------------------- TRL


def trl_form(out: str, form: str, records: list[dict], workdir: str) -> dict:
    """TRL's ids, per-record log-probs and step-0 eval metrics for one pair form."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"),
                                                  dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(os.path.join(out, "ref_model"),
                                               dtype=torch.float32).eval()
    args = DPOConfig(output_dir=workdir, report_to="none", use_cpu=True, beta=BETA,
                     max_length=MAX_LENGTH, per_device_eval_batch_size=len(records),
                     per_device_train_batch_size=len(records), dataloader_drop_last=False,
                     seed=0, bf16=False, fp16=False)  # fp32 (bf16 autocast is the default)
    ds = Dataset.from_list([dict(r, idx=i) for i, r in enumerate(records)])
    result: dict = {}
    # Batches of 2: TRL's eval loss is the mean over records, its other metrics the mean of
    # the per-batch means (a partial last batch weighs as much as a full one).
    for suffix, batch_size in (("", len(records)), ("_batch2", 2)):
        args.per_device_eval_batch_size = batch_size
        for name, ref_model in (("same_reference", None), ("ref_model", ref)):
            trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=ds,
                                 eval_dataset=ds, processing_class=tok)
            metrics = trainer.evaluate()
            result[name + suffix] = {k[len("eval_"):]: v for k, v in metrics.items()
                                     if k.startswith("eval_") and ("rewards/" in k
                                                                   or "logps/" in k
                                                                   or k == "eval_loss")}
            if not suffix:
                processed = trainer.eval_dataset
    args.per_device_eval_batch_size = len(records)
    examples = [processed[i] for i in range(len(processed))]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        pc, pr = trainer.compute_ref_log_probs(policy, batch)
        rc, rr = trainer.compute_ref_log_probs(ref, batch)
    ids = []
    for i, ex in enumerate(examples):
        p = len(ex["prompt_ids"])
        n = len(examples)
        keep = [int(batch["completion_mask"][j].sum()) for j in (i, n + i)]
        ids.append({"prompt_ids": list(ex["prompt_ids"]),
                    "chosen_ids": list(ex["chosen_ids"])[:keep[0]],
                    "rejected_ids": list(ex["rejected_ids"])[:keep[1]],
                    "chosen_untruncated": len(ex["chosen_ids"]),
                    "rejected_untruncated": len(ex["rejected_ids"]),
                    "prompt_length": p})
    result["kept"] = [int(ex["idx"]) for ex in examples]  # TRL drops prompts >= max_length
    result["records"] = ids
    result["policy_logps"] = {"chosen": pc.tolist(), "rejected": pr.tolist()}
    result["ref_model_logps"] = {"chosen": rc.tolist(), "rejected": rr.tolist()}
    return result


def check_semantics(form_result: dict) -> dict:
    """Recomputes TRL's eval metrics from its per-record log-probs (a check of the formulas)."""
    import math

    pc, pr = form_result["policy_logps"]["chosen"], form_result["policy_logps"]["rejected"]
    rc, rr = form_result["ref_model_logps"]["chosen"], form_result["ref_model_logps"]["rejected"]
    ch = [BETA * (a - b) for a, b in zip(pc, rc)]
    rj = [BETA * (a - b) for a, b in zip(pr, rr)]
    n = len(pc)
    return {
        "loss": sum(math.log1p(math.exp(-(c - r))) for c, r in zip(ch, rj)) / n,
        "rewards/chosen": sum(ch) / n, "rewards/rejected": sum(rj) / n,
        "rewards/margins": sum(c - r for c, r in zip(ch, rj)) / n,
        "rewards/accuracies": sum(float(c > r) for c, r in zip(ch, rj)) / n,
        "logps/chosen": sum(pc) / n, "logps/rejected": sum(pr) / n,
    }


# ----------------------------------------------------------------------------- compare


def compare(expected: dict) -> int:
    """Runs jaxpo (system python) on the fixtures and prints the differences; 1 on mismatch."""
    proc = subprocess.run(["python3", os.path.join(ROOT, "tests", "test_parity_trl.py")],
                          cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        return 1
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    bad = 0
    print(f"{'form':15s} {'quantity':32s} {'max |jaxpo - TRL|':>18s}")
    for form, trl in expected["forms"].items():
        mine = got[form]
        if mine["ids"] != [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]]
                           for r in trl["records"]]:
            print(f"{form:15s} {'token ids':32s} {'DIFFER':>18s}")
            bad += 1
        rows = {"policy_logps": (mine["policy_logps"], trl["policy_logps"])}
        for mode in ("same_reference", "ref_model", "same_reference_batch2", "ref_model_batch2"):
            for k, v in trl[mode].items():
                rows[f"{mode}:{k}"] = ({"x": [mine[mode][k]]}, {"x": [v]})
        if "train_step_ref_model" in mine:
            for k, v in trl["ref_model"].items():
                rows[f"train_step:{k}"] = ({"x": [mine["train_step_ref_model"][k]]}, {"x": [v]})
        for name, (a, b) in rows.items():
            diff = max(abs(x - y) for key in b for x, y in zip(a[key], b[key]))
            bad += diff > 1e-4
            print(f"{form:15s} {name:32s} {diff:18.2e}{'  MISMATCH' if diff > 1e-4 else ''}")
    print("all match" if not bad else f"{bad} mismatches")
    return int(bad > 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-check", action="store_true", help="only record TRL's numbers")
    parser.add_argument("--no-record", action="store_true", help="only compare")
    args = parser.parse_args()
    path = os.path.join(OUT, "dpo_expected.json")
    if not args.no_record:
        os.makedirs(OUT, exist_ok=True)
        build_models(OUT)
        expected = {"beta": BETA, "max_length": MAX_LENGTH, "truncation_mode": "keep_start",
                    "loss_type": "sigmoid", "forms": {}}
        dropped: list[dict] = []
        with tempfile.TemporaryDirectory() as tmp:
            for form, records in RECORDS.items():
                res = trl_form(OUT, form, records, tmp)
                dropped += [r for i, r in enumerate(records)
                            if i not in res["kept"]]
                records = [records[i] for i in res["kept"]]
                write_jsonl(os.path.join(OUT, f"pairs_{form}.jsonl"), records)
                check = check_semantics(res)
                for k, v in check.items():
                    assert abs(v - res["ref_model"][k]) < 1e-5, (form, k, v, res["ref_model"][k])
                with_ref = [dict(r, ref_chosen_logps=c, ref_rejected_logps=j) for r, c, j in zip(
                    records, res["ref_model_logps"]["chosen"], res["ref_model_logps"]["rejected"])]
                write_jsonl(os.path.join(OUT, f"pairs_{form}_ref.jsonl"), with_ref)
                expected["forms"][form] = res
        # Records TRL drops (prompt alone >= max_length), kept apart: jaxpo's config always
        # cuts prompts to max_prompt_length < max_length first, so it would keep them.
        write_jsonl(os.path.join(OUT, "pairs_dropped.jsonl"), dropped)
        expected["dropped"] = len(dropped)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(expected, f, indent=1)
        print(f"wrote {path}")
    if args.no_check:
        return 0
    with open(path, encoding="utf-8") as f:
        return compare(json.load(f))


if __name__ == "__main__":
    sys.exit(main())
