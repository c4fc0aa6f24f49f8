"""Byte-level text corpora cached as tensorstore arrays, and a deterministic,
resumable batch iterator.

The embedded default corpus is the running interpreter's standard-library
`.py` sources: real text on every machine, no download. Files are split into
train / validation by a hash of their relative path, so the split is the same
on every run and machine with the same Python. The byte stream is cached once
under the user cache dir (zarr via tensorstore), atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sysconfig
import tempfile
import zlib
from pathlib import Path

import numpy as np
import tensorstore as ts
from tqdm.auto import tqdm

BYTE_VOCAB = 256
_CACHE_VERSION = 1
_FILE_SEPARATOR = b"\n\n"


class DataError(ValueError):
    """Missing or unusable data, with a message that says what to change."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # [num_train_tokens] integer tokens
    val: np.ndarray  # [num_val_tokens]
    vocab_size: int
    is_bytes: bool  # tokens are raw bytes, so nats/token converts to bits/byte
    source: str  # human-readable origin
    cache_path: str | None = None


def default_cache_dir() -> Path:
    root = os.environ.get("ATOLL_CACHE") or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(root).expanduser() / "atoll"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_val_file(relpath: str, val_fraction: float) -> bool:
    return zlib.crc32(relpath.encode()) % 10_000 < round(val_fraction * 10_000)


def _list_files(root: Path, pattern: str, exclude_parts: tuple[str, ...] = ()) -> list[Path]:
    files = [
        p for p in root.glob(pattern)
        if p.is_file() and not any(part in exclude_parts for part in p.relative_to(root).parts)
    ]
    return sorted(files)


def _corpus_key(files: list[Path], root: Path, val_fraction: float) -> str:
    h = hashlib.sha1(f"v{_CACHE_VERSION}|{val_fraction}|{root}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read_text_bytes(path: Path) -> bytes | None:
    data = path.read_bytes()
    if b"\x00" in data:  # binary file: not text
        return None
    return data


def _split_files(files: list[Path], root: Path, val_fraction: float, progress: bool):
    train, val = [], []
    for p in tqdm(files, desc="reading corpus", unit="file", disable=not progress, leave=False):
        data = _read_text_bytes(p)
        if not data:
            continue
        rel = str(p.relative_to(root))
        (val if _is_val_file(rel, val_fraction) else train).append(data)
    if not val and len(train) > 1:  # tiny directories: hold out the last file
        val.append(train.pop())
    if not val and train:  # a single file: hold out its tail
        data = train.pop()
        cut = int(len(data) * (1 - val_fraction))
        train, val = [data[:cut]], [data[cut:]]
    return _FILE_SEPARATOR.join(train), _FILE_SEPARATOR.join(val)


def _write_array(path: Path, tokens: np.ndarray) -> None:
    store = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}},
        dtype=ts.uint8, shape=[max(len(tokens), 1)], chunk_layout=ts.ChunkLayout(chunk_shape=[1 << 22]),
        create=True, delete_existing=True,
    ).result()
    if len(tokens):
        store.write(tokens).result()


def _read_array(path: Path, size: int) -> np.ndarray:
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}).result()
    return np.asarray(store[:size].read().result())


def _build_cache(cache: Path, train: bytes, val: bytes, meta: dict) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    try:
        _write_array(tmp / "train", np.frombuffer(train, np.uint8))
        _write_array(tmp / "val", np.frombuffer(val, np.uint8))
        meta = dict(meta, train_tokens=len(train), val_tokens=len(val))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, cache)  # atomic: readers see a whole cache or none
        except OSError:  # another process won the race; theirs is equally good
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    meta = json.loads((cache / "meta.json").read_text())
    return _read_array(cache / "train", meta["train_tokens"]), _read_array(cache / "val", meta["val_tokens"])


@functools.lru_cache(maxsize=4)
def _stdlib_files_and_key(root: Path, pattern: str, exclude_parts: tuple[str, ...],
                          val_fraction: float) -> tuple[list[Path], str]:
    """The standard library's files and their key, once per process: listing and
    stat-ing some thousand files costs over a second, and the running Python's
    own library does not change under it (a user's directory is listed every time)."""
    files = _list_files(root, pattern, exclude_parts)
    return files, _corpus_key(files, root, val_fraction)


