"""Precomputed reference log-probs: a cache keyed by record id and a hash of what produced them.

``jaxpo precompute-ref`` runs the reference (the initial model) once over the train and eval
files and writes ``<cache_dir>/reference.npz`` (``train`` and ``eval`` tables ``[records, K]``,
NaN where a record was skipped) and ``<cache_dir>/reference.json`` with the key. The key hashes
the model (its config and a fingerprint of its parameters), the tokenizer (``tokenizer.json``),
the length settings (``max_length``, ``max_prompt_length``, ``truncation_mode``, format, K, M)
and the data files' contents. Training with ``reference.mode=precomputed`` recomputes the key
and refuses a cache whose key differs: a stale cache is an error, never a silent mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpo.models.config import ModelConfig

CACHE_FILE = "reference.npz"
KEY_FILE = "reference.json"


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Odd multipliers of a 32-bit integer hash (murmur3's finaliser constants).
_MIX = (0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1)


def _leaf_hash(x: jax.Array) -> jax.Array:
    """Two 32-bit hashes of an array's fp32 bit patterns and their flat positions ``[2]``.

    Each element is hashed with its flat index, and the hashes are summed modulo 2**32:
    integer addition is associative, so the sum is exact whatever order a sharded reduction
    takes. The fingerprint is therefore the same on one device, fsdp 8 or fsdp 4 x tp 2, on
    one process or several, and no parameter is gathered anywhere.
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    for axis, size in enumerate(x.shape):  # the flat row-major index, wrapping in uint32
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    out = []
    for a, b in (_MIX[:2], _MIX[2:]):
        h = bits * jnp.uint32(a) + index * jnp.uint32(b) + jnp.uint32(b ^ a)
        h = h ^ (h >> 15)
        h = h * jnp.uint32(a)
        h = h ^ (h >> 13)
        out.append(jnp.sum(h, dtype=jnp.uint32))
    return jnp.stack(out)


@jax.jit
def _fingerprint(params: Any) -> list[jax.Array]:
    return [_leaf_hash(x) for x in jax.tree.leaves(params)]


def params_fingerprint(params: Any) -> str:
    """A hash of the parameter values that does not depend on how they are sharded.

    Leaves in the params pytree's (path-sorted) order, each with its shape, dtype and
    :func:`_leaf_hash`; bitwise-equal parameters give the same fingerprint on any mesh and
    any number of processes (every process gets the replicated ``[2]`` hashes).
    """
    leaves = jax.tree.leaves(params)
    hashes = [np.asarray(v).tolist() for v in jax.device_get(_fingerprint(params))]
    shapes = [(tuple(x.shape), str(x.dtype)) for x in leaves]
    text = json.dumps({"shapes": shapes, "hashes": hashes})
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(model_cfg: ModelConfig, params: Any, tokenizer_dir: str, data_cfg: Any,
              files: dict[str, Sequence[str]]) -> dict[str, Any]:
    """The fields a cache is valid for (JSON-able), and their combined ``hash``."""
    key = {
        "model": json.loads(json.dumps(model_cfg.to_hf(), sort_keys=True, default=str)),
        "params": params_fingerprint(params),
        "tokenizer": _sha256_file(os.path.join(tokenizer_dir, "tokenizer.json")),
        "length": {name: getattr(data_cfg, name) for name in (
            "format", "max_length", "max_prompt_length", "truncation_mode", "max_responses",
            "max_steps")},
        "files": {split: [[os.path.basename(p), _sha256_file(p)] for p in paths]
                  for split, paths in files.items()},
    }
    key["hash"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return key


def write_cache(out_dir: str, key: dict[str, Any], tables: dict[str, np.ndarray]) -> None:
    """Writes the tables (``split -> [records, K]``) and the key."""
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, CACHE_FILE), **tables)
    with open(os.path.join(out_dir, KEY_FILE), "w", encoding="utf-8") as f:
        json.dump(key, f, indent=1, sort_keys=True)


def load_cache(cache_dir: str, key: dict[str, Any]) -> dict[str, np.ndarray]:
    """The cached tables, after checking that the cache was made for ``key``.

    Raises:
      FileNotFoundError: no cache in ``cache_dir``.
      ValueError: the cache is stale or for another model, tokenizer, data or length settings;
        the message names what differs.
    """
    key_path = os.path.join(cache_dir, KEY_FILE)
    if not os.path.exists(key_path):
        raise FileNotFoundError(f"config.reference.cache_dir={cache_dir!r}: no {KEY_FILE}; "
                                "run `jaxpo precompute-ref` first")
    with open(key_path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored.get("hash") != key["hash"]:
        differ = [name for name in key if name != "hash" and stored.get(name) != key[name]]
        raise ValueError(
            f"reference cache {cache_dir!r} is stale: it was computed for a different "
            f"{', '.join(differ) or 'setup'}; rerun `jaxpo precompute-ref` (or use "
            "reference.mode=model)")
    with np.load(os.path.join(cache_dir, CACHE_FILE)) as data:
        return {name: data[name] for name in data.files}


def fill_table(table: np.ndarray, batch: dict[str, np.ndarray], logps: np.ndarray) -> None:
    """Writes a batch's reference log-probs ``[NG, K]`` into ``table[record_id]``."""
    for g in np.flatnonzero(batch["group_mask"]):
        k = batch["response_mask"][g]
        table[batch["group_id"][g], :k.sum()] = logps[g][k]
