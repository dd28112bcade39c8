"""Generation: cached greedy decoding equals step-by-step full forwards; sampling controls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxpo.models import Transformer, generate, get_preset

VOCAB = 64
NEW = 5
_forward = nnx.jit(lambda model, tokens: model(tokens))


@pytest.fixture(scope="module")
def model():
    # Larger-than-default init so greedy continuations are not all the same token.
    cfg = get_preset("tiny-qwen2", vocab_size=VOCAB, initializer_range=0.3)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    lengths = [6, 3]  # ragged: row 1 is left-padded, its padding is junk tokens
    tokens = rng.integers(0, VOCAB, (2, 6)).astype(np.int32)
    mask = np.arange(6)[None] >= 6 - np.array(lengths)[:, None]
    return tokens, mask


def _greedy_by_full_forward(model, prompt, steps):
    seq = list(prompt)
    for _ in range(steps):
        # Right-pad to a fixed length so the reference compiles once.
        padded = np.zeros((1, len(prompt) + steps), np.int32)
        padded[0, :len(seq)] = seq
        logits = np.asarray(_forward(model, jnp.asarray(padded)))[0, len(seq) - 1]
        seq.append(int(np.argmax(logits)))
    return seq[len(prompt):]


def test_greedy_with_cache_equals_full_forward_argmax(model, prompts):
    tokens, mask = prompts
    out = generate(model, tokens, mask, max_new_tokens=NEW, eos_token_id=())
    assert out.tokens.shape == (2, NEW) and out.tokens.dtype == jnp.int32
    for row in range(2):
        want = _greedy_by_full_forward(model, tokens[row][mask[row]], NEW)
        assert np.asarray(out.tokens[row]).tolist() == want, row
    assert np.asarray(out.mask).all() and np.asarray(out.lengths).tolist() == [NEW, NEW]
    assert len(set(np.asarray(out.tokens).ravel().tolist())) > 1


def test_right_padded_prompt_gives_same_continuation(model, prompts):
    tokens, mask = prompts
    left = generate(model, tokens, mask, max_new_tokens=NEW, eos_token_id=())
    right_tokens = np.stack([tokens[0], np.roll(tokens[1], -3)])
    right_mask = np.stack([mask[0], np.roll(mask[1], -3)])
    right = generate(model, right_tokens, right_mask, max_new_tokens=NEW, eos_token_id=())
    np.testing.assert_array_equal(right.tokens, left.tokens)


def test_eos_stops_each_row(model, prompts):
    tokens, mask = prompts
    greedy = np.asarray(generate(model, tokens, mask, max_new_tokens=NEW, eos_token_id=()).tokens)
    eos = int(greedy[0, 1])  # row 0 emits it at step 1
    out = generate(model, tokens, mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=-1)
    got = np.asarray(out.tokens)
    for row in range(2):
        hits = np.flatnonzero(greedy[row] == eos)
        stop = hits[0] + 1 if hits.size else NEW
        assert got[row, :stop].tolist() == greedy[row, :stop].tolist()
        assert (got[row, stop:] == -1).all()
        assert int(out.lengths[row]) == stop
        assert np.asarray(out.mask[row]).tolist() == [i < stop for i in range(NEW)]


def test_tiny_top_p_is_greedy_and_sampling_is_deterministic(model, prompts):
    tokens, mask = prompts
    greedy = generate(model, tokens, mask, max_new_tokens=NEW, eos_token_id=())
    key = jax.random.key(3)
    nucleus = generate(model, tokens, mask, max_new_tokens=NEW, key=key, temperature=1.0,
                       top_p=1e-6, eos_token_id=())
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)
    runs = [generate(model, tokens, mask, max_new_tokens=NEW, key=jax.random.key(seed),
                     temperature=2.0, eos_token_id=()).tokens for seed in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_bad_arguments():
    m = Transformer(get_preset("tiny", vocab_size=8, num_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="PRNG key"):
        generate(m, np.zeros((1, 2)), max_new_tokens=1, temperature=1.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, np.zeros((1, 2)), max_new_tokens=1, top_p=0.0)
    with pytest.raises(ValueError, match="prompt_mask shape"):
        generate(m, np.zeros((1, 2)), np.ones((1, 3)), max_new_tokens=1)
