"""Training data: text files -> uint32 token shards on disk -> deterministic, resumable (x, y) batches.

Layout of a shard directory (written atomically: a temporary directory renamed into place):
    meta.json              tokenizer, vocab size, BOS/EOS ids, per split: shard files, token and document counts
    train_00000.bin …      uint32 token ids, documents written back to back as BOS doc EOS BOS doc EOS …
    val_00000.bin …        the same for the validation documents (split by *document*, never inside one)

Packing: we do sample-level packing without document masking. A training sample is a window of seq + 1
consecutive tokens of the split's stream, so it usually spans several documents; they are separated by
EOS + BOS and attention is NOT masked at document boundaries. Why: this is what most pretraining does,
DeepSeek-V3's report included (document packing, no cross-sample attention mask); every token is used with no
padding; and V4's compressed attention (CSA/HCA pool 4 or 128 consecutive tokens, the indexer ranks those
entries) has no notion of segments, so a per-document mask would need segment-aware compression as well. The
cost, a little attention across unrelated documents, is small and the BOS token marks the boundary.

Order: the stream is cut into windows at stride seq (window k = tokens [k·seq, k·seq + seq]); each epoch
visits them in a seeded permutation; a global step takes batch·world windows and rank r gets the r-th block
of `batch`, so ranks never share a window. Changing seq (progressive length) keeps the fraction of the epoch
already consumed. The loader's state (epoch, cursor, seq) is all a bit-exact resume needs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..tokenizer import ByteTokenizer  # re-exported: the tiny presets train on bytes

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
META = "meta.json"


class DataError(ValueError):
    """Unreadable or unsuitable training data (the message names the file, field or split)."""


# ------------------------------------------------------------------------------------------ tokenizers
def tokenizer_for(spec: str, vocab_size: int):
    """'bytes', 'v4' (the bundled V4 tokenizer), a tokenizer.json / checkpoint path, or 'auto': V4 when the
    model's vocabulary holds it, bytes otherwise."""
    from ..tokenizer import load_tokenizer
    if spec == "bytes":
        tok = ByteTokenizer()
    elif spec == "auto":
        if vocab_size >= 129280:
            tok = load_tokenizer()
        else:
            tok = ByteTokenizer()
    else:
        tok = load_tokenizer(None if spec == "v4" else spec)
    if len(tok) > vocab_size:
        raise DataError(f"tokenizer {tokenizer_name(tok)!r} has {len(tok)} ids but the model's vocab_size is "
                        f"{vocab_size}; use tokenizer = 'bytes' or a model with a larger vocabulary")
    return tok


def tokenizer_name(tok) -> str:
    return getattr(tok, "name", None) or f"v4:{getattr(tok, 'path', '?')}"


