"""Interaction logs for sequential recommendation: readers, k-core filter, leave-one-out split.

Pipeline (spec §7): read (user, item, timestamp) triples -> iterated k-core filter -> per user,
items sorted by time -> the last item is the test target, the second to last the validation
target, the rest the training sequence. Item ids are remapped to 1..num_items (0 = padding).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os

import numpy as np

FORMATS = ("auto", "udata", "ratings_dat", "csv")
_USER_COLUMNS = ("user", "user_id", "userid", "uid", "reviewerid")
_ITEM_COLUMNS = ("item", "item_id", "itemid", "movieid", "movie_id", "iid", "asin", "product_id")
_TIME_COLUMNS = ("timestamp", "time", "ts", "unixreviewtime", "datetime")


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Raw triples, one entry per interaction; ids are the file's strings."""
  users: np.ndarray       # [N] str
  items: np.ndarray       # [N] str
  timestamps: np.ndarray  # [N] float64
  skipped: int = 0        # malformed lines skipped


def detect_format(path: str) -> str:
  name = os.path.basename(path).lower()
  if name.endswith(".csv"):
    return "csv"
  if name.endswith(".dat"):
    return "ratings_dat"
  if name.endswith(".data") or name.endswith(".tsv"):
    return "udata"
  raise ValueError(f"cannot tell the format of {path!r} from its name; set data.format to one of "
                   f"{FORMATS[1:]}")


