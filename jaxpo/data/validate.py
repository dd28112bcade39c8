"""Field checks shared by the record parsers: each raises :class:`BadRecordError` naming the field.

Reasons (the keys skipped records are counted under): ``missing_field``, ``wrong_type``,
``empty``, ``nan_score``, ``bad_rank``, ``length_mismatch``, ``too_few_responses``,
``too_many_responses``, ``duplicate_responses``, ``identical_responses``, ``no_preference``,
``no_common_prompt``, ``empty_children``, ``leaf_without_score``, ``tree_too_deep``,
``unknown_format``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from jaxpo.data.errors import BadRecordError, Where

Message = dict[str, str]


def bad(where: Where, field: str, reason: str, detail: str) -> BadRecordError:
    """Builds (does not raise) a :class:`BadRecordError`."""
    return BadRecordError(where, field, reason, detail)


def require(record: dict[str, Any], field: str, where: Where) -> Any:
    """The value of a required field; a missing or null field is an error."""
    if field not in record or record[field] is None:
        raise bad(where, field, "missing_field", "missing")
    return record[field]


def is_messages(value: Any) -> bool:
    """Whether a value looks like a conversation: a list whose first item is a dict with a role."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict) and (
        "role" in value[0]
    )


def check_text(value: Any, field: str, where: Where) -> str:
    """A non-empty string."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise bad(where, field, "wrong_type", f"expected a string, got {type(value).__name__}")
    if not value:
        raise bad(where, field, "empty", "empty string")
    return value


def check_messages(value: Any, field: str, where: Where) -> list[Message]:
    """A non-empty list of ``{role, content}`` messages with string roles and contents.

    Extra keys of a message are kept (templates may read them); null values are dropped.
    """
    if not isinstance(value, (list, tuple)) or not value:
        raise bad(where, field, "wrong_type" if value else "empty",
                  "expected a non-empty message list")
    messages = []
    for i, m in enumerate(value):
        f = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f, "wrong_type", f"expected a message dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m or m[key] is None:
                raise bad(where, f"{f}.{key}", "missing_field", "missing")
            if not isinstance(m[key], str):
                raise bad(where, f"{f}.{key}", "wrong_type", "expected a string")
        if not m["role"]:
            raise bad(where, f"{f}.role", "empty", "empty string")
        messages.append({k: v for k, v in m.items() if v is not None})
    return messages


def check_turn(value: Any, field: str, where: Where, conversational: bool) -> str | list[Message]:
    """A prompt or completion: a message list when ``conversational`` else a non-empty string."""
    if conversational:
        if not is_messages(value):
            raise bad(where, field, "wrong_type", "expected a message list like the other fields")
        messages = check_messages(value, field, where)
        if not any(m["content"] for m in messages):
            raise bad(where, field, "empty", "all message contents are empty")
        return messages
    if is_messages(value):
        raise bad(where, field, "wrong_type", "a message list where the other fields are strings")
    return check_text(value, field, where)


def check_number(value: Any, field: str, where: Where) -> float:
    """A finite real number (bools are rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise bad(where, field, "wrong_type", f"expected a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise bad(where, field, "nan_score", "NaN")
    if math.isinf(value):
        raise bad(where, field, "nan_score", "infinite")
    return value


def check_numbers(value: Any, field: str, where: Where, length: int) -> list[float]:
    """A list of ``length`` finite numbers."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise bad(where, field, "wrong_type", f"expected a list, got {type(value).__name__}")
    if len(value) != length:
        raise bad(where, field, "length_mismatch", f"{len(value)} values for {length} responses")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(check_number(v, field, where))
        except BadRecordError as e:
            raise bad(where, field, e.reason, f"{e.detail} at index {i}") from None
    return out


def check_ranks(value: Any, field: str, where: Where, length: int) -> list[int]:
    """A list of ``length`` integer ranks, 1 = best, each in ``[1, length]``."""
    ranks = check_numbers(value, field, where, length)
    for i, r in enumerate(ranks):
        if r != int(r) or not 1 <= r <= length:
            raise bad(where, field, "bad_rank",
                      f"rank {value[i]!r} at index {i} not in 1..{length}")
    return [int(r) for r in ranks]


def check_bool(value: Any, field: str, where: Where) -> bool:
    """A boolean (JSON true/false; 0/1 integers are accepted)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise bad(where, field, "wrong_type", f"expected a bool, got {value!r}")


def check_distinct(responses: list[Any], field: str, where: Where) -> None:
    """No two responses of a group are equal."""
    seen: dict[str, int] = {}
    for i, r in enumerate(responses):
        key = repr(r)
        if key in seen:
            raise bad(where, field, "duplicate_responses",
                      f"responses {seen[key]} and {i} are equal")
        seen[key] = i


def check_preference(values: list[float], field: str, where: Where) -> None:
    """At least two distinct scores: a group whose responses all tie teaches nothing."""
    if len(set(values)) < 2:
        raise bad(where, field, "no_preference", "all responses have the same score")


def check_count(k: int, field: str, where: Where, max_responses: int | None) -> None:
    """2 ≤ K ≤ max_responses."""
    if k < 2:
        raise bad(where, field, "too_few_responses", f"K={k}, a group needs at least 2 responses")
    if max_responses is not None and k > max_responses:
        raise bad(where, field, "too_many_responses", f"K={k} > max_responses={max_responses}")
