"""A family of synthetic tasks with programmatic true rewards, and their preference data in
every shape jaxpo trains on (the alignment-quality benchmark's tasks, ``jaxpo bench quality``).

Each :class:`Task` has a prompt maker, a true reward in ``[0, 1]`` (1 only for a fully correct
answer) and a noisy *base policy* that makes a few random edits to a correct answer and, 80% of
the time, repeats its last word: a habit that imitation (SFT) of its better responses learns,
and that preferences teach away. The tasks:

- ``sort``: the bundled task (:mod:`jaxpo.tasks.synthetic`, unchanged): ``sort: d a c ->`` →
  ``a c d``; reward = fraction of positions holding the right letter;
- ``add``: arithmetic with partial credit, a two-digit plus a one-digit number:
  ``add: 4 7 + 8 ->`` → ``5 5`` (any sum parses: ``add: 4 7 + 5 9 ->`` → ``1 0 6``); reward = fraction
  of digit positions right (over the longer of response and answer); the base policy's edits
  are carry slips (a digit off by one) and swapped neighbours;
- ``rise``: constrained generation with graded criteria: ``rise: c 4 ->`` asks for 4 distinct
  letters of ``a``–``j`` in increasing order starting with ``c`` (many answers are right);
  reward = mean of four criteria: starts with the letter (0/1), length credit
  ``max(0, 1 − |len − n|/n)``, share of neighbours in increasing order, share of distinct
  letters.

Words the bundled vocabulary lacks (``add:``, ``+``, ``rise:``) are in :data:`VOCAB`, the
family's own word-level tokenizer built like the bundled one (:func:`write_tokenizer`).

Record makers (all deterministic in their ``random.Random``): ``pair`` (two candidates of
different rewards, the better one chosen), ``list`` (K distinct candidates, scores = true
rewards), ``tree`` (K same-length candidates merged on shared leading words, one step per word,
each internal step carrying a step reward: 1 when the answer so far can still be completed to a
fully correct one, else 0; leaves scored by the true reward), ``unpaired`` (a correct answer or
a flawed candidate, labelled), ``flipped`` (pairs whose labels are swapped with probability
``flip``), and the pair views of lists and trees (``best_vs_worst``).

>>> add = TASKS["add"]
>>> add.answer("add: 4 7 + 5 9 ->"), round(add.true_reward("add: 4 7 + 5 9 ->", " 1 0 7"), 3)
(' 1 0 6', 0.667)
>>> TASKS["rise"].true_reward("rise: c 4 ->", " c e f h")
1.0
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Iterator
from typing import Any

from jaxpo.tasks import synthetic

VOCAB = synthetic.VOCAB + ("add:", "+", "rise:")
DIGITS = tuple("0123456789")
STUTTER = synthetic.STUTTER  # how often every base policy repeats its last word
EDIT_WEIGHTS = (0.5, 0.35, 0.15)  # P(0, 1, 2 random edits) of a base-policy candidate


def write_tokenizer(out_dir: str) -> str:
    """Writes the family's word-level tokenizer (the bundled one plus :data:`VOCAB`'s words)."""
    return synthetic.write_tokenizer(out_dir, VOCAB)


def _words(response: str) -> list[str]:
    """The words of a response up to an end-of-sequence token."""
    words = response.replace(synthetic.EOS, f" {synthetic.EOS} ").split()
    return words[: words.index(synthetic.EOS)] if synthetic.EOS in words else words


def _positional(words: list[str], target: list[str]) -> float:
    """Fraction of positions holding the target word, over the longer of the two."""
    return sum(a == b for a, b in zip(words, target)) / max(len(words), len(target), 1)


def _prompt_words(prompt: str, task_word: str) -> list[str]:
    words = prompt.split()
    if len(words) < 2 or words[0] != task_word or words[-1] != synthetic.ARROW:
        raise ValueError(f"not a {task_word[:-1]!r} prompt: {prompt!r}")
    return words[1:-1]


# ------------------------------------------------------------------------------ sort


def _sort_prefix_ok(prompt: str, words: list[str]) -> bool:
    return words == sorted(synthetic.prompt_items(prompt))[: len(words)]


# ------------------------------------------------------------------------------ add


def _add_numbers(prompt: str) -> tuple[int, int]:
    words = _prompt_words(prompt, "add:")
    if "+" not in words:
        raise ValueError(f"not an 'add' prompt: {prompt!r}")
    i = words.index("+")
    return int("".join(words[:i])), int("".join(words[i + 1:]))


def _add_prompt(rng: random.Random) -> str:
    """A two-digit plus a one-digit number: within reach of the benchmark's tiny model (its SFT
    base reaches partial credit and some exact answers; three-digit sums stayed at the floor)."""
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    return " ".join(("add:", *str(a), "+", *str(b), synthetic.ARROW))


def _add_answer(prompt: str) -> str:
    return " " + " ".join(str(sum(_add_numbers(prompt))))


def _add_reward(prompt: str, response: str) -> float:
    return _positional(_words(response), _add_answer(prompt).split())


def _add_candidate(rng: random.Random, prompt: str, keep_length: bool = False) -> str:
    words = _add_answer(prompt).split()
    for _ in range(rng.choices((0, 1, 2), weights=EDIT_WEIGHTS)[0]):
        if rng.random() < 0.5 and len(words) > 1:  # swapped neighbours
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        else:  # a carry slip: one digit off by one
            i = rng.randrange(len(words))
            words[i] = str((int(words[i]) + rng.choice((-1, 1))) % 10)
    if not keep_length and rng.random() < STUTTER:
        words.append(words[-1])
    return " " + " ".join(words)


def _add_prefix_ok(prompt: str, words: list[str]) -> bool:
    return words == _add_answer(prompt).split()[: len(words)]


# ------------------------------------------------------------------------------ rise


def _rise_spec(prompt: str) -> tuple[str, int]:
    words = _prompt_words(prompt, "rise:")
    if len(words) != 2 or words[0] not in synthetic.LETTERS or not words[1].isdigit():
        raise ValueError(f"not a 'rise' prompt: {prompt!r}")
    return words[0], int(words[1])


def _rise_prompt(rng: random.Random) -> str:
    n = rng.randint(3, 5)
    start = rng.choice(synthetic.LETTERS[: len(synthetic.LETTERS) - n + 1])
    return " ".join(("rise:", start, str(n), synthetic.ARROW))


def _rise_some_answer(rng: random.Random, prompt: str) -> list[str]:
    start, n = _rise_spec(prompt)
    later = [c for c in synthetic.LETTERS if c > start]
    return [start, *sorted(rng.sample(later, n - 1))]


def _rise_answer(prompt: str) -> str:
    """The alphabetically first right answer (one of many)."""
    start, n = _rise_spec(prompt)
    i = synthetic.LETTERS.index(start)
    return " " + " ".join(synthetic.LETTERS[i: i + n])


def _rise_reward(prompt: str, response: str) -> float:
    start, n = _rise_spec(prompt)
    words = _words(response)
    if not words:
        return 0.0
    starts = float(words[0] == start)
    length = max(0.0, 1 - abs(len(words) - n) / n)
    rising = (sum(a < b for a, b in itertools.pairwise(words)) / (len(words) - 1)
              if len(words) > 1 else 0.0)
    distinct = len(set(words)) / len(words)
    return (starts + length + rising + distinct) / 4


def _rise_candidate(rng: random.Random, prompt: str, keep_length: bool = False) -> str:
    words = synthetic.corrupt(rng, _rise_some_answer(rng, prompt),
                              rng.choices((0, 1, 2), weights=EDIT_WEIGHTS)[0])
    if not keep_length and rng.random() < STUTTER:
        words.append(words[-1])
    return " " + " ".join(words)


def _rise_prefix_ok(prompt: str, words: list[str]) -> bool:
    start, n = _rise_spec(prompt)
    return (len(words) <= n and bool(words) and words[0] == start
            and all(a < b for a, b in itertools.pairwise(words))
            and synthetic.LETTERS.index(words[-1]) + n - len(words) < len(synthetic.LETTERS))


# ------------------------------------------------------------------------------ the family


@dataclasses.dataclass(frozen=True)
class Task:
    """One synthetic task.

    Attributes:
      name: the task's name (``sort``, ``add``, ``rise``).
      make_prompt: ``rng -> prompt``.
      answer: ``prompt -> a fully correct response``.
      true_reward: ``(prompt, response) -> [0, 1]``, 1 only when fully correct.
      candidate: ``(rng, prompt, keep_length) -> response`` of the noisy base policy
        (``keep_length``: without the stutter, for trees).
      prefix_ok: ``(prompt, words) -> whether they can still become a fully correct answer``.
      right_answer: ``(rng, prompt) -> a fully correct response`` (the unpaired data's desirable
        completions); :attr:`answer` when the task has only one.
    """

    name: str
    make_prompt: Callable[[random.Random], str]
    answer: Callable[[str], str]
    true_reward: Callable[[str, str], float]
    candidate: Callable[..., str]
    prefix_ok: Callable[[str, list[str]], bool]
    right_answer: Callable[[random.Random, str], str] | None = None

    def __post_init__(self):
        if self.right_answer is None:
            object.__setattr__(self, "right_answer", lambda rng, prompt: self.answer(prompt))


TASKS: dict[str, Task] = {
    "sort": Task("sort", synthetic.make_prompt, synthetic.answer, synthetic.true_reward,
                 lambda rng, p, keep_length=False: synthetic.candidate(
                     rng, p, keep_length=keep_length), _sort_prefix_ok),
    "add": Task("add", _add_prompt, _add_answer, _add_reward, _add_candidate, _add_prefix_ok),
    "rise": Task("rise", _rise_prompt, _rise_answer, _rise_reward, _rise_candidate,
                 _rise_prefix_ok,
                 lambda rng, prompt: " " + " ".join(_rise_some_answer(rng, prompt))),
}


def get(name: str) -> Task:
    """The task called ``name`` (a ``ValueError`` naming the known ones otherwise)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {list(TASKS)}")
    return TASKS[name]


