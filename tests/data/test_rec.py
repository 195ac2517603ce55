"""Recommendation logs: the three file formats, malformed lines, k-core, leave-one-out and
synthetic data."""

import numpy as np
import pytest

from prism_jax.data import rec

TRIPLES = [("7", "a", 30), ("7", "b", 10), ("8", "a", 5), ("7", "c", 20), ("8", "b", 6),
           ("8", "c", 7), ("9", "b", 1)]


def _write_all_formats(tmp_path, triples):
  (tmp_path / "u.data").write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in triples))
  (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::5::{t}\n" for u, i, t in triples))
  (tmp_path / "log.csv").write_text("item_id,timestamp,user_id\n" + "".join(
      f"{i},{t},{u}\n" for u, i, t in triples))
  (tmp_path / "plain.csv").write_text("".join(f"{u},{i},{t}\n" for u, i, t in triples))
  return [tmp_path / n for n in ("u.data", "ratings.dat", "log.csv", "plain.csv")]


def test_formats_parse_the_same_triples(tmp_path):
  for path in _write_all_formats(tmp_path, TRIPLES):
    log = rec.read_interactions(str(path))
    got = list(zip(log.users.tolist(), log.items.tolist(), log.timestamps.tolist()))
    assert got == [(u, i, float(t)) for u, i, t in TRIPLES], path.name
    assert log.skipped == 0


def test_malformed_lines_are_counted_or_named(tmp_path):
  (tmp_path / "u.data").write_text("1\t2\t3\t100\n1\t2\n1\t3\t4\tsoon\n2\t5\t1\t9\n")
  log = rec.read_interactions(str(tmp_path / "u.data"))
  assert log.skipped == 2 and log.users.tolist() == ["1", "2"]
  with pytest.raises(ValueError, match=r"u.data:2: malformed udata line"):
    rec.read_interactions(str(tmp_path / "u.data"), on_error="raise")
  (tmp_path / "x.csv").write_text("user,item\n1,2\n")
  with pytest.raises(ValueError, match="no timestamp column"):
    rec.read_interactions(str(tmp_path / "x.csv"))
  with pytest.raises(ValueError, match="is not a file"):
    rec.read_interactions(str(tmp_path / "missing.dat"))


def test_k_core_iterates_to_a_fixed_point():
  # c has one interaction and goes in the first pass; that leaves u3 with one interaction, so
  # the second pass removes u3's "a" too. u4's two interactions with d survive.
  users = np.array(["u1", "u1", "u2", "u2", "u3", "u3", "u4", "u4"])
  items = np.array(["a", "b", "a", "b", "a", "c", "d", "d"])
  keep = rec.k_core(users, items, min_user=2, min_item=2)
  np.testing.assert_array_equal(keep, [1, 1, 1, 1, 0, 0, 1, 1])
  assert rec.k_core(users, items, 1, 1).all()
  assert not rec.k_core(users, items, 3, 1).any()


def test_leave_one_out_is_chronological():
  rng = np.random.default_rng(0)
  users = rng.integers(0, 30, 600).astype(str)
  items = rng.integers(0, 40, 600).astype(str)
  times = rng.integers(0, 50, 600).astype(float)   # many ties: file order must break them
  log = rec.Interactions(users, items, times)
  split = rec.leave_one_out(log, min_user=3, min_item=2)
  keep = rec.k_core(users, items, 3, 2)
  names = split.item_ids
  for row, user in enumerate(sorted(set(users[keep]))):
    idx = [j for j in range(600) if keep[j] and users[j] == user]
    idx.sort(key=lambda j: (times[j], j))
    seq = [items[j] for j in idx]
    assert names[split.train[row]].tolist() == seq[:-2]
    assert names[split.val_target[row]] == seq[-2] and names[split.test_target[row]] == seq[-1]
  assert split.history("test")[0][-1] == split.val_target[0]
  assert split.item_counts()[0] == 0 and split.item_counts().sum() == sum(map(len, split.train))
  with pytest.raises(ValueError, match="min_user_interactions must be >= 3"):
    rec.leave_one_out(log, min_user=2)


def test_synthetic_log_has_sequential_structure():
  a = rec.synthetic_log(200, 100, seed=3)
  b = rec.synthetic_log(200, 100, seed=3)
  np.testing.assert_array_equal(a.items, b.items)
  assert not np.array_equal(a.items, rec.synthetic_log(200, 100, seed=4).items[:len(a.items)])
  # The successor table is hidden; measure it: the most frequent next item of each item
  # should follow it far more often than the globally most popular item does.
  pairs = {}
  same_user = a.users[1:] == a.users[:-1]
  for prev, nxt in zip(a.items[:-1][same_user], a.items[1:][same_user]):
    pairs.setdefault(prev, []).append(nxt)
  top_next = sum(max(np.unique(v, return_counts=True)[1]) for v in pairs.values())
  popular = np.unique(a.items, return_counts=True)[1].max() / len(a.items)
  assert top_next / same_user.sum() > 3 * popular


def test_sequence_sampler_windows_are_prefixes():
  split = rec.leave_one_out(rec.synthetic_log(50, 40, seed=0), 5, 2)
  sampler = rec.SequenceSampler(split.train, max_len=8, batch_size=6, seed=1)
  batch = sampler.batch(2)
  np.testing.assert_array_equal(batch, rec.SequenceSampler(split.train, 8, 6, 1).batch(2))
  assert batch.shape == (6, 9)
  for row in batch:
    items = row[row > 0]
    assert (row[:len(row) - len(items)] == 0).all() and len(items) >= 2
    assert any(len(s) >= len(items) and any(np.array_equal(s[e - len(items):e], items)
                                            for e in range(len(items), len(s) + 1))
               for s in sampler.train)
  np.testing.assert_array_equal(rec.left_pad([np.array([1, 2, 3])], 5), [[0, 0, 1, 2, 3]])
