"""Text corpora: splits, fingerprints, token files, seekable windows, unigram baseline."""

import os

import numpy as np
import pytest

from prism_jax.data import text


def _write_tree(root, files):
  for rel, data in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)


def test_directory_split_by_path_hash(tmp_path):
  rng = np.random.default_rng(0)
  files = {f"pkg{i % 3}/mod{i}.py": rng.integers(32, 127, rng.integers(50, 300)).astype(
      np.uint8).tobytes() for i in range(40)}
  _write_tree(tmp_path, files)
  corpus = text.load_text_corpus(str(tmp_path), val_percent=25)
  val_files = sorted(r for r in files if text._is_validation(r, 25))
  train_files = sorted(r for r in files if not text._is_validation(r, 25))
  assert 0 < len(val_files) < len(files)
  assert corpus.val.tobytes() == b"".join(files[r] for r in val_files)
  assert corpus.train.tobytes() == b"".join(files[r] for r in train_files)
  assert corpus.vocab_size == 256 and corpus.byte_level
  again = text.load_text_corpus(str(tmp_path), val_percent=25)
  assert again.fingerprint == corpus.fingerprint
  first = sorted(files)[0]
  _write_tree(tmp_path, {first: files[first] + b"x"})
  assert text.load_text_corpus(str(tmp_path), val_percent=25).fingerprint != corpus.fingerprint


def test_single_file_holds_out_tail(tmp_path):
  data = np.random.default_rng(1).integers(0, 256, 1000).astype(np.uint8).tobytes()
  (tmp_path / "book.txt").write_bytes(data)
  corpus = text.load_text_corpus(str(tmp_path / "book.txt"), val_percent=10)
  assert corpus.train.tobytes() == data[:900] and corpus.val.tobytes() == data[900:]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_token_file_is_memory_mapped(tmp_path, dtype):
  tokens = np.random.default_rng(2).integers(0, 50_000, 2000).astype(dtype)
  path = tmp_path / "tokens.bin"
  tokens.tofile(path)
  corpus = text.load_text_corpus(str(path), val_percent=5, token_dtype=dtype, vocab_size=50_257)
  assert isinstance(corpus.train, np.memmap) and not corpus.byte_level
  np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
  assert len(corpus.val) == 100 and corpus.vocab_size == 50_257


def test_bad_paths_give_messages(tmp_path):
  with pytest.raises(ValueError, match="data.path=.*does not exist"):
    text.load_text_corpus(str(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="empty or too small"):
    text.load_text_corpus(str(tmp_path / "empty.txt"))
  (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
  with pytest.raises(ValueError, match="not a multiple of 2"):
    text.load_text_corpus(str(tmp_path / "odd.bin"))


def test_windows_are_seekable_contiguous_and_sharded():
  tokens = np.random.default_rng(3).integers(0, 256, 5000).astype(np.uint8)
  full = text.WindowSampler(tokens, seq_len=16, batch_size=8, seed=7)
  batches = [full.batch(n) for n in range(6)]
  resumed = text.WindowSampler(tokens, seq_len=16, batch_size=8, seed=7)
  np.testing.assert_array_equal(resumed.batch(4), batches[4])
  assert not np.array_equal(batches[0], batches[1])
  for row, start in zip(batches[2], full.starts(2)):
    np.testing.assert_array_equal(row, tokens[start:start + 17])
  halves = [text.WindowSampler(tokens, 16, 8, 7, shard=s, num_shards=2).batch(3) for s in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), batches[3])
  other_seed = text.WindowSampler(tokens, 16, 8, 8).batch(0)
  assert not np.array_equal(other_seed, batches[0])


def test_unigram_bits_matches_direct_sum():
  rng = np.random.default_rng(4)
  train = rng.integers(0, 5, 1000)
  val = rng.integers(0, 5, 300)
  counts = np.bincount(train, minlength=8) + 1.0
  expected = -np.mean(np.log2(counts[val] / counts.sum()))
  assert text.unigram_bits(train, val, 8) == pytest.approx(expected, rel=1e-12)


def test_stdlib_corpus_default():
  corpus = text.load_text_corpus("")
  assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000
  assert len(corpus.fingerprint) == 16
  assert b"def " in corpus.val[:200_000].tobytes()
  windows = text.eval_windows(corpus.val, 32, 5)
  assert windows.shape == (5, 33)
  np.testing.assert_array_equal(windows, text.eval_windows(corpus.val, 32, 5))


def test_few_files_fall_back_to_tail_split(tmp_path):
  files = {"a.py": b"x = 1\n" * 100, "b.py": b"y = 2\n" * 100}
  _write_tree(tmp_path, files)
  assert not any(text._is_validation(r, 10) for r in files)
  corpus = text.load_text_corpus(str(tmp_path), val_percent=10)
  assert corpus.train.tobytes() + corpus.val.tobytes() == files["a.py"] + files["b.py"]
  assert len(corpus.val) == 120
