"""Prompts × modes through a captured model, then the report: the library form of `dsv4 inspect`.

    from dsv4.inspect import inspect_model, write_report
    rep = inspect_model(model, tokenizer, modes=["chat", "thinking"])
    write_report(rep, "out/")
"""
from __future__ import annotations

from typing import Iterable, Sequence

from ..model import Transformer
from .analyze import build_report
from .capture import ALL, capture
from .prompts import BUILTIN, Prompt, encode_prompt


def inspect_model(model: Transformer, tokenizer, prompts: Sequence[Prompt] = BUILTIN,
                  modes: Iterable[str] = ("chat", "thinking"), max_tokens: int | None = None,
                  what: Iterable[str] = ALL, progress: bool = False, meta: dict | None = None,
                  **capture_options) -> dict:
    """Run every prompt in every mode under `capture` and aggregate the records into a report dict."""
    modes = list(modes)
    runs = encode_runs(tokenizer, prompts, modes, max_tokens, model.cfg.vocab_size)
    with capture(model, what, progress=progress, **capture_options) as cap:
        for p, mode, ids in runs:
            cap.run(ids, label=p.name, mode=mode)
    meta = {"prompts": len(prompts), "modes": ",".join(modes), "max_tokens": max_tokens, **(meta or {})}
    return build_report(cap.records, model.cfg, meta=meta, decode=_decoder(tokenizer))


def encode_runs(tokenizer, prompts: Sequence[Prompt], modes: list[str], max_tokens: int | None,
                vocab: int) -> list[tuple[Prompt, str, list[int]]]:
    """(prompt, mode, ids) for every prompt × mode, prompt-major; ids outside the vocabulary raise."""
    runs = []
    for p in prompts:
        for mode in modes:
            ids = encode_prompt(tokenizer, p, mode, max_tokens)
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"prompt {p.name!r} ({mode}) has token id {bad[0]} outside the model's "
                                 f"vocabulary of {vocab}: the tokenizer does not fit this model")
            runs.append((p, mode, ids))
    return runs


def _decoder(tok):
    def decode(ids):
        try:
            return tok.decode(list(ids))
        except Exception:            # noqa: BLE001 - a report must not fail on an undecodable id
            return " ".join(str(i) for i in ids)
    return decode
