"""Token shards and the loader (dsv4.train.data): formats, document split, determinism, resume, rank split."""
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv4.train.data import (ByteTokenizer, DataError, TokenLoader, build_shards, default_corpus_files,
                             read_meta)

BYTES = ByteTokenizer()


def _words(rng, n: int) -> str:
    return " ".join("".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 8))) for _ in range(n))


def _corpus(tmp_path: Path) -> Path:
    """Varied random text, so that no two windows of the stream are equal."""
    rng = np.random.default_rng(0)
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(f"document {i}: " + _words(rng, 40 + i))
    (d / "sub" / "a.md").write_text("# heading\n" + _words(rng, 50))
    (d / "sub" / "b.py").write_text("def f(x):\n    return x\n" + _words(rng, 50))
    (d / "sub" / "c.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i} " + _words(rng, 20)}) for i in range(5)))
    (d / "sub" / "ignored.bin").write_bytes(b"\0\1")
    return d


def _stream(shard_dir: Path, split: str) -> np.ndarray:
    meta = read_meta(shard_dir)
    parts = [np.fromfile(shard_dir / s["file"], np.uint32) for s in meta["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint32)


def _docs(stream: np.ndarray) -> list[str]:
    """Split a stream at BOS ... EOS and decode each document."""
    assert stream[0] == BYTES.bos_id and stream[-1] == BYTES.eos_id
    ends = np.flatnonzero(stream == BYTES.eos_id)
    starts = np.r_[0, ends[:-1] + 1]
    assert (stream[starts] == BYTES.bos_id).all()                       # every document starts with BOS
    return [BYTES.decode(stream[s + 1:e].tolist()) for s, e in zip(starts, ends)]


def test_build_shards_formats_and_document_split(tmp_path):
    src = _corpus(tmp_path)
    meta = build_shards([src], tmp_path / "sh", BYTES, val_fraction=0.2, shard_tokens=500, progress=False)
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    assert tr["documents"] + va["documents"] == 12 + 2 + 5                # jsonl: one document per line
    assert va["documents"] >= 1 and len(tr["shards"]) > 1                 # several shards of ≤ 500 tokens
    assert all(s["tokens"] <= 500 for s in tr["shards"])
    docs = _docs(_stream(tmp_path / "sh", "train")) + _docs(_stream(tmp_path / "sh", "val"))
    expected = [p.read_text() for p in sorted(src.rglob("*")) if p.suffix in (".txt", ".md", ".py")]
    expected += [json.loads(line)["text"] for line in (src / "sub" / "c.jsonl").read_text().splitlines()]
    assert sorted(docs) == sorted(expected)                             # whole documents, each in one split
    # rebuilding gives identical files (deterministic)
    build_shards([src], tmp_path / "sh2", BYTES, val_fraction=0.2, shard_tokens=500, progress=False)
    assert np.array_equal(_stream(tmp_path / "sh", "train"), _stream(tmp_path / "sh2", "train"))


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2.*'text'"):
        build_shards([bad], tmp_path / "o", BYTES, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        build_shards([tmp_path / "missing.txt"], tmp_path / "o", BYTES, progress=False)
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pyarrow"):
            build_shards([pq], tmp_path / "o", BYTES, progress=False)
    odd = tmp_path / "x.bin"
    odd.write_bytes(b"\0")
    with pytest.raises(DataError, match=r"x.bin: unsupported"):
        build_shards([odd], tmp_path / "o", BYTES, progress=False)


def test_loader_targets_determinism_and_resume(tmp_path):
    build_shards([_corpus(tmp_path)], tmp_path / "sh", BYTES, val_fraction=0.1, shard_tokens=300, progress=False)
    stream = _stream(tmp_path / "sh", "train")
    a = TokenLoader(tmp_path / "sh", batch=3, seq=32, seed=5)
    x, y = next(a)
    assert x.shape == y.shape == (3, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in x:                                                        # rows are real windows of the stream
        k = int(row[0])
        starts = [s for s in range(0, len(stream) - 32, 32) if stream[s] == k and
                  np.array_equal(stream[s:s + 32], row.numpy())]
        assert starts
    for _ in range(2):
        next(a)
    sd = a.state_dict()
    want = [next(a) for _ in range(3)]
    b = TokenLoader(tmp_path / "sh", batch=3, seq=32, seed=5)
    b.load_state_dict(sd)
    for (x1, y1), (x2, y2) in zip(want, (next(b) for _ in range(3))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    c = TokenLoader(tmp_path / "sh", batch=3, seq=32, seed=6)
    assert not torch.equal(next(c)[0], TokenLoader(tmp_path / "sh", batch=3, seq=32, seed=5).__next__()[0])


def test_epoch_visits_every_window_once_and_ranks_are_disjoint(tmp_path):
    build_shards([_corpus(tmp_path)], tmp_path / "sh", BYTES, val_fraction=0.1, progress=False)
    one = TokenLoader(tmp_path / "sh", batch=4, seq=64, seed=1)
    r0 = TokenLoader(tmp_path / "sh", batch=2, seq=64, seed=1, rank=0, world=2)
    r1 = TokenLoader(tmp_path / "sh", batch=2, seq=64, seed=1, rank=1, world=2)
    seen = []
    for _ in range(one.n_windows // 4):
        x, _ = next(one)
        x0, _ = next(r0)
        x1, _ = next(r1)
        assert torch.equal(torch.cat([x0, x1]), x)                        # ranks split the global batch
        seen += [tuple(r.tolist()) for r in x]
    assert len(set(seen)) == len(seen)                                     # no window twice within an epoch
    assert one.epoch == 0
    next(one)
    assert one.epoch == 1 and one.cursor == 4


def test_set_seq_and_state_checks(tmp_path):
    build_shards([_corpus(tmp_path)], tmp_path / "sh", BYTES, val_fraction=0.1, progress=False)
    ld = TokenLoader(tmp_path / "sh", batch=2, seq=16, seed=0)
    for _ in range(10):
        next(ld)
    ld.set_seq(64)
    assert ld.seq == 64 and ld.cursor == 20 * 16 // 64
    assert next(ld)[0].shape == (2, 64)
    other = TokenLoader(tmp_path / "sh", batch=2, seq=16, seed=0, world=2)
    with pytest.raises(DataError, match="world"):
        other.load_state_dict(ld.state_dict())
    with pytest.raises(DataError, match="fewer than batch"):
        TokenLoader(tmp_path / "sh", batch=10_000, seq=64)
    with pytest.raises(DataError, match="meta.json"):
        TokenLoader(tmp_path, batch=1, seq=8)


def test_default_corpus_is_local_deterministic_and_capped():
    a = default_corpus_files(200_000)
    assert a == default_corpus_files(200_000)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert sum(f.stat().st_size for f in a) <= 200_000
    assert any(f.suffix == ".py" for f in a) and all(f.is_relative_to(stdlib) or "doc" in f.parts for f in a)
    assert len(default_corpus_files(2_000_000)) > len(a)