def candidates(task: Task, rng: random.Random, prompt: str, k: int, *,
               keep_length: bool = False, tries: int = 200) -> list[str]:
    """``k`` distinct base-policy candidates with at least two different true rewards."""
    for _ in range(tries):
        seen: dict[str, None] = {}
        for _ in range(20 * k):
            seen.setdefault(task.candidate(rng, prompt, keep_length))
            if len(seen) == k:
                break
        out = list(seen)
        if len(out) == k and len({task.true_reward(prompt, r) for r in out}) >= 2:
            return out
    raise RuntimeError(f"could not draw {k} distinct candidates for {prompt!r}")


def pair_record(task: Task, rng: random.Random) -> dict[str, Any]:
    """``{prompt, chosen, rejected}``: two candidates, the higher true reward chosen."""
    prompt = task.make_prompt(rng)
    a, b = candidates(task, rng, prompt, 2)
    if task.true_reward(prompt, a) < task.true_reward(prompt, b):
        a, b = b, a
    return {"prompt": prompt, "chosen": a, "rejected": b}


def flipped_record(task: Task, rng: random.Random, flip: float) -> dict[str, Any]:
    """A pair whose chosen and rejected are swapped with probability ``flip`` (label noise)."""
    record = pair_record(task, rng)
    if rng.random() < flip:
        record["chosen"], record["rejected"] = record["rejected"], record["chosen"]
    return record