# ------------------------------------------------------------------------------------------ sources
def expand_files(files: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively (sorted, only known suffixes)."""
    out: list[Path] = []
    for f in files:
        p = Path(f).expanduser()
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in DATA_SUFFIXES
                          and "__pycache__" not in q.parts)
        elif p.is_file():
            if p.suffix not in DATA_SUFFIXES:
                raise DataError(f"{p}: unsupported file type {p.suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")
            out.append(p)
        else:
            raise DataError(f"training data path {p} does not exist")
    if not out:
        raise DataError(f"no training files ({', '.join(DATA_SUFFIXES)}) found in {[str(f) for f in files]}")
    return out


def iter_documents(path: Path) -> Iterator[str]:
    """The documents of one file: the whole text, one per JSONL line ('text' field) or per parquet row."""
    if path.suffix in TEXT_SUFFIXES:
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{path}:{n}: each JSONL line needs a string field 'text'")
                yield rec["text"]
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow)") from None
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def default_corpus_files(limit_bytes: int = 4 << 20) -> list[Path]:
    """The embedded corpus: this Python's own standard library source (plus any .rst/.txt/.md it ships and the
    installed Python docs, if any), walked in sorted order, files added while they fit in limit_bytes. No network needed."""
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    doc = Path(sys.base_prefix) / "share" / "doc"
    roots += sorted(doc.glob("python3*")) if doc.is_dir() else []
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    files, total = [], 0
    for root in roots:
        for folder, dirs, names in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in skip)          # pruned and ordered: deterministic
            for name in sorted(names):
                f = Path(folder) / name
                if f.suffix not in TEXT_SUFFIXES or not f.is_file():
                    continue
                size = f.stat().st_size
                if total + size <= limit_bytes:
                    files.append(f)
                    total += size
    if not files:
        raise DataError(f"no Python standard library sources found under {roots[0]}; pass data files explicitly")
    return files


def fingerprint(files: list[Path], tokenizer, val_fraction: float) -> str:
    """Identity of a shard build: paths, sizes, mtimes, tokenizer, split fraction."""
    h = hashlib.sha256(f"{tokenizer_name(tokenizer)}|{len(tokenizer)}|{val_fraction}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ shards
class _ShardWriter:
    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.shards: list[dict] = []
        self.tokens = self.documents = 0

    def add(self, ids: np.ndarray) -> None:
        self.buf.append(ids)
        self.n_buf += len(ids)
        self.tokens += len(ids)
        self.documents += 1
        while self.n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self.buf) if self.buf else np.zeros(0, np.uint32)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        flat[:n].tofile(self.folder / name)
        self.shards.append({"file": name, "tokens": int(n)})
        rest = flat[n:]
        self.buf, self.n_buf = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self.n_buf:
            self._flush(self.n_buf)
        return {"shards": self.shards, "tokens": self.tokens, "documents": self.documents}


def build_shards(files: Iterable[str | Path], out_dir: str | Path, tokenizer, val_fraction: float = 0.01,
                 shard_tokens: int = 1 << 26, progress: bool = True, batch_docs: int = 256) -> dict:
    """Tokenise files / folders into `out_dir` (see the module docstring). Document i goes to the validation
    split when a hash of i falls under val_fraction; the last document goes there if none did (and there
    are ≥ 2). Returns the meta dict."""
    files = expand_files(files)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = {s: _ShardWriter(tmp, s, shard_tokens) for s in ("train", "val")}
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    encode_batch = getattr(tokenizer, "encode_batch", None) or (lambda ts: [tokenizer.encode(t) for t in ts])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenising")
    n_doc = 0
    pending: np.ndarray | None = None            # the latest document, held back for the val fallback

    def emit(ids: np.ndarray, index: int) -> None:
        to_val = zlib.crc32(index.to_bytes(8, "little")) / 2 ** 32 < val_fraction
        writers["val" if to_val else "train"].add(ids)

    def flush_batch(texts: list[str]) -> None:
        nonlocal n_doc, pending
        for ids in encode_batch(texts):
            if len(ids) == 0:                         # empty files (an empty __init__.py) are no documents
                continue
            doc = np.empty(len(ids) + 2, np.uint32)
            doc[0], doc[1:-1], doc[-1] = bos, ids, eos
            if pending is not None:
                emit(pending, n_doc - 1)
            pending = doc
            n_doc += 1

    for f in files:
        texts: list[str] = []
        for text in iter_documents(f):
            texts.append(text)
            if len(texts) == batch_docs:
                flush_batch(texts)
                texts = []
        flush_batch(texts)
        if bar:
            bar.update(f.stat().st_size)
    if bar:
        bar.close()
    if pending is not None:
        if writers["val"].documents == 0 and n_doc >= 2 and val_fraction > 0:
            writers["val"].add(pending)
        else:
            emit(pending, n_doc - 1)
    meta = {"format": "dsv4-shards-1", "dtype": "uint32", "tokenizer": tokenizer_name(tokenizer),
            "vocab_size": len(tokenizer), "bos_id": bos, "eos_id": eos, "val_fraction": val_fraction,
            "fingerprint": fingerprint(files, tokenizer, val_fraction), "files": len(files),
            "splits": {s: w.close() for s, w in writers.items()}}
    if meta["splits"]["train"]["tokens"] == 0:
        raise DataError(f"no training tokens produced from {len(files)} file(s) (are they empty?)")
    (tmp / META).write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return meta


def read_meta(shard_dir: str | Path) -> dict:
    p = Path(shard_dir) / META
    if not p.is_file():
        raise DataError(f"{shard_dir} is not a shard directory (no {META}); build it with build_shards()")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------------ loader
class TokenLoader:
    """Iterator of (x, y) int64 [batch, seq], y = x shifted by one token. See the module docstring."""

    def __init__(self, shard_dir: str | Path, batch: int, seq: int, seed: int = 0, rank: int = 0, world: int = 1,
                 split: str = "train"):
        meta = read_meta(shard_dir)
        if split not in meta["splits"]:
            raise DataError(f"{shard_dir}: no split {split!r} (have {sorted(meta['splits'])})")
        info = meta["splits"][split]
        self.meta, self.split, self.shard_dir = meta, split, Path(shard_dir)
        self.shards = [np.memmap(self.shard_dir / s["file"], dtype=np.uint32, mode="r") for s in info["shards"]
                       if s["tokens"] > 0]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.n_tokens = int(self.starts[-1])
        self.batch, self.seed, self.rank, self.world = batch, seed, rank, world
        self.epoch = self.cursor = 0
        self._perm_key, self._perm = None, None
        self.seq = seq
        self._check()

    def _check(self) -> None:
        need = self.batch * self.world
        have = (self.n_tokens - 1) // self.seq if self.n_tokens > 1 else 0
        if have < need:
            raise DataError(f"split '{self.split}' of {self.shard_dir} has {self.n_tokens} tokens = {have} windows "
                            f"of seq {self.seq}, fewer than batch × world = {need}; use more data, a smaller "
                            "batch/seq" + (" or a larger val_fraction" if self.split == "val" else ""))

    @property
    def n_windows(self) -> int:
        return (self.n_tokens - 1) // self.seq

    def set_seq(self, seq: int) -> None:
        """Progressive length: keep the fraction of this epoch already consumed."""
        if seq != self.seq:
            self.cursor = self.cursor * self.seq // seq
            self.seq = seq
            self._check()

    def _permutation(self) -> torch.Tensor:
        key = (self.epoch, self.seq)
        if key != self._perm_key:
            s = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.seq
            self._perm = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(s % 2 ** 63))
            self._perm_key = key
        return self._perm

    def _window(self, start: int, n: int) -> np.ndarray:
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, got = [], 0
        while got < n:
            off = start + got - int(self.starts[i])
            piece = self.shards[i][off:off + n - got]
            out.append(piece)
            got += len(piece)
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.batch * self.world
        if self.cursor + step > self.n_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        ids = self._permutation()[self.cursor + self.rank * self.batch:self.cursor + (self.rank + 1) * self.batch]
        self.cursor += step
        rows = np.stack([self._window(int(k) * self.seq, self.seq + 1) for k in ids.tolist()])
        t = torch.from_numpy(rows.astype(np.int64))                                   # [batch, seq + 1]
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seq": self.seq, "seed": self.seed,
                "world": self.world, "split": self.split, "n_tokens": self.n_tokens}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("world", "split", "n_tokens"):
            if sd[key] != getattr(self, key):
                raise DataError(f"loader state has {key} = {sd[key]!r}, this loader {getattr(self, key)!r} "
                                "(resume with the same data and number of processes)")
        self.epoch, self.cursor, self.seed = sd["epoch"], sd["cursor"], sd["seed"]
        self.seq = sd["seq"]
        self._check()
