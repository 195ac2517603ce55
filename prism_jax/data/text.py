"""Byte-level text corpora and pre-tokenized token files, read as random contiguous windows.

A corpus is two 1-D token arrays (train, validation). Training batches are windows of
`seq_len + 1` tokens: inputs x = w[:-1], targets y = w[1:]. The window starts of batch n are a
pure function of (seed, n), so a run resumed at batch n reads exactly the stream an
uninterrupted run would have read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sysconfig

import numpy as np

TOKEN_DTYPES = ("uint16", "uint32")


@dataclasses.dataclass(frozen=True)
class TextCorpus:
  """Train and validation token streams. `bytes_per_token` is 1 for byte-level text."""
  train: np.ndarray            # [N_train] integer tokens
  val: np.ndarray              # [N_val]
  vocab_size: int
  fingerprint: str             # sha256 prefix over (file names, contents) or the token file
  description: str
  byte_level: bool


def _is_validation(relpath: str, val_percent: float) -> bool:
  """Deterministic split by file-path hash: the same file always lands on the same side."""
  digest = hashlib.sha256(relpath.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "little") % 10_000 < val_percent * 100


def _read_files(root: str, relpaths: list[str], val_percent: float, description: str) -> TextCorpus:
  sha = hashlib.sha256()
  train_parts, val_parts = [], []
  for rel in relpaths:
    with open(os.path.join(root, rel), "rb") as f:
      data = f.read()
    sha.update(rel.encode("utf-8") + b"\0" + len(data).to_bytes(8, "little") + data)
    (val_parts if _is_validation(rel, val_percent) else train_parts).append(data)
  if not train_parts or not val_parts:
    # Too few files for a split by file: hold out the tail of the whole stream instead.
    logging.warning("the path-hash split of %d files under %s leaves one side empty; holding "
                    "out the last %.1f%% of the concatenated text instead", len(relpaths), root,
                    val_percent)
    tokens = np.frombuffer(b"".join(train_parts + val_parts), dtype=np.uint8)
    return _single_stream(tokens, val_percent, 256, sha.hexdigest()[:16], description, True)
  train = np.frombuffer(b"".join(train_parts), dtype=np.uint8)
  val = np.frombuffer(b"".join(val_parts), dtype=np.uint8)
  return TextCorpus(train, val, 256, sha.hexdigest()[:16], description, byte_level=True)


def stdlib_corpus(val_percent: float = 5.0) -> TextCorpus:
  """The `*.py` sources of the running interpreter's standard library (site-packages excluded)."""
  root = sysconfig.get_paths()["stdlib"]
  relpaths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages",
                                                         "__pycache__"))
    relpaths += [os.path.relpath(os.path.join(dirpath, n), root)
                 for n in sorted(filenames) if n.endswith(".py")]
  if not relpaths:
    raise ValueError(f"no *.py files under the standard library at {root}; pass "
                     "--config.data.path=<text file or directory>")
  return _read_files(root, sorted(relpaths), val_percent, f"stdlib *.py of {root}")


def _single_stream(tokens: np.ndarray, val_percent: float, vocab: int, fingerprint: str,
                   description: str, byte_level: bool) -> TextCorpus:
  """One file: the last `val_percent` of the stream is validation."""
  n_val = int(len(tokens) * val_percent / 100)
  return TextCorpus(tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:], vocab,
                    fingerprint, description, byte_level)


def token_file_corpus(path: str, token_dtype: str, vocab_size: int,
                      val_percent: float) -> TextCorpus:
  """A pre-tokenized flat binary file of uint16/uint32 ids, memory-mapped (never read whole)."""
  if token_dtype not in TOKEN_DTYPES:
    raise ValueError(f"data.token_dtype must be one of {TOKEN_DTYPES}, got {token_dtype!r}")
  itemsize = np.dtype(token_dtype).itemsize
  size = os.path.getsize(path)
  if size % itemsize:
    raise ValueError(f"{path} has {size} bytes, not a multiple of {itemsize} "
                     f"(data.token_dtype={token_dtype}); is the dtype right?")
  if size == 0:
    raise ValueError(f"token file {path} is empty; give data.path a non-empty .bin file")
  tokens = np.memmap(path, dtype=token_dtype, mode="r")
  # Hashing a multi-GB file at every start is too slow; size, head and tail identify it well.
  sha = hashlib.sha256(f"{size}".encode())
  sha.update(tokens[:65536].tobytes())
  sha.update(tokens[-65536:].tobytes())
  return _single_stream(tokens, val_percent, vocab_size, sha.hexdigest()[:16],
                        f"{len(tokens)} {token_dtype} tokens from {path}", byte_level=False)