def load_text_corpus(
    root: Path, pattern: str, *, val_fraction: float, cache_dir: Path, source: str,
    exclude_parts: tuple[str, ...] = (), progress: bool = True,
) -> Corpus:
    if root == stdlib_root():
        files, key = _stdlib_files_and_key(root, pattern, exclude_parts, val_fraction)
    else:
        files = [root] if root.is_file() else _list_files(root, pattern, exclude_parts)
        key = _corpus_key(files, root.parent if root.is_file() else root, val_fraction) if files else ""
    base = root.parent if root.is_file() else root
    if not files:
        raise DataError(f"no files match {pattern!r} under {root}; set config.data.glob")
    cache = cache_dir / f"corpus-{key}"
    if not (cache / "meta.json").exists():
        train, val = _split_files(files, base, val_fraction, progress)
        if not train or not val:
            raise DataError(f"{source} holds too little text to split into train and validation")
        _build_cache(cache, train, val, {"source": source, "files": len(files), "val_fraction": val_fraction})
    train_tokens, val_tokens = _load_cached(cache)
    return Corpus(train_tokens, val_tokens, BYTE_VOCAB, True, source, str(cache))


def load_token_file(path: Path, *, val_fraction: float) -> Corpus:
    """A 1-D integer array in a .npy file: the user's own tokenization."""
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path} must hold a 1-D integer token array; got {tokens.dtype}{list(tokens.shape)}")
    cut = int(len(tokens) * (1 - val_fraction))
    vocab = int(tokens.max()) + 1 if len(tokens) else 0
    return Corpus(np.asarray(tokens[:cut]), np.asarray(tokens[cut:]), vocab, False, str(path))


def load_corpus(
    path: str = "", *, glob: str = "**/*", val_fraction: float = 0.02,
    cache_dir: str = "", progress: bool = True,
) -> Corpus:
    """The default corpus when `path` is empty, else the user's text file,
    directory of text files (matching `glob`), or .npy token array."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if not path:
        root = stdlib_root()
        return load_text_corpus(
            root, "**/*.py", val_fraction=val_fraction, cache_dir=cache, progress=progress,
            source=f"Python standard library at {root}", exclude_parts=("site-packages", "dist-packages"),
        )
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"config.data.path = {path!r} does not exist; give a text file, a directory, "
                        "a .npy token array, or '' for the embedded corpus")
    if p.suffix == ".npy":
        return load_token_file(p, val_fraction=val_fraction)
    return load_text_corpus(p, glob, val_fraction=val_fraction, cache_dir=cache, progress=progress, source=str(p))


def unigram_bits_per_token(corpus: Corpus) -> float:
    """Cross-entropy (bits/token) of the validation split under the training
    split's token frequencies (add-one smoothed): the bar a model must beat."""
    vocab = max(corpus.vocab_size, 1)
    train_counts = np.bincount(corpus.train, minlength=vocab).astype(np.float64) + 1.0
    val_counts = np.bincount(corpus.val, minlength=vocab).astype(np.float64)
    log_p = np.log2(train_counts / train_counts.sum())
    return float(-(val_counts * log_p[: len(val_counts)]).sum() / val_counts.sum())


class BatchIterator:
    """Random windows of `seq_len + 1` tokens; batch n is a pure function of
    (seed, n), so the whole iterator state is {"seed", "step"} and a resumed
    run continues exactly. Each process yields its own rows of the global batch."""

    def __init__(
        self, tokens: np.ndarray, *, global_batch: int, seq_len: int, seed: int,
        process_index: int = 0, process_count: int = 1, step: int = 0,
    ):
        if global_batch % process_count:
            raise DataError(f"batch size {global_batch} does not split over {process_count} processes")
        if len(tokens) < seq_len + 2:
            raise DataError(f"{len(tokens)} tokens cannot fill a window of {seq_len + 1}; "
                            "use a larger corpus or a smaller config.data.seq_len")
        self.tokens = tokens
        self.global_batch, self.seq_len, self.seed = global_batch, seq_len, seed
        self.local_batch = global_batch // process_count
        self.row0 = process_index * self.local_batch
        self.step = step

    def state(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def restore(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"checkpoint's data seed {state['seed']} differs from config.seed {self.seed}")
        self.step = int(state["step"])

    def batch_at(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.global_batch)
        rows = starts[self.row0: self.row0 + self.local_batch]
        return np.stack([self.tokens[s: s + self.seq_len + 1] for s in rows]).astype(np.int32)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch


def eval_windows(tokens: np.ndarray, *, num_windows: int, seq_len: int) -> np.ndarray:
    """Evenly spaced validation windows [num_windows, seq_len + 1] covering the split."""
    last = len(tokens) - seq_len - 1
    if last < 0:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than a window of {seq_len + 1}")
    starts = np.linspace(0, last, num_windows).astype(np.int64)
    return np.stack([tokens[s: s + seq_len + 1] for s in starts]).astype(np.int32)


def bits_per_token(nats: float) -> float:
    return nats / math.log(2)
