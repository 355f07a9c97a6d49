"""Prompts for `dsv4 inspect`: a built-in set shaped like the published V4-Flash study (five short prompts —
factual, code, quantum, story, math — plus one long prose and one long code prompt, ~330 and ~640 V4 tokens), a
loader for user prompt files, and the encoding of a prompt in a mode (raw text, V4 chat, V4 thinking).

The texts are written for this project; only their kinds and lengths follow the study.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..chat import encode_chat, encode_messages
from ..tokenizer import BOS_TOKEN

MODES = ("raw", "chat", "thinking")


class PromptFileError(ValueError):
    """A --prompts file that cannot be read as prompts (the message names the file and the entry)."""


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str
    kind: str = "short"          # "short" | "long" (only used for grouping in the report)


_ROME = (
    "The Roman Empire grew out of a city-state on the Tiber that, over several centuries, absorbed its neighbours "
    "in Italy and then the wider Mediterranean. After the civil wars of the first century BC, Octavian emerged as "
    "the sole master of the Roman world and in 27 BC accepted the name Augustus. He kept the outward forms of the "
    "Republic, the Senate, the consuls and the assemblies, while holding the real levers of power: command of the "
    "legions, control of the treasury and the loyalty of the provinces. The arrangement, later called the "
    "Principate, gave the Mediterranean world roughly two centuries of relative stability often described as the "
    "Pax Romana. Trade moved along paved roads and across sea lanes cleared of pirates; grain from Egypt and North "
    "Africa fed the crowded capital; a common coinage and a shared legal framework made it easier for merchants "
    "from Syria, Gaul and Hispania to do business with one another. The empire was never free of "
    "trouble, however. Succession was its weak point, since no law fixed how a new emperor should be chosen, and "
    "the death of a ruler could trigger conspiracy or civil war, as in the year of the four emperors in AD 69. "
    "In the third century a series of short reigns, invasions, plague and currency debasement "
    "brought the state close to collapse, until Diocletian reorganised the provinces, enlarged the army and "
    "divided the imperial office among several colleagues. Constantine later founded a new capital on the "
    "Bosporus, and when the western provinces fell away in the fifth century, the eastern half of the empire "
    "endured for another thousand years."
)

_ATTENTION_CODE = '''import math

import torch
from torch import nn
import torch.nn.functional as F


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with several heads and an optional causal mask."""

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, causal: bool = True) -> torch.Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if causal:
            mask = torch.ones(seq, seq, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        weights = self.dropout(F.softmax(scores, dim=-1))
        out = (weights @ v).transpose(1, 2).reshape(batch, seq, dim)
        return self.out(out)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, dim: int, n_heads: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, n_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))
'''

BUILTIN: tuple[Prompt, ...] = (
    Prompt("factual", "What is the capital of Australia, and why was it chosen over Sydney and Melbourne?"),
    Prompt("code", "Write a Python function that returns the n-th Fibonacci number using memoization."),
    Prompt("quantum", "Explain quantum entanglement to a curious high-school student in a few sentences."),
    Prompt("story", "Write the opening paragraph of a short story about a lighthouse keeper who finds a message "
                    "in a bottle."),
    Prompt("math", "Solve for x: 3x + 7 = 2x - 5. Then check your answer by substitution."),
    Prompt("long_prose", "Summarise the following passage in three sentences.\n\n" + _ROME, "long"),
    Prompt("long_code", "Explain what the following code does and point out any bugs.\n\n```python\n"
                        + _ATTENTION_CODE + "```", "long"),
)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a file: .json (a list of strings or of {"name", "text"[, "kind"]} objects), .jsonl (one such
    object or string per line) or any other extension as plain text, prompts separated by lines holding only
    '---' (a file without separators is one prompt)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(entries, list):
            raise PromptFileError(f"{path}: expected a JSON list of prompts, got {type(entries).__name__}")
    elif path.suffix == ".jsonl":
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}: line {n} is not valid JSON ({e})") from None
    else:
        parts, cur = [], []
        for line in text.splitlines():
            if line.strip() == "---":
                parts.append("\n".join(cur))
                cur = []
            else:
                cur.append(line)
        parts.append("\n".join(cur))
        entries = [p.strip() for p in parts if p.strip()]
    prompts = [_as_prompt(e, i, path) for i, e in enumerate(entries)]
    if not prompts:
        raise PromptFileError(f"{path}: no prompts found")
    names = [p.name for p in prompts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PromptFileError(f"{path}: duplicate prompt names {dup}")
    return prompts


def _as_prompt(e, i: int, path: Path) -> Prompt:
    if isinstance(e, str):
        e = {"text": e}
    if not isinstance(e, dict) or not isinstance(e.get("text"), str) or not e["text"].strip():
        raise PromptFileError(f"{path}: entry {i} must be a non-empty string or an object with a 'text' string")
    return Prompt(str(e.get("name", f"p{i}")), e["text"], str(e.get("kind", "short")))


def parse_modes(spec: str) -> list[str]:
    """'chat,thinking' -> ['chat', 'thinking'], checked against MODES."""
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes: unknown mode(s) {bad or spec!r}; choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def encode_prompt(tok, prompt: Prompt, mode: str, max_tokens: int | None = None) -> list[int]:
    """Token ids of a prompt, BOS first. 'raw': BOS + text; 'chat' / 'thinking': one user turn in the V4 chat
    format with the generation prompt (dsv4.chat.encode_chat). Tokenizers without added tokens (the byte-level
    one used for small random models) get the BOS id and the template's markers as plain bytes.
    max_tokens shortens the prompt *text* until the ids fit, so the template's tail (which differs between chat
    and thinking) is kept."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")
    ids = _encode(tok, prompt.text, mode)
    text = prompt.text
    for _ in range(8):                       # the template's overhead is fixed up to BPE merges at the seams
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
        text_ids = tok.encode(text)
        keep = max(0, len(text_ids) - (len(ids) - max_tokens) - 1)
        text = tok.decode(text_ids[:keep])
        ids = _encode(tok, text, mode)
    return ids[:max_tokens]


def _encode(tok, text: str, mode: str) -> list[int]:
    if mode == "raw":
        ids = [tok.bos_id, *tok.encode(text)]
    elif hasattr(tok, "token_to_id"):        # the V4 tokenizer knows the template's markers
        ids = encode_chat(tok, [{"role": "user", "content": text}], thinking=mode == "thinking")
    else:
        full = encode_messages([{"role": "user", "content": text}], thinking=mode == "thinking")
        ids = [tok.bos_id, *tok.encode(full.removeprefix(BOS_TOKEN))]
    return [int(i) for i in ids]
