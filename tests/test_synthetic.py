"""Probing task generators: every answer re-derived from the tokens by an independent reader,
layout (noise, blocks, query, mask), balance, randomness of positions, determinism, validation."""

import jax
import numpy as np
import pytest

from prism_jax.data import synthetic as S

# One batch shape for every test, so each task's generator is compiled once.
B, T = 1024, 128


def _pattern(row, query_len):
  """The non-noise tokens before the query, in order."""
  body = row[:len(row) - query_len]
  return [int(t) for t in body if not S.NOISE[0] <= t <= S.NOISE[-1]]


def _triples(tokens):
  assert len(tokens) % 3 == 0
  return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


def _read_mqar(row):
  n = S.MQAR_PAIRS
  pat = _pattern(row, n)
  table = dict(zip(pat[0::2], pat[1::2]))
  return [table[int(k)] for k in row[-n:]]


def _read_poly_recall(row):
  table = {(c, k): v for c, k, v in _triples(_pattern(row, 2))}
  return [table[int(row[-2]), int(row[-1])]]


def _read_var_tracking(row):
  names = {x: y for x, eq, y in _triples(_pattern(row, 2))}
  value = int(row[-1])
  while value in names:
    value = names[value]
  return [value]


def _read_binary(row, label):
  return [S.YES if label(_pattern(row, 1)) else S.NO]


def _read_silence_gate(row):
  table = {k: (v if g == S.ON else S.NULL) for g, k, v in _triples(_pattern(row, 2))}
  return [table[int(row[-1])]]


def _read_mux(row):
  s, c0, c1 = _pattern(row, 1)
  return [c0 if s == S.SEL0 else c1]


READERS = {
    "mqar": _read_mqar, "poly_recall": _read_poly_recall, "var_tracking": _read_var_tracking,
    "local_xor": lambda r: _read_binary(r, lambda p: p[0] % 2 != p[1] % 2 and p[2] == S.XOR),
    "parity": lambda r: _read_binary(r, lambda p: sum(p) % 2 == 1),
    "modulo_add": lambda r: [sum(_pattern(r, 1)) % S.MODULUS],
    "palindrome": lambda r: _read_binary(r, lambda p: p[0] == p[2]),
    "silence_gate": _read_silence_gate, "mux": _read_mux,
}


@pytest.mark.parametrize("task", sorted(S.TASKS))
def test_answers_follow_from_the_tokens(task):
  seed = int(np.random.default_rng().integers(2**31))
  b = S.make_batch(task, B, T, 64, seed)
  tokens, targets, mask = b["tokens"], b["targets"], b["mask"]
  assert tokens.shape == targets.shape == mask.shape == (B, T)
  assert tokens.dtype == targets.dtype == np.int32 and mask.dtype == bool
  assert tokens.min() >= 0 and tokens.max() < S.MIN_VOCAB
  for row, tgt, m in zip(tokens, targets, mask):
    n = int(m.sum())
    assert m[T - n:].all() and n >= 1, "scored tokens are the last ones"
    assert (tgt[~m] == 0).all()
    assert tgt[m].tolist() == READERS[task](row), (task, seed, row.tolist())


@pytest.mark.parametrize("task", sorted(S.TASKS))
def test_balance_and_positions(task):
  # A fixed seed: over 1024 draws a fresh one would miss the 0.05 band now and then.
  b = S.make_batch(task, B, T, 64, 7)
  answers = b["targets"][b["mask"]]
  negative = {"local_xor": S.NO, "parity": S.NO, "palindrome": S.NO, "silence_gate": S.NULL}
  if task in negative:
    # Binary outcomes are balanced, so a constant guess scores about 1/2.
    assert abs(np.mean(answers == negative[task]) - 0.5) < 0.05
  tokens = b["tokens"]
  if task in S.LOCAL_TASKS:
    # The block touches the query: every operand within the ShortConv window of the answer,
    # noise everywhere before it.
    block = S.pattern_length(task) - 1
    assert (tokens[:, :T - 1 - block] >= S.NOISE[0]).all()
    assert (tokens[:, T - 1 - block:T - 1] < S.NOISE[0]).all() and (tokens[:, -1] == S.QUERY).all()
    return
  # The first pattern token lands anywhere in the sequence, not at a fixed offset.
  body = tokens[:, :T - 2]
  first = np.argmax(body < S.NOISE[0], axis=1)
  assert first.min() < 20 and np.percentile(first, 90) > 30 and len(np.unique(first)) > 30


def test_deterministic_in_the_seed():
  a, b, c = (S.make_batch("mqar", B, T, 64, s) for s in (3, 3, 4))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["tokens"], c["tokens"])
  # Seeds past 32 bits (the trainer's evaluation seeds) are not truncated onto small ones.
  d = S.make_batch("mqar", B, T, 64, 3 + 2**32)
  assert not np.array_equal(a["tokens"], d["tokens"])


def test_larger_vocab_emits_the_same_ids():
  a, b = S.make_batch("parity", B, T, 64, 1), S.make_batch("parity", B, T, 100, 1)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_sample_under_jit_and_vmap_matches_single_calls():
  """The training loop draws batches inside jit / vmap from keys; they must be the same
  batches as one call per key."""
  keys = jax.random.split(jax.random.key(int(np.random.default_rng().integers(2**31))), 3)
  stacked = jax.jit(jax.vmap(lambda k: S.sample("mqar", k, B, T)))(keys)
  for i, key in enumerate(keys):
    one = S.sample("mqar", key, B, T)
    for name in one:
      np.testing.assert_array_equal(stacked[name][i], one[name])


def test_a_pattern_cannot_outgrow_its_draws():
  with pytest.raises(ValueError, match="NUM_DRAWS"):
    S.Draws(np.zeros(4, np.float32)).integers(0, 2, 5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="sorting"), "task: unknown probing task 'sorting'"),
    (dict(seq_len=5), "seq_len: task 'var_tracking' needs >= 20 tokens, got 5"),
    (dict(vocab_size=32), "vocab_size: the probing vocabulary needs >= 64 ids, got 32"),
    (dict(seed=-1), r"seed must be an int in \[0, 2\*\*64\), got -1"),
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
])
def test_bad_arguments(kwargs, match):
  args = {**dict(task="var_tracking", batch_size=2, seq_len=64, vocab_size=64, seed=0), **kwargs}
  with pytest.raises(ValueError, match=match):
    S.make_batch(**args)
