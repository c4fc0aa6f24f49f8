import math

import numpy as np
import pytest

from atoll.data import text


@pytest.fixture(scope="module")
def corpus():
    return text.load_corpus("", progress=False)


def test_embedded_corpus_is_the_stdlib_split_by_file(corpus):
    assert corpus.is_bytes and corpus.vocab_size == 256
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000
    assert "standard library" in corpus.source
    assert b"def " in bytes(corpus.train[:200_000])
    again = text.load_corpus("", progress=False)  # from the cache now
    np.testing.assert_array_equal(again.val, corpus.val)
    assert again.cache_path == corpus.cache_path


def test_iterator_is_deterministic_and_resumes_exactly(corpus):
    a = text.BatchIterator(corpus.train, global_batch=4, seq_len=32, seed=7)
    batches = [next(a) for _ in range(5)]
    assert batches[0].shape == (4, 33) and batches[0].dtype == np.int32
    b = text.BatchIterator(corpus.train, global_batch=4, seq_len=32, seed=7)
    for _ in range(2):
        next(b)
    state = b.state()
    c = text.BatchIterator(corpus.train, global_batch=4, seq_len=32, seed=7)
    c.restore(state)
    np.testing.assert_array_equal(next(c), batches[2])
    np.testing.assert_array_equal(next(c), batches[3])
    other = text.BatchIterator(corpus.train, global_batch=4, seq_len=32, seed=8)
    assert not np.array_equal(next(other), batches[0])
    with pytest.raises(text.DataError, match="seed"):
        other.restore(state)


def test_processes_get_disjoint_rows_of_the_same_global_batch(corpus):
    whole = next(text.BatchIterator(corpus.train, global_batch=4, seq_len=16, seed=3))
    parts = [next(text.BatchIterator(corpus.train, global_batch=4, seq_len=16, seed=3, process_index=i,
                                     process_count=2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(text.DataError, match="does not split"):
        text.BatchIterator(corpus.train, global_batch=3, seq_len=16, seed=3, process_count=2)


def test_windows_are_contiguous_text(corpus):
    batch = next(text.BatchIterator(corpus.train, global_batch=2, seq_len=64, seed=0))
    row = batch[0]
    hay = bytes(corpus.train)
    assert bytes(row.astype(np.uint8)) in hay


def test_user_text_file_directory_and_tokens(tmp_path):
    f = tmp_path / "story.txt"
    f.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    c = text.load_corpus(str(f), cache_dir=str(tmp_path / "cache"), progress=False)
    assert c.is_bytes and len(c.train) + len(c.val) == len(f.read_bytes())
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.txt").write_text(f"document {i} " * 100)
    (d / "blob.bin").write_bytes(b"\x00\x01binary")  # skipped: not text
    c = text.load_corpus(str(d), cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(c.val) > 0 and 0 not in set(c.train.tolist())
    tokens = np.arange(1000) % 37
    np.save(tmp_path / "tok.npy", tokens)
    c = text.load_corpus(str(tmp_path / "tok.npy"), progress=False)
    assert not c.is_bytes and c.vocab_size == 37 and len(c.train) == 980


def test_bad_paths_fail_with_one_clear_message(tmp_path):
    with pytest.raises(text.DataError, match="does not exist"):
        text.load_corpus(str(tmp_path / "nope"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(text.DataError, match="no files match"):
        text.load_corpus(str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"), progress=False)
    np.save(tmp_path / "bad.npy", np.ones((3, 3)))
    with pytest.raises(text.DataError, match="1-D integer"):
        text.load_corpus(str(tmp_path / "bad.npy"), progress=False)
    with pytest.raises(text.DataError, match="cannot fill a window"):
        text.BatchIterator(np.zeros(10, np.uint8), global_batch=1, seq_len=64, seed=0)


def test_unigram_bits_by_hand():
    train = np.array([0, 0, 1, 1] * 100, np.uint8)
    val = np.array([0, 1], np.uint8)
    c = text.Corpus(train, val, 2, True, "hand")
    assert math.isclose(text.unigram_bits_per_token(c), 1.0, rel_tol=1e-9)  # p=1/2 each (smoothed equally)
    skew = text.Corpus(np.array([0] * 98 + [1] * 0, np.uint8), np.array([0], np.uint8), 2, True, "skew")
    assert math.isclose(text.unigram_bits_per_token(skew), -math.log2(99 / 100), rel_tol=1e-9)


def test_eval_windows_span_the_split():
    tokens = np.arange(1000, dtype=np.int32)
    w = text.eval_windows(tokens, num_windows=5, seq_len=9)
    assert w.shape == (5, 10) and w[0, 0] == 0 and w[-1, -1] == 999