def _split_rows(path: str, fmt: str):
  """Yield (line_number, fields) with user, item, timestamp at fixed positions (0, 1, -1)."""
  with open(path, newline="", encoding="utf-8", errors="replace") as f:
    if fmt == "csv":
      reader = csv.reader(f)
      first = next(reader, None)
      if first is None:
        return
      lower = [c.strip().lower() for c in first]
      if any(c in _USER_COLUMNS for c in lower):
        def pick(names, what):
          for i, c in enumerate(lower):
            if c in names:
              return i
          raise ValueError(f"{path}: CSV header {first} has no {what} column (expected one of "
                           f"{names})")
        cols = (pick(_USER_COLUMNS, "user"), pick(_ITEM_COLUMNS, "item"),
                pick(_TIME_COLUMNS, "timestamp"))
      else:
        cols = (0, 1, 2)
        yield 1, first
      for row in reader:
        width = max(cols) + 1
        yield reader.line_num, ([row[c] for c in cols] if len(row) >= width else row[:0])
    else:
      sep = "\t" if fmt == "udata" else "::"
      for lineno, line in enumerate(f, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
          continue
        fields = line.split(sep)
        # u.data / ratings.dat carry (user, item, rating, timestamp).
        yield lineno, ([fields[0], fields[1], fields[3]] if len(fields) == 4 else [])


def read_interactions(path: str, fmt: str = "auto", on_error: str = "skip") -> Interactions:
  """Read a MovieLens `u.data` (tab), `ratings.dat` (`::`) or `user,item,timestamp` CSV log.

  Malformed lines (wrong field count, empty id, non-numeric timestamp) are skipped and counted
  (on_error="skip") or raise ValueError naming path and line (on_error="raise").
  """
  if fmt not in FORMATS:
    raise ValueError(f"data.format must be one of {FORMATS}, got {fmt!r}")
  if on_error not in ("skip", "raise"):
    raise ValueError(f"data.on_error must be 'skip' or 'raise', got {on_error!r}")
  if not os.path.isfile(path):
    raise ValueError(f"data.path={path!r} is not a file; give an interaction log (u.data, "
                     "ratings.dat or a user,item,timestamp CSV) or leave it empty for the "
                     "synthetic log")
  fmt = detect_format(path) if fmt == "auto" else fmt
  users, items, times, skipped, first_bad = [], [], [], 0, None
  for lineno, fields in _split_rows(path, fmt):
    problem = None
    if len(fields) != 3:
      problem = "wrong number of fields"
    elif not fields[0].strip() or not fields[1].strip():
      problem = "empty user or item id"
    else:
      try:
        t = float(fields[2])
      except ValueError:
        problem = f"timestamp {fields[2]!r} is not a number"
    if problem:
      if on_error == "raise":
        raise ValueError(f"{path}:{lineno}: malformed {fmt} line ({problem})")
      skipped += 1
      first_bad = first_bad or lineno
      continue
    users.append(fields[0].strip())
    items.append(fields[1].strip())
    times.append(t)
  if skipped:
    logging.warning("%s: skipped %d malformed lines (first at line %d)", path, skipped, first_bad)
  if not users:
    raise ValueError(f"{path}: no valid {fmt} interactions (skipped {skipped} malformed lines)")
  return Interactions(np.asarray(users), np.asarray(items), np.asarray(times, np.float64), skipped)


def k_core(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
  """Boolean mask of interactions that survive the iterated (min_user, min_item)-core filter.

  Removing sparse items can push users below the threshold and back, so repeat until stable.
  """
  keep = np.ones(len(users), bool)
  _, u_idx = np.unique(users, return_inverse=True)
  _, i_idx = np.unique(items, return_inverse=True)
  while True:
    u_count = np.bincount(u_idx[keep], minlength=u_idx.max() + 1)
    i_count = np.bincount(i_idx[keep], minlength=i_idx.max() + 1)
    new_keep = keep & (u_count[u_idx] >= min_user) & (i_count[i_idx] >= min_item)
    if new_keep.sum() == keep.sum():
      return new_keep
    keep = new_keep


@dataclasses.dataclass(frozen=True)
class RecSplit:
  """Chronological leave-one-out split. Items are 1..num_items; 0 is padding."""
  num_items: int
  train: list[np.ndarray]      # per user: items before the validation target
  val_target: np.ndarray       # [U] second-to-last item
  test_target: np.ndarray      # [U] last item
  item_ids: np.ndarray         # [num_items + 1] original id of each index (index 0 = "")

  @property
  def num_users(self) -> int:
    return len(self.train)

  def history(self, which: str) -> list[np.ndarray]:
    """Inputs for scoring: the training sequence (val) or it plus the validation item (test)."""
    if which == "val":
      return self.train
    if which == "test":
      return [np.append(s, t) for s, t in zip(self.train, self.val_target)]
    raise ValueError(f"which must be 'val' or 'test', got {which!r}")

  def item_counts(self) -> np.ndarray:
    """[num_items + 1] training-set frequency of each item (the most-popular baseline)."""
    return np.bincount(np.concatenate(self.train), minlength=self.num_items + 1)


def leave_one_out(log: Interactions, min_user: int = 5, min_item: int = 5) -> RecSplit:
  """k-core filter, then per user sort by timestamp (ties keep file order) and split."""
  if min_user < 3:
    raise ValueError(f"data.min_user_interactions must be >= 3 (train, validation and test need "
                     f"one item each), got {min_user}")
  keep = k_core(log.users, log.items, min_user, min_item)
  if not keep.any():
    raise ValueError(f"no interactions survive the {min_user}-user / {min_item}-item core filter "
                     f"({len(keep)} before); lower data.min_user_interactions / "
                     "data.min_item_interactions")
  users, items, times = log.users[keep], log.items[keep], log.timestamps[keep]
  item_ids, item_idx = np.unique(items, return_inverse=True)
  item_idx = item_idx + 1
  order = np.lexsort((np.arange(len(users)), times, users))
  users, item_idx = users[order], item_idx[order]
  bounds = np.flatnonzero(np.r_[True, users[1:] != users[:-1], True])
  seqs = [item_idx[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  logging.info("leave-one-out: %d users, %d items, %d interactions kept of %d", len(seqs),
               len(item_ids), int(keep.sum()), len(keep))
  return RecSplit(num_items=len(item_ids), train=[s[:-2] for s in seqs],
                  val_target=np.array([s[-2] for s in seqs]),
                  test_target=np.array([s[-1] for s in seqs]),
                  item_ids=np.r_[np.array([""]), item_ids.astype(str)])


def synthetic_log(num_users: int, num_items: int, seed: int, min_len: int = 10,
                  max_len: int = 50, follow_prob: float = 0.7, num_successors: int = 3,
                  zipf: float = 1.1) -> Interactions:
  """A seeded log with sequential structure.

  Each item has `num_successors` fixed successor items. A user starts from a popularity
  (Zipf) draw; each next item is, with probability `follow_prob`, one of the previous item's
  successors, otherwise a fresh popularity draw. A model that reads the last item can
  predict the next one far better than the popularity ranking can.
  """
  if num_items < num_successors + 1 or num_users < 1 or not 3 <= min_len <= max_len:
    raise ValueError(f"synthetic log needs num_items > num_successors, num_users >= 1 and "
                     f"3 <= min_len <= max_len; got num_items={num_items}, num_users={num_users}, "
                     f"min_len={min_len}, max_len={max_len}")
  rng = np.random.default_rng(seed)
  popularity = 1.0 / np.arange(1, num_items + 1) ** zipf
  popularity = rng.permutation(popularity / popularity.sum())
  successors = rng.integers(0, num_items, size=(num_items, num_successors))
  users, items, times = [], [], []
  for u in range(num_users):
    length = int(rng.integers(min_len, max_len + 1))
    draws = rng.choice(num_items, size=length, p=popularity)
    follow = rng.random(length) < follow_prob
    pick = rng.integers(0, num_successors, size=length)
    seq = [int(draws[0])]
    for t in range(1, length):
      seq.append(int(successors[seq[-1], pick[t]]) if follow[t] else int(draws[t]))
    users += [f"u{u}"] * length
    items += [f"i{i}" for i in seq]
    times += list(np.cumsum(rng.integers(1, 1000, size=length)))
  return Interactions(np.asarray(users), np.asarray(items), np.asarray(times, np.float64))


def left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
  """[N, length] int32: the last `length` items of each sequence, left-padded with 0."""
  out = np.zeros((len(seqs), length), np.int32)
  for row, s in enumerate(seqs):
    s = s[-length:]
    if len(s):
      out[row, length - len(s):] = s
  return out


class SequenceSampler:
  """Seekable training windows over users' training sequences: batch n depends on (seed, n).

  Each row is a random prefix end e of a random user's sequence s; the row holds the last
  max_len + 1 items of s[:e] (left-padded), inputs = row[:-1], targets = row[1:].
  """

  def __init__(self, train: list[np.ndarray], max_len: int, batch_size: int, seed: int,
               shard: int = 0, num_shards: int = 1):
    self.train = [s for s in train if len(s) >= 2]
    if not self.train:
      raise ValueError("no user has two or more training interactions; lower the k-core "
                       "thresholds or give more data")
    if batch_size % num_shards:
      raise ValueError(f"data.batch_size={batch_size} is not divisible by the {num_shards} "
                       "processes")
    self.max_len, self.batch_size, self.seed = max_len, batch_size, seed
    self.rows = slice(shard * batch_size // num_shards, (shard + 1) * batch_size // num_shards)

  def batch(self, n: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, n])
    users = rng.integers(0, len(self.train), size=self.batch_size)
    fractions = rng.random(self.batch_size)
    windows = []
    for u, f in zip(users[self.rows], fractions[self.rows]):
      s = self.train[u]
      end = 2 + int(f * (len(s) - 1))         # in [2, len(s)]
      windows.append(s[:end])
    return left_pad(windows, self.max_len + 1)   # [rows, max_len + 1]
