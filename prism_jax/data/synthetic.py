"""Mechanistic probing tasks (spec §7, paper §5.5 / Alg. 2 / Table 4) as seeded generators.

Every sequence is `seq_len` tokens of noise with the task's pattern blocks placed at random,
non-overlapping positions, and a query block at the very end. The answer is predicted *at*
the query's last token (the causal model's output there), so `targets` and `mask` mark only
the answer position(s); everything else is unscored.

The vocabulary is split into disjoint sets (paper App. H.1), fixed for vocab_size >= 64
(ids >= 64 are never emitted):

    0 .. 31    data: keys 0..15 and values 16..31 for the recall tasks; operands elsewhere
    32 .. 47   control: QUERY, XOR, ON, OFF, CTX_A, CTX_B, EQ, NULL, NO, YES, SEL0, SEL1
    48 .. 63   noise filler

`make_batch(task, batch_size, seq_len, vocab_size, seed)` returns {"tokens" [B, T] int32,
"targets" [B, T] int32, "mask" [B, T] bool}; the same arguments give the same batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

MIN_VOCAB = 64
NUM_DATA = 32
KEYS = np.arange(0, 16)
VALUES = np.arange(16, 32)
NOISE = np.arange(48, 64)
QUERY, XOR, ON, OFF, CTX_A, CTX_B, EQ, NULL, NO, YES, SEL0, SEL1 = range(32, 44)

MQAR_PAIRS = 4
POLY_KEYS = 2
CHAIN_LENGTH = 3
PARITY_BITS = 3
MODULUS = 10
GATED_PAIRS = 2

Block = list[int]


def _place(rng: np.random.Generator, row: np.ndarray, blocks: list[Block], query: Block,
           targets: np.ndarray, answers: list[int]) -> None:
  """Write `blocks` at random non-overlapping positions of row[: T − len(query)] (in a random
  order), the query at the end, and `answers` as the targets of the query's last tokens."""
  T = len(row)
  region = T - len(query)
  order = rng.permutation(len(blocks))
  lengths = [len(blocks[i]) for i in order]
  free = region - sum(lengths)
  # Sorted offsets into the free space, each block shifted by the lengths before it.
  offsets = np.sort(rng.integers(0, free + 1, size=len(blocks)))
  start = 0
  for offset, i, n in zip(offsets, order, lengths):
    row[offset + start: offset + start + n] = blocks[i]
    start += n
  row[region:] = query
  targets[T - len(answers):] = answers


def _mqar(rng):
  """Multi-query associative recall. Blocks: MQAR_PAIRS pairs [k, v] with distinct keys
  k ∈ 0..15 and values v ∈ 16..31. Query: the MQAR_PAIRS keys again in a random order
  [k_a, k_b, ...]; the target at each query key is its value (MQAR_PAIRS scored tokens)."""
  keys = rng.choice(KEYS, MQAR_PAIRS, replace=False)
  values = rng.choice(VALUES, MQAR_PAIRS)
  asked = rng.permutation(MQAR_PAIRS)
  return ([[k, v] for k, v in zip(keys, values)], list(keys[asked]), list(values[asked]))


def _poly_recall(rng):
  """Context-dependent recall. Each of POLY_KEYS keys k ∈ 0..15 has one value under CTX_A
  and another under CTX_B; blocks [CTX_A, k, v_A] and [CTX_B, k, v_B] for every key. Query
  [CTX_c, k] for one context c and key k; target v_c(k) (values ∈ 16..31, v_A ≠ v_B)."""
  keys = rng.choice(KEYS, POLY_KEYS, replace=False)
  values = np.stack([rng.choice(VALUES, 2, replace=False) for _ in keys])  # [keys, 2]
  blocks = [[ctx, k, values[i, c]] for i, k in enumerate(keys)
            for c, ctx in enumerate((CTX_A, CTX_B))]
  i, c = rng.integers(POLY_KEYS), rng.integers(2)
  return blocks, [(CTX_A, CTX_B)[c], keys[i]], [values[i, c]]


def _var_tracking(rng):
  """Pointer chains. Two chains of CHAIN_LENGTH variables (distinct names ∈ 0..15) with
  different values ∈ 16..31: assignments [x₁, EQ, val], [x₂, EQ, x₁], [x₃, EQ, x₂], …,
  all 2·CHAIN_LENGTH placed in a random order. Query [QUERY, x_last] of one chain; target
  that chain's value."""
  names = rng.choice(KEYS, 2 * CHAIN_LENGTH, replace=False).reshape(2, CHAIN_LENGTH)
  vals = rng.choice(VALUES, 2, replace=False)
  blocks = []
  for chain, val in zip(names, vals):
    blocks += [[chain[0], EQ, val]] + [[chain[j], EQ, chain[j - 1]]
                                      for j in range(1, CHAIN_LENGTH)]
  c = rng.integers(2)
  return blocks, [QUERY, names[c, -1]], [vals[c]]


def _local_xor(rng):
  """Local XOR. Block [a, b, XOR] with a, b ∈ 0..31. Query [QUERY]; target YES when a and
  b differ in parity (a mod 2 ≠ b mod 2), else NO."""
  a, b = rng.integers(0, NUM_DATA, 2)
  return [[a, b, XOR]], [QUERY], [YES if a % 2 != b % 2 else NO]


