"""A synthetic preference task with a programmatic true reward, small enough to learn on a CPU.

The task is sorting a few letters: the prompt ``"sort: d a c ->"`` asks for ``" a c d"``. The
true reward of a response is the fraction of positions that hold the right letter, counted
over the longer of the response and the answer, so a response of the wrong length loses::

    true_reward("sort: d a c ->", " a c d") = 1.0
    true_reward("sort: d a c ->", " a d c") = 1/3        (only "a" is in place)
    true_reward("sort: d a c ->", " a c d d") = 3/4      (one letter too many)

Candidate responses come from a noisy "base policy" that makes 0-2 random edits to the answer
(swap two neighbours, replace a letter) and, 80% of the time, repeats its last letter: a habit
that imitation of the chosen responses learns, and that the preferences teach away. The
generators turn candidates into every data kind jaxpo trains on, with train and held-out splits:

- ``pair``: ``{prompt, chosen, rejected}``, chosen has the higher true reward (never tied);
- ``list``: ``{prompt, responses, scores}``, K distinct candidates scored by the true reward;
- ``tree``: ``{prompt, tree}``, candidates of the right length merged on shared leading letters
  (one step per letter), leaf ``score`` = true reward;
- ``unpaired``: ``{prompt, completion, label}``, label = the completion is exactly right.

Everything is tokenised by the bundled word-level tokenizer (``jaxpo/assets/tiny_tokenizer``):
one token per letter, task word and arrow, plus ``<pad>``, ``<s>`` (BOS) and ``</s>`` (EOS).

>>> round(true_reward("sort: d a c ->", " a d c"), 3)
0.333
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from importlib import resources
from typing import Any

from jaxpo.config import KINDS

LETTERS = tuple("abcdefghij")  # the alphabet items are drawn from
TASK_WORD, ARROW = "sort:", "->"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
VOCAB = (PAD, BOS, EOS, UNK, TASK_WORD, ARROW) + LETTERS + tuple("klmnopqrstuvwxyz0123456789")


def tokenizer_dir() -> str:
    """The bundled tiny tokenizer's directory (``tokenizer.json``, ``tokenizer_config.json``)."""
    return str(resources.files("jaxpo") / "assets" / "tiny_tokenizer")


def tokenizer_files(vocab: tuple[str, ...] = VOCAB) -> dict[str, str]:
    """The text of the tiny tokenizer's files: a word-level ``tokenizers`` model over ``vocab``
    (VOCAB for the bundled one; its first four words must be the special tokens)."""
    model = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate((PAD, BOS, EOS, UNK))
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": {  # BOS before every encoded text
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [1], "tokens": [BOS]}},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(vocab)},
                  "unk_token": UNK},
    }
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
              "add_bos_token": True, "add_eos_token": False, "model_max_length": 512,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": json.dumps(model, indent=1) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=1) + "\n"}


def write_tokenizer(out_dir: str, vocab: tuple[str, ...] = VOCAB) -> str:
    """Writes the tiny tokenizer's files into ``out_dir`` (how the bundled asset was made)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, text in tokenizer_files(vocab).items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    return out_dir


# ------------------------------------------------------------------------------ the task


def make_prompt(rng: random.Random, min_items: int = 3, max_items: int = 5) -> str:
    """A prompt ``"sort: x y z ->"`` of distinct random letters."""
    items = rng.sample(LETTERS, rng.randint(min_items, max_items))
    return " ".join((TASK_WORD, *items, ARROW))


def prompt_items(prompt: str) -> list[str]:
    """The letters to sort, from a prompt ``"sort: x y z ->"``."""
    words = prompt.split()
    if len(words) < 2 or words[0] != TASK_WORD or words[-1] != ARROW:
        raise ValueError(f"not a synthetic-task prompt: {prompt!r}")
    return words[1:-1]


def answer(prompt: str) -> str:
    """The best response: the prompt's letters in order, with a leading space."""
    return " " + " ".join(sorted(prompt_items(prompt)))


def true_reward(prompt: str, response: str) -> float:
    """Fraction of positions holding the right letter, over the longer of response and answer.

    Args:
        prompt: ``"sort: x y z ->"``.
        response: the completion text; a trailing EOS (and anything after it) is ignored.

    Returns:
        A float in ``[0, 1]``; 1 only for exactly the sorted letters.
    """
    target = sorted(prompt_items(prompt))
    words = response.replace(EOS, f" {EOS} ").split()
    if EOS in words:
        words = words[: words.index(EOS)]
    hits = sum(a == b for a, b in zip(words, target))
    return hits / max(len(words), len(target))


def corrupt(rng: random.Random, words: list[str], edits: int) -> list[str]:
    """``words`` after ``edits`` random edits: swap two neighbours or replace a letter."""
    words = list(words)
    for _ in range(edits):
        if rng.random() < 0.5 and len(words) > 1:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        else:
            words[rng.randrange(len(words))] = rng.choice(LETTERS)
    return words


