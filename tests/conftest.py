"""Shared test setup: one persistent JAX compilation cache for the whole session.

Many tests build the same tiny model and train or evaluate it with the same shapes (every
`jaxpo train` through the command compiles the same step): with the cache, each program is
compiled once per session instead of once per test.
"""

import jax
import pytest

_NAMES = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache(tmp_path_factory):
    before = {name: getattr(jax.config, name) for name in _NAMES}
    jax.config.update(_NAMES[0], str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update(_NAMES[1], 0.0)
    jax.config.update(_NAMES[2], 0)
    yield
    for name, value in before.items():
        jax.config.update(name, value)