def _parity(rng):
  """N-bit parity. One contiguous block of PARITY_BITS bits [b₁, …, b_n] written as data
  tokens 0 / 1. Query [QUERY]; target YES when Σ bᵢ is odd, else NO."""
  bits = rng.integers(0, 2, PARITY_BITS)
  return [list(bits)], [QUERY], [YES if bits.sum() % 2 else NO]


def _modulo_add(rng):
  """Modular addition. Block [a, b] with a, b ∈ 0..MODULUS−1. Query [QUERY]; target the
  data token (a + b) mod MODULUS."""
  a, b = rng.integers(0, MODULUS, 2)
  return [[a, b]], [QUERY], [(a + b) % MODULUS]


def _palindrome(rng):
  """First equals last of a triple. Block [a, b, c] with a, b ∈ 0..31 and c = a with
  probability 1/2 (else a different data token). Query [QUERY]; target YES if a == c."""
  a, b = rng.integers(0, NUM_DATA, 2)
  same = rng.integers(2) == 1
  c = a if same else (a + rng.integers(1, NUM_DATA)) % NUM_DATA
  return [[a, b, c]], [QUERY], [YES if same else NO]


def _silence_gate(rng):
  """Gated writes. GATED_PAIRS blocks [G, k, v] with G ∈ {ON, OFF} drawn uniformly, distinct
  keys k ∈ 0..15 and values v ∈ 16..31. Query [QUERY, k] for one of them; target v if its
  gate was ON, else NULL."""
  keys = rng.choice(KEYS, GATED_PAIRS, replace=False)
  values = rng.choice(VALUES, GATED_PAIRS)
  gates = rng.integers(0, 2, GATED_PAIRS)
  blocks = [[(OFF, ON)[g], k, v] for g, k, v in zip(gates, keys, values)]
  i = rng.integers(GATED_PAIRS)
  return blocks, [QUERY, keys[i]], [values[i] if gates[i] else NULL]


def _mux(rng):
  """Multiplexer. Block [S, ch₀, ch₁] with S ∈ {SEL0, SEL1} and channels ch₀ ≠ ch₁ ∈ 16..31.
  Query [QUERY]; target ch₀ if S = SEL0, else ch₁."""
  s = rng.integers(2)
  channels = rng.choice(VALUES, 2, replace=False)
  return [[(SEL0, SEL1)[s], *channels]], [QUERY], [channels[s]]


TASKS: dict[str, Callable] = {
    "mqar": _mqar, "poly_recall": _poly_recall, "var_tracking": _var_tracking,
    "local_xor": _local_xor, "parity": _parity, "modulo_add": _modulo_add,
    "palindrome": _palindrome, "silence_gate": _silence_gate, "mux": _mux,
}

# Accuracy of guessing the most likely answer without looking (for reading the tables).
CHANCE = {"mqar": 1 / 16, "poly_recall": 1 / 16, "var_tracking": 1 / 2, "local_xor": 1 / 2,
          "parity": 1 / 2, "modulo_add": 1 / MODULUS, "palindrome": 1 / 2,
          "silence_gate": 1 / 2, "mux": 1 / 2}


def pattern_length(task: str) -> int:
  """Tokens taken by the task's blocks plus its query (the shortest usable seq_len)."""
  blocks, query, _ = TASKS[task](np.random.default_rng(0))
  return sum(len(b) for b in blocks) + len(query)


def make_batch(task: str, batch_size: int, seq_len: int, vocab_size: int = MIN_VOCAB,
               seed: int = 0) -> dict[str, np.ndarray]:
  """`batch_size` independent sequences of `task` (see the task functions for the layouts).

  Returns tokens [B, T] int32 (noise filler, pattern blocks, query at the end), targets
  [B, T] int32 (the answer at the scored positions, 0 elsewhere) and mask [B, T] bool (True
  at the scored positions). Deterministic in `seed` (an int >= 0).
  """
  if task not in TASKS:
    raise ValueError(f"task: unknown probing task {task!r}; known: {sorted(TASKS)}")
  for name, val in (("batch_size", batch_size), ("seq_len", seq_len), ("vocab_size", vocab_size)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  if vocab_size < MIN_VOCAB:
    raise ValueError(f"vocab_size: the probing vocabulary needs >= {MIN_VOCAB} ids, got "
                     f"{vocab_size}")
  if seq_len < pattern_length(task):
    raise ValueError(f"seq_len: task {task!r} needs >= {pattern_length(task)} tokens, got "
                     f"{seq_len}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {seed!r}")
  rng = np.random.default_rng(seed)
  tokens = rng.choice(NOISE, size=(batch_size, seq_len)).astype(np.int32)
  targets = np.zeros((batch_size, seq_len), np.int32)
  mask = np.zeros((batch_size, seq_len), bool)
  for b in range(batch_size):
    blocks, query, answers = TASKS[task](rng)
    _place(rng, tokens[b], blocks, query, targets[b], answers)
    mask[b, seq_len - len(answers):] = True
  return {"tokens": tokens, "targets": targets, "mask": mask}
