"""Mechanistic probing tasks (spec §7, paper §5.5 / Alg. 2 / Table 4) as seeded generators.

Every sequence is `seq_len` tokens of noise with the task's pattern blocks placed at random,
non-overlapping positions, and a query block at the very end. The logic tasks (LOCAL_TASKS:
local XOR, parity, modulo add, palindrome) are the exception, as in the paper (App. H.2,
"Implementation Note"): their one block sits right before the query, so every operand lies
within the ShortConv window (width 4) of the answer position; they test whether the update
rule computes a non-linear function of nearby tokens, not long-range retrieval. The answer is
predicted *at* the query's last token (the causal model's output there), so `targets` and
`mask` mark only the answer position(s); everything else is unscored.

The vocabulary is split into disjoint sets (paper App. H.1), fixed for vocab_size >= 64
(ids >= 64 are never emitted):

    0 .. 31    data: keys 0..15 and values 16..31 for the recall tasks; operands elsewhere
    32 .. 47   control: QUERY, XOR, ON, OFF, CTX_A, CTX_B, EQ, NULL, NO, YES, SEL0, SEL1
    48 .. 63   noise filler

The generators are jax.numpy code driven by a PRNG key, so a training loop can draw its
batches on the device inside `jit` / `scan` / `vmap`:

    sample(task, key, batch_size, seq_len)  → {"tokens", "targets", "mask"} jax arrays
    make_batch(task, batch_size, seq_len, vocab_size, seed)  → the same as numpy arrays,
        validated, from a key made from the seed

with tokens [B, T] int32 (noise filler, pattern blocks, query at the end), targets [B, T]
int32 (the answer at the scored positions, 0 elsewhere) and mask [B, T] bool (True at the
scored positions). The same arguments give the same batch.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
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

# Uniform draws available to one sequence's pattern (the most any task takes is 46).
NUM_DRAWS = 64


class Draws:
  """The random numbers of one sequence, consumed in order: u [NUM_DRAWS] uniform in [0, 1).

  All of a batch's randomness comes from one `jax.random.uniform` call (one threefry in the
  compiled program instead of one per decision, which keeps compiling cheap); the tasks read
  integers, choices and permutations off it.
  """

  def __init__(self, u: jax.Array):
    self.u, self.used = u, 0

  def take(self, n: int) -> jax.Array:
    if self.used + n > self.u.shape[0]:
      raise ValueError(f"Draws: a pattern needs more than NUM_DRAWS={self.u.shape[0]} draws")
    self.used += n
    return self.u[self.used - n:self.used]

  def integers(self, low: int, high, n: int | None = None) -> jax.Array:
    """Uniform int32 in [low, high), shape [n] (a scalar when n is None)."""
    u = self.take(1 if n is None else n)
    out = jnp.minimum(low + jnp.floor(u * (high - low)).astype(jnp.int32), high - 1)
    return out[0] if n is None else out

  def permutation(self, n: int) -> jax.Array:
    return jnp.argsort(self.take(n)).astype(jnp.int32)

  def distinct(self, first: int, n: int) -> jax.Array:
    """n distinct ids from first .. first + 15, uniformly."""
    return first + self.permutation(16)[:n]


# A task maps Draws to (blocks [num_blocks, block_len], query [Q], answers [A]), int32.
Pattern = tuple[jax.Array, jax.Array, jax.Array]


def _yes_no(flag: jax.Array) -> jax.Array:
  return jnp.where(flag, YES, NO)


def _pattern(blocks, query, answers) -> Pattern:
  as_ids = lambda a: jnp.asarray(a, jnp.int32)
  return as_ids(blocks), as_ids(query), as_ids(answers)


def _mqar(r: Draws) -> Pattern:
  """Multi-query associative recall. Blocks: MQAR_PAIRS pairs [k, v] with distinct keys
  k ∈ 0..15 and values v ∈ 16..31. Query: the MQAR_PAIRS keys again in a random order
  [k_a, k_b, ...]; the target at each query key is its value (MQAR_PAIRS scored tokens)."""
  keys = r.distinct(0, MQAR_PAIRS)
  values = r.integers(16, 32, MQAR_PAIRS)
  asked = r.permutation(MQAR_PAIRS)
  return _pattern(jnp.stack([keys, values], -1), keys[asked], values[asked])


def _poly_recall(r: Draws) -> Pattern:
  """Context-dependent recall. Each of POLY_KEYS keys k ∈ 0..15 has one value under CTX_A
  and another under CTX_B; blocks [CTX_A, k, v_A] and [CTX_B, k, v_B] for every key. Query
  [CTX_c, k] for one context c and key k; target v_c(k) (values ∈ 16..31, v_A ≠ v_B)."""
  keys = r.distinct(0, POLY_KEYS)                                        # [P]
  values = jnp.stack([r.distinct(16, 2) for _ in range(POLY_KEYS)])     # [P, 2]
  ctx = jnp.array([CTX_A, CTX_B])
  blocks = jnp.stack([jnp.broadcast_to(ctx, (POLY_KEYS, 2)),
                      jnp.broadcast_to(keys[:, None], (POLY_KEYS, 2)), values], -1)
  i, c = r.integers(0, POLY_KEYS), r.integers(0, 2)
  return _pattern(blocks.reshape(2 * POLY_KEYS, 3), jnp.stack([ctx[c], keys[i]]),
                  values[i, c][None])


def _var_tracking(r: Draws) -> Pattern:
  """Pointer chains. Two chains of CHAIN_LENGTH variables (distinct names ∈ 0..15) with
  different values ∈ 16..31: assignments [x₁, EQ, val], [x₂, EQ, x₁], [x₃, EQ, x₂], …,
  all 2·CHAIN_LENGTH placed in a random order. Query [QUERY, x_last] of one chain; target
  that chain's value."""
  names = r.distinct(0, 2 * CHAIN_LENGTH).reshape(2, CHAIN_LENGTH)
  vals = r.distinct(16, 2)
  sources = jnp.concatenate([vals[:, None], names[:, :-1]], axis=1)     # [2, CHAIN_LENGTH]
  blocks = jnp.stack([names, jnp.full_like(names, EQ), sources], -1)
  c = r.integers(0, 2)
  return _pattern(blocks.reshape(2 * CHAIN_LENGTH, 3), jnp.stack([QUERY, names[c, -1]]),
                  vals[c][None])