def list_record(task: Task, rng: random.Random, k: int) -> dict[str, Any]:
    """``{prompt, responses, scores}``: ``k`` distinct candidates and their true rewards."""
    prompt = task.make_prompt(rng)
    responses = candidates(task, rng, prompt, k)
    return {"prompt": prompt, "responses": responses,
            "scores": [round(task.true_reward(prompt, r), 4) for r in responses]}


def tree_record(task: Task, rng: random.Random, k: int) -> dict[str, Any]:
    """``{prompt, tree}``: ``k`` same-length candidates merged on shared leading words.

    One step per word, children in first-seen order; an internal step's ``reward`` is 1 when
    the words so far can still become a fully correct answer (else 0); a leaf's ``score`` is
    the candidate's true reward.
    """
    prompt = task.make_prompt(rng)
    root: dict[str, Any] = {"children": []}
    for response in candidates(task, rng, prompt, k, keep_length=True):
        node, words = root, response.split()
        for depth, word in enumerate(words, 1):
            kids = node.setdefault("children", [])
            match = next((c for c in kids if c["text"] == " " + word), None)
            if match is None:
                match = {"text": " " + word}
                if depth < len(words):
                    match["reward"] = float(task.prefix_ok(prompt, words[:depth]))
                kids.append(match)
            node = match
        node["score"] = round(task.true_reward(prompt, response), 4)
    return {"prompt": prompt, "tree": root["children"]}


def unpaired_record(task: Task, rng: random.Random) -> dict[str, Any]:
    """``{prompt, completion, label}``: half right answers (True), half flawed ones (False)."""
    prompt = task.make_prompt(rng)
    if rng.random() < 0.5:
        return {"prompt": prompt, "completion": task.right_answer(rng, prompt), "label": True}
    completion = task.candidate(rng, prompt)
    while task.true_reward(prompt, completion) == 1.0:
        completion = task.candidate(rng, prompt)
    return {"prompt": prompt, "completion": completion, "label": False}


def best_vs_worst(record: dict[str, Any]) -> dict[str, Any]:
    """The pair (highest, lowest score) of a list record, or of a tree record's leaves."""
    if "tree" in record:
        scored = list(_leaves(record["tree"], ""))
    else:
        scored = list(zip(record["responses"], record["scores"]))
    best = max(scored, key=lambda x: x[1])
    worst = min(scored, key=lambda x: x[1])
    return {"prompt": record["prompt"], "chosen": best[0], "rejected": worst[0]}


def _leaves(nodes: list[dict[str, Any]], prefix: str) -> Iterator[tuple[str, float]]:
    for node in nodes:
        text = prefix + node["text"]
        if node.get("children"):
            yield from _leaves(node["children"], text)
        else:
            yield text, node["score"]


def records(task: Task, shape: str, n: int, seed: int, *, k: int = 4, flip: float = 0.0
            ) -> Iterator[dict[str, Any]]:
    """``n`` records of ``shape`` (``pair``, ``flipped``, ``list``, ``tree``, ``unpaired``),
    deterministic in ``(task, shape, k, flip, seed)``."""
    rng = random.Random(f"{task.name}-{shape}-{k}-{flip}-{seed}")
    makers: dict[str, Callable[[], dict[str, Any]]] = {
        "pair": lambda: pair_record(task, rng),
        "flipped": lambda: flipped_record(task, rng, flip),
        "list": lambda: list_record(task, rng, k),
        "tree": lambda: tree_record(task, rng, k),
        "unpaired": lambda: unpaired_record(task, rng),
    }
    if shape not in makers:
        raise ValueError(f"unknown data shape {shape!r}; choose from {list(makers)}")
    for _ in range(n):
        yield makers[shape]()