STUTTER = 0.8  # how often the base policy repeats its last letter


def candidate(rng: random.Random, prompt: str, *, keep_length: bool = False) -> str:
    """One response of the noisy base policy.

    The answer after 0-2 random edits, then (with probability ``STUTTER``, unless
    ``keep_length``) its last letter repeated. The stutter is the base policy's habit: most
    *chosen* responses have it too, so imitation (SFT) learns it, while the preferences say a
    response without it is better, which is what preference optimisation picks up.
    """
    edits = rng.choices((0, 1, 2), weights=(0.5, 0.35, 0.15))[0]
    words = corrupt(rng, sorted(prompt_items(prompt)), edits)
    if not keep_length and rng.random() < STUTTER:
        words.append(words[-1])
    return " " + " ".join(words)


def distinct_candidates(rng: random.Random, prompt: str, k: int, *, keep_length: bool = False,
                        min_distinct_rewards: int = 2, tries: int = 200) -> list[str]:
    """``k`` different candidates with at least ``min_distinct_rewards`` different rewards."""
    for _ in range(tries):
        seen: dict[str, None] = {}
        for _ in range(20 * k):
            seen.setdefault(candidate(rng, prompt, keep_length=keep_length))
            if len(seen) == k:
                break
        out = list(seen)
        if len(out) == k and len({true_reward(prompt, r) for r in out}) >= min_distinct_rewards:
            return out
    raise RuntimeError(f"could not draw {k} distinct candidates for {prompt!r}")


# ------------------------------------------------------------------------------ records


def pair_record(rng: random.Random) -> dict[str, Any]:
    """``{prompt, chosen, rejected}``: two candidates, the higher true reward chosen."""
    prompt = make_prompt(rng)
    a, b = distinct_candidates(rng, prompt, 2)
    if true_reward(prompt, a) < true_reward(prompt, b):
        a, b = b, a
    return {"prompt": prompt, "chosen": a, "rejected": b}


def list_record(rng: random.Random, k: int = 4) -> dict[str, Any]:
    """``{prompt, responses, scores}``: ``k`` distinct candidates and their true rewards."""
    prompt = make_prompt(rng)
    responses = distinct_candidates(rng, prompt, k)
    return {"prompt": prompt, "responses": responses,
            "scores": [round(true_reward(prompt, r), 4) for r in responses]}


def tree_record(rng: random.Random, k: int = 4) -> dict[str, Any]:
    """``{prompt, tree}``: ``k`` same-length candidates merged on shared leading letters.

    One step per letter; children of a node are in first-seen order; a leaf's ``score`` is the
    candidate's true reward.
    """
    prompt = make_prompt(rng, 3, 4)
    responses = distinct_candidates(rng, prompt, k, keep_length=True)
    root: dict[str, Any] = {"children": []}
    for response in responses:
        node = root
        for letter in response.split():
            kids = node.setdefault("children", [])
            match = next((c for c in kids if c["text"] == " " + letter), None)
            if match is None:
                match = {"text": " " + letter}
                kids.append(match)
            node = match
        node["score"] = round(true_reward(prompt, response), 4)
    return {"prompt": prompt, "tree": root["children"]}


def unpaired_record(rng: random.Random) -> dict[str, Any]:
    """``{prompt, completion, label}``: label True iff the completion is exactly right."""
    prompt = make_prompt(rng)
    if rng.random() < 0.5:
        completion = answer(prompt)
    else:
        completion = distinct_candidates(rng, prompt, 1, min_distinct_rewards=1)[0]
        while true_reward(prompt, completion) == 1.0:
            completion = candidate(rng, prompt)
    return {"prompt": prompt, "completion": completion,
            "label": true_reward(prompt, completion) == 1.0}


_MAKERS = {"pair": pair_record, "list": list_record, "tree": tree_record,
           "unpaired": unpaired_record}


def records(kind: str, n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``n`` records of ``kind`` (``pair``, ``list``, ``tree``, ``unpaired``), deterministic."""
    if kind not in _MAKERS:
        raise ValueError(f"kind={kind!r}; choose from {list(KINDS)}")
    rng = random.Random(f"{kind}-{seed}")
    for _ in range(n):
        yield _MAKERS[kind](rng)


def write_jsonl(path: str, rows: Iterator[dict[str, Any]]) -> str:
    """Writes one JSON object per line; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_task(out_dir: str, kind: str = "pair", *, num_train: int = 2000, num_eval: int = 200,
               seed: int = 0) -> dict[str, str]:
    """Writes ``<kind>_train.jsonl`` and ``<kind>_eval.jsonl`` (disjoint seeds) into ``out_dir``.

    Returns:
        ``{"train": path, "eval": path}``.
    """
    return {
        "train": write_jsonl(os.path.join(out_dir, f"{kind}_train.jsonl"),
                             records(kind, num_train, seed)),
        "eval": write_jsonl(os.path.join(out_dir, f"{kind}_eval.jsonl"),
                            records(kind, num_eval, seed + 10_000)),
    }