def _local_xor(r: Draws) -> Pattern:
  """Local XOR. Block [a, b, XOR] with a, b ∈ 0..31. Query [QUERY]; target YES when a and
  b differ in parity (a mod 2 ≠ b mod 2), else NO. The block ends right before the query.
  """
  a, b = r.integers(0, NUM_DATA, 2)
  return _pattern([[a, b, XOR]], [QUERY], [_yes_no(a % 2 != b % 2)])


def _parity(r: Draws) -> Pattern:
  """N-bit parity. One contiguous block of PARITY_BITS bits [b₁, …, b_n] written as data
  tokens 0 / 1, ending right before the query [QUERY]; target YES when Σ bᵢ is odd, else NO.
  """
  bits = r.integers(0, 2, PARITY_BITS)
  return _pattern(bits[None], [QUERY], [_yes_no(bits.sum() % 2 == 1)])


def _modulo_add(r: Draws) -> Pattern:
  """Modular addition. Block [a, b] with a, b ∈ 0..MODULUS−1. Query [QUERY]; target the
  data token (a + b) mod MODULUS. The block ends right before the query."""
  a, b = r.integers(0, MODULUS, 2)
  return _pattern([[a, b]], [QUERY], [(a + b) % MODULUS])


def _palindrome(r: Draws) -> Pattern:
  """First equals last of a triple. Block [a, b, c] with a, b ∈ 0..31 and c = a with
  probability 1/2 (else a different data token), ending right before the query [QUERY];
  target YES if a == c."""
  a, b = r.integers(0, NUM_DATA, 2)
  same = r.integers(0, 2) == 1
  c = jnp.where(same, a, (a + r.integers(1, NUM_DATA)) % NUM_DATA)
  return _pattern([[a, b, c]], [QUERY], [_yes_no(same)])


def _silence_gate(r: Draws) -> Pattern:
  """Gated writes. GATED_PAIRS blocks [G, k, v] with G ∈ {ON, OFF} drawn uniformly, distinct
  keys k ∈ 0..15 and values v ∈ 16..31. Query [QUERY, k] for one of them; target v if its
  gate was ON, else NULL."""
  keys = r.distinct(0, GATED_PAIRS)
  values = r.integers(16, 32, GATED_PAIRS)
  on = r.integers(0, 2, GATED_PAIRS) == 1
  blocks = jnp.stack([jnp.where(on, ON, OFF), keys, values], -1)
  i = r.integers(0, GATED_PAIRS)
  return _pattern(blocks, jnp.stack([QUERY, keys[i]]), jnp.where(on[i], values[i], NULL)[None])


def _mux(r: Draws) -> Pattern:
  """Multiplexer. Block [S, ch₀, ch₁] with S ∈ {SEL0, SEL1} and channels ch₀ ≠ ch₁ ∈ 16..31.
  Query [QUERY]; target ch₀ if S = SEL0, else ch₁."""
  s = r.integers(0, 2)
  channels = r.distinct(16, 2)
  return _pattern(jnp.concatenate([jnp.stack([SEL0 + s]), channels])[None], [QUERY],
                  channels[s][None])


TASKS: dict[str, Callable[[Draws], Pattern]] = {
    "mqar": _mqar, "poly_recall": _poly_recall, "var_tracking": _var_tracking,
    "local_xor": _local_xor, "parity": _parity, "modulo_add": _modulo_add,
    "palindrome": _palindrome, "silence_gate": _silence_gate, "mux": _mux,
}

# Tasks whose block ends right before the query (module docstring).
LOCAL_TASKS = frozenset({"local_xor", "parity", "modulo_add", "palindrome"})