def load_text_corpus(path: str = "", *, val_percent: float = 5.0, token_dtype: str = "uint16",
                     vocab_size: int = 256) -> TextCorpus:
  """Load the corpus named by `data.path`.

  "" -> the standard-library sources; a directory -> every file under it (bytes, split by
  file-path hash); a `.bin` file -> memory-mapped token ids; any other file -> its bytes, the
  tail `val_percent` held out.
  """
  if not 0 < val_percent < 100:
    raise ValueError(f"data.val_percent must be in (0, 100), got {val_percent}")
  if not path:
    corpus = stdlib_corpus(val_percent)
  elif not os.path.exists(path):
    raise ValueError(f"data.path={path!r} does not exist; point it at a text file, a directory "
                     "of text files or a .bin token file (or leave it empty for the default "
                     "corpus)")
  elif os.path.isdir(path):
    relpaths = sorted(os.path.relpath(os.path.join(d, n), path)
                      for d, _, names in os.walk(path) for n in names)
    corpus = _read_files(path, relpaths, val_percent, f"{len(relpaths)} files under {path}")
  elif path.endswith(".bin"):
    corpus = token_file_corpus(path, token_dtype, vocab_size, val_percent)
  else:
    with open(path, "rb") as f:
      data = np.frombuffer(f.read(), dtype=np.uint8)
    fp = hashlib.sha256(data.tobytes()).hexdigest()[:16]
    corpus = _single_stream(data, val_percent, 256, fp, f"bytes of {path}", byte_level=True)
  if len(corpus.train) == 0 or len(corpus.val) == 0:
    raise ValueError(f"corpus {corpus.description!r} is empty or too small to split "
                     f"({len(corpus.train)} train / {len(corpus.val)} validation tokens); "
                     "give data.path more text")
  logging.info("corpus %s: %d train / %d validation tokens, fingerprint %s", corpus.description,
               len(corpus.train), len(corpus.val), corpus.fingerprint)
  return corpus


def unigram_bits(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
  """Cross-entropy (bits per token) of `val` under the add-one-smoothed unigram of `train`."""
  counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
  log_p = np.log2(counts / counts.sum())
  val_counts = np.bincount(np.asarray(val), minlength=vocab_size).astype(np.float64)
  return float(-(val_counts * log_p).sum() / val_counts.sum())


class WindowSampler:
  """Seekable random windows: batch n is a function of (seed, n) only.

  `batch(n)` returns tokens [rows, seq_len + 1] for the rows this process owns; the global
  batch has `batch_size` rows split evenly over `num_shards` processes.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
               shard: int = 0, num_shards: int = 1):
    if len(tokens) < seq_len + 2:
      raise ValueError(f"data.seq_len={seq_len} needs at least {seq_len + 2} tokens, the stream "
                       f"has {len(tokens)}")
    if batch_size % num_shards:
      raise ValueError(f"data.batch_size={batch_size} is not divisible by the {num_shards} "
                       "processes")
    self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
    self.rows = slice(shard * batch_size // num_shards, (shard + 1) * batch_size // num_shards)

  def starts(self, n: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, n])
    return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)[self.rows]

  def batch(self, n: int) -> np.ndarray:
    offsets = self.starts(n)[:, None] + np.arange(self.seq_len + 1)   # [rows, T + 1]
    return np.asarray(self.tokens[offsets], dtype=np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, num_windows: int) -> np.ndarray:
  """Evenly spaced validation windows [num_windows, seq_len + 1], the same in every run."""
  last = len(tokens) - seq_len - 1
  if last < 0:
    raise ValueError(f"validation stream has {len(tokens)} tokens, fewer than data.seq_len + 1 = "
                     f"{seq_len + 1}; lower data.seq_len or raise data.val_percent")
  starts = np.linspace(0, last, num_windows).astype(np.int64)
  return np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int32)
