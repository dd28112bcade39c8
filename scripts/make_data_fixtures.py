"""Writes the small record files of every kind under tests/fixtures/data/ (JSONL and Parquet).

    python scripts/make_data_fixtures.py

Each kind gets ``<kind>.jsonl`` and ``<kind>.parquet`` with the same records: pairs in TRL's three
forms (explicit prompt, implicit prompt, conversational), lists (scores or ranks, K = 2..4),
trees (nested and flat), unpaired (KTO).
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "data")


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


FILES = {
    "pairs_explicit": [
        {"prompt": "What color is the sky?", "chosen": " It is blue.", "rejected": " It is green.",
         "ref_chosen_logps": -3.5, "ref_rejected_logps": -4.25},
        {"prompt": "Add 20 and 1.", "chosen": " The result is 21.", "rejected": " 12.",
         "ref_chosen_logps": -6.0, "ref_rejected_logps": -2.5},
        {"prompt": "Name the capital of France.", "chosen": " Paris.", "rejected": " Berlin.",
         "ref_chosen_logps": -1.25, "ref_rejected_logps": -5.0},
    ],
    "pairs_implicit": [
        {"chosen": "What color is the sky? It is blue.",
         "rejected": "What color is the sky? It is green."},
        {"chosen": "Tell me a joke about cats. Cats are blue.",
         "rejected": "Tell me a joke about cats. No."},
        {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Berlin."},
    ],
    "pairs_conversational": [
        {"prompt": user("What color is the sky?"), "chosen": assistant("It is blue."),
         "rejected": assistant("It is green.")},
        {"prompt": [{"role": "system", "content": "Answer step by step."}] + user("Add 20 and 1."),
         "chosen": assistant("First, add the numbers. The result is 21."),
         "rejected": assistant("12.")},
        {"prompt": user("Hello!") + assistant("How can I help you today?")
         + user("Tell me a joke about cats."),
         "chosen": assistant("Cats are blue."), "rejected": assistant("No.")},
    ],
    "lists": [
        {"prompt": "Name the capital of France.",
         "responses": [" Paris.", " Berlin.", " Lyon, maybe.", " France."],
         "scores": [9.0, 1.0, 4.0, 2.5]},
        {"prompt": "What color is the sky?", "responses": [" Green.", " Blue."],
         "scores": [0.0, 1.0]},
        {"prompt": "Add 20 and 1.", "responses": [" 12.", " 21.", " The result is 21."],
         "ranks": [3, 2, 1]},
    ],
    "trees": [
        {"prompt": "Add 20 and 1, then divide by 3.",
         "tree": {"text": " First, add the numbers: 21.", "children": [
             {"text": " Then divide by 3: 7.", "score": 1.0},
             {"text": " Then divide by 3: 6.", "score": 0.0},
             {"text": " Then, divide by two.", "reward": 0.1, "children": [
                 {"text": " The result is 10.5.", "score": 0.2}]}]}},
        {"prompt": "What color is the sky?",
         "tree": {"text": "", "children": [
             {"text": " It is blue.", "score": 2.0},
             {"text": " It is", "children": [{"text": " green.", "score": -1.0},
                                             {"text": " red.", "score": -2.0}]}]}},
    ],
    "trees_flat": [
        {"prompt": "Add 20 and 1, then divide by 3.", "responses": [
            {"steps": [" First, add the numbers: 21.", " Then divide by 3: 7."], "score": 1.0},
            {"steps": [" First, add the numbers: 21.", " Then divide by 3: 6."], "score": 0.0},
            {"steps": [" Add: 12.", " Divide: 4."], "score": 0.1}]},
        {"prompt": "What color is the sky?", "responses": [
            {"steps": [" It is", " blue."], "score": 2.0},
            {"steps": [" It is", " green."], "score": -1.0}]},
    ],
    "unpaired": [
        {"prompt": "What color is the sky?", "completion": " It is blue.", "label": True},
        {"prompt": "What color is the sky?", "completion": " It is green.", "label": False},
        {"prompt": "Add 20 and 1.", "completion": " The result is 21.", "label": True},
    ],
}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name, records in FILES.items():
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        pq.write_table(pa.Table.from_struct_array(pa.array(records)),  # schema from all rows
                       os.path.join(OUT, f"{name}.parquet"))
        print(name, len(records))


if __name__ == "__main__":
    main()