# Accuracy of guessing the most likely answer without looking (for reading the tables).
CHANCE = {"mqar": 1 / 16, "poly_recall": 1 / 16, "var_tracking": 1 / 2, "local_xor": 1 / 2,
          "parity": 1 / 2, "modulo_add": 1 / MODULUS, "palindrome": 1 / 2,
          "silence_gate": 1 / 2, "mux": 1 / 2}


def _sizes(task: str) -> tuple[tuple[int, int], int, int]:
  """Static sizes of the task's pattern: ((num_blocks, block_len), query_len, num_answers)."""
  blocks, query, answers = jax.eval_shape(lambda u: TASKS[task](Draws(u)),
                                          jax.ShapeDtypeStruct((NUM_DRAWS,), jnp.float32))
  return blocks.shape, query.shape[0], answers.shape[0]


def pattern_length(task: str) -> int:
  """Tokens taken by the task's blocks plus its query (the shortest usable seq_len)."""
  (num_blocks, block_len), query_len, _ = _sizes(task)
  return num_blocks * block_len + query_len


def _sequence(task: str, u: jax.Array, seq_len: int) -> tuple[jax.Array, jax.Array]:
  """One sequence from uniforms u [NUM_DRAWS + seq_len]: tokens [T] and targets [T] int32.

  Noise everywhere, then the blocks (in a random order) at sorted random offsets into the
  free space of the region before the query, each shifted by the lengths of the blocks
  before it, so they never overlap and any gap, including none, is possible. A task of
  LOCAL_TASKS has its block at the end of the region, touching the query.
  """
  r = Draws(u[:NUM_DRAWS])
  blocks, query, answers = TASKS[task](r)                                # [N, n], [Q], [A]
  num_blocks, block_len = blocks.shape
  region = seq_len - query.shape[0]
  free = region - num_blocks * block_len
  order = r.permutation(num_blocks)
  offsets = (jnp.full(num_blocks, free) if task in LOCAL_TASKS
             else jnp.sort(r.integers(0, free + 1, num_blocks)))
  starts = offsets + block_len * jnp.arange(num_blocks)
  positions = starts[:, None] + jnp.arange(block_len)                    # [N, n]
  noise = int(NOISE[0]) + jnp.floor(u[NUM_DRAWS:NUM_DRAWS + region] * len(NOISE))
  body = jnp.minimum(noise.astype(jnp.int32), int(NOISE[-1]))
  body = body.at[positions.ravel()].set(blocks[order].ravel())
  tokens = jnp.concatenate([body, query])
  targets = jnp.zeros(seq_len, jnp.int32).at[seq_len - answers.shape[0]:].set(answers)
  return tokens, targets


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def sample(task: str, key: jax.Array, batch_size: int, seq_len: int) -> dict[str, jax.Array]:
  """`batch_size` independent sequences of `task` drawn from `key` (jittable, vmappable in
  `key`; see the task functions for the layouts). tokens, targets [B, T] int32; mask [B, T]
  bool, True at the last num_answers positions. Unchecked: `make_batch` validates."""
  u = jax.random.uniform(key, (batch_size, NUM_DRAWS + seq_len))
  tokens, targets = jax.vmap(lambda row: _sequence(task, row, seq_len))(u)
  num_answers = _sizes(task)[2]
  mask = jnp.broadcast_to(jnp.arange(seq_len) >= seq_len - num_answers, (batch_size, seq_len))
  return {"tokens": tokens, "targets": targets, "mask": mask}


def check_task(task: str, seq_len: int) -> None:
  """ValueError unless `task` is known and fits in `seq_len` tokens."""
  if task not in TASKS:
    raise ValueError(f"task: unknown probing task {task!r}; known: {sorted(TASKS)}")
  if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  if seq_len < pattern_length(task):
    raise ValueError(f"seq_len: task {task!r} needs >= {pattern_length(task)} tokens, got "
                     f"{seq_len}")


def make_batch(task: str, batch_size: int, seq_len: int, vocab_size: int = MIN_VOCAB,
               seed: int = 0) -> dict[str, np.ndarray]:
  """`sample(task, key, batch_size, seq_len)` as numpy arrays, after checking the arguments;
  key = jax.random.key(seed) for seeds below 2**32. Deterministic in `seed` (an int in
  [0, 2**64))."""
  if task not in TASKS:
    raise ValueError(f"task: unknown probing task {task!r}; known: {sorted(TASKS)}")
  for name, val in (("batch_size", batch_size), ("seq_len", seq_len), ("vocab_size", vocab_size)):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
      raise ValueError(f"{name} must be a positive int, got {val!r}")
  if vocab_size < MIN_VOCAB:
    raise ValueError(f"vocab_size: the probing vocabulary needs >= {MIN_VOCAB} ids, got "
                     f"{vocab_size}")
  check_task(task, seq_len)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
    raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
  # jax.random.key keeps only 32 bits of a seed without x64; the high half is folded in so
  # seeds that differ only there still give different batches.
  seed = int(seed)
  key = jax.random.key(seed % 2**32)
  if seed >= 2**32:
    key = jax.random.fold_in(key, seed >> 32)
  batch = sample(task, key, int(batch_size), int(seq_len))
  return {name: np.asarray(a) for name, a in batch.items()}
