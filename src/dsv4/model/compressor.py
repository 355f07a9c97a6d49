"""KV compression: every m tokens become one compressed KV entry (CSA: m = 4 with overlapping windows,
HCA: m = 128). The lightning indexer owns a second compressor at its own head size.

Entry w pools its window with a per-channel softmax over learned gate scores (+ `ape`, a bias by position in
the window). With overlap (m = 4) the projections are 2·d wide: channels [d:2d] of window w and channels
[0:d] of window w−1 share one softmax over 2m slots, so entries see 8 tokens with stride 4.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..numerics import indexer_roundtrip, kv_roundtrip
from .fp32_linear import fp32_linear
from .layers import RMSNorm, Rotary


@dataclass
class CompressorState:
    """What a compressor carries between calls (decode / chunked prefill): the rows of the window that is
    not complete yet, and (overlap only) the rows of the last complete window."""
    pending_kv: torch.Tensor | None = None      # [b, P, c·d] fp32, P < m
    pending_score: torch.Tensor | None = None
    prev_kv: torch.Tensor | None = None         # [b, m, c·d] fp32 (overlap only)
    prev_score: torch.Tensor | None = None

    def clone(self) -> "CompressorState":
        return CompressorState(*(None if t is None else t.clone() for t in
                                 (self.pending_kv, self.pending_score, self.prev_kv, self.prev_score)))


class Compressor(nn.Module):
    def __init__(self, dim: int, head_dim: int, ratio: int, rope_dim: int, norm_eps: float, for_indexer: bool):
        super().__init__()
        self.head_dim, self.ratio, self.rope_dim = head_dim, ratio, rope_dim
        self.overlap = ratio == 4
        self.for_indexer = for_indexer
        self.official = False
        c = 2 if self.overlap else 1
        self.ape = nn.Parameter(torch.zeros(ratio, c * head_dim))
        self.wkv = nn.Linear(dim, c * head_dim, bias=False)
        self.wgate = nn.Linear(dim, c * head_dim, bias=False)
        self.norm = RMSNorm(head_dim, norm_eps)

    @property
    def ring_size(self) -> int:
        """Rows the static decode ring keeps: the window being filled (and, overlap, the one before)."""
        return 2 * self.ratio if self.overlap else self.ratio

    def step(self, x: torch.Tensor, pos: torch.Tensor, ring: dict, rope: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Static decode form of `forward`: x [b, 1, D] at the position held by the 0-dim tensor pos. The token's
        rows go to ring slot pos % R; returns (the entry of pos's window computed from the ring [b, 1, d],
        whether pos completes that window as a 0-dim bool). The entry is meaningful only when complete."""
        m, d, R = self.ratio, self.head_dim, self.ring_size
        t = pos.view(1)
        kv = fp32_linear(x, self.wkv.weight)                                 # [b, 1, c·d] fp32
        score = fp32_linear(x, self.wgate.weight) + self.ape.float()[t % m]
        ring["kv"].index_copy_(1, t % R, kv)
        ring["score"].index_copy_(1, t % R, score)
        start = (t // m) * m                                                 # first position of pos's window
        rows = (start + torch.arange(m, device=x.device)) % R
        kvw, scw = ring["kv"][:, rows][:, None], ring["score"][:, rows][:, None]     # [b, 1, m, c·d]
        if self.overlap:                                                     # the previous window's [0:d] channels
            prev = (rows + m) % R
            kvw = torch.cat([ring["kv"][:, prev][:, None, :, :d], kvw[..., d:]], dim=2)       # [b, 1, 2m, d]
            scw = torch.cat([ring["score"][:, prev][:, None, :, :d], scw[..., d:]], dim=2)
        entry = (kvw * scw.softmax(dim=2)).sum(dim=2)                         # [b, 1, d]
        entry = self.norm(entry.to(x.dtype))
        cos, sin = rope.angles(start)
        entry = Rotary.apply(entry, cos, sin)
        if self.official:
            entry = indexer_roundtrip(entry) if self.for_indexer else kv_roundtrip(entry, self.rope_dim)
        return entry, (pos + 1) % m == 0

    def forward(self, x: torch.Tensor, start_pos: int, state: CompressorState, rope: Rotary) -> torch.Tensor:
        """x [b, L, D] at positions start_pos… -> the entries completed by these tokens [b, n, head_dim].

        Entries are numbered globally: the first returned one is entry (start_pos − P) // m, P being the
        number of pending tokens in `state`. `state` is updated in place."""
        b, L, _ = x.shape
        m, d = self.ratio, self.head_dim
        kv = fp32_linear(x, self.wkv.weight)                                 # [b, L, c·d]: compression runs in fp32
        pos = torch.arange(start_pos, start_pos + L, device=x.device)
        score = fp32_linear(x, self.wgate.weight) + self.ape.float()[pos % m]
        if state.pending_kv is not None and state.pending_kv.shape[1]:
            kv = torch.cat([state.pending_kv, kv], 1)
            score = torch.cat([state.pending_score, score], 1)
        P = kv.shape[1] - L
        n = kv.shape[1] // m
        first_entry = (start_pos - P) // m
        state.pending_kv, state.pending_score = kv[:, n * m:], score[:, n * m:]
        if n == 0:
            return x.new_zeros(b, 0, d)
        kv = kv[:, :n * m].unflatten(1, (n, m))                                # [b, n, m, c·d]
        score = score[:, :n * m].unflatten(1, (n, m))
        if self.overlap:
            if state.prev_kv is None:
                prev_kv = kv.new_zeros(b, 1, m, 2 * d)
                prev_sc = score.new_full((b, 1, m, 2 * d), float("-inf"))
            else:
                prev_kv, prev_sc = state.prev_kv[:, None], state.prev_score[:, None]
            if n:
                state.prev_kv, state.prev_score = kv[:, -1].clone(), score[:, -1].clone()
            # slot layout per entry: m rows of the previous window's [0:d] channels, then this window's [d:2d]
            kv = torch.cat([torch.cat([prev_kv, kv[:, :-1]], 1)[..., :d], kv[..., d:]], dim=2)   # [b, n, 2m, d]
            score = torch.cat([torch.cat([prev_sc, score[:, :-1]], 1)[..., :d], score[..., d:]], dim=2)
        entries = (kv * score.softmax(dim=2)).sum(dim=2)                      # [b, n, d]
        entries = self.norm(entries.to(x.dtype))
        cos, sin = rope.angles((first_entry + torch.arange(n, device=x.device)) * m)   # window's first token
        entries = Rotary.apply(entries, cos, sin)
        if self.official:
            entries = indexer_roundtrip(entries) if self.for_indexer else kv_roundtrip(entries, self.rope_dim)
        return entries
