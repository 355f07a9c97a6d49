"""Hybrid attention: shared-KV MQA over a sliding window plus (CSA) indexer-selected or (HCA) all visible
compressed entries, with per-head attention sinks.

No dense [seq, seq] or [seq, n_compressed] tensor is ever built: queries are processed in chunks of
`query_chunk`; a chunk sees the contiguous raw-KV band it needs (window), the top-k gathered compressed
entries (CSA) or the compressed entries (HCA, m = 128 makes these few). Memory is
O(chunk × (window + chunk + top-k)) for sliding/CSA layers and O(chunk × seq/128) for HCA layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..numerics import indexer_roundtrip, kv_roundtrip
from . import indexer_kernel, sparse_attention, sparse_attention_fwd
from .compressor import Compressor, CompressorState
from .grouped_output import grouped_output, plain_output
from .layers import Linear, RMSNorm, Rotary, unweighted_rms

NEG_INF = float("-inf")


class CacheOverflowError(RuntimeError):
    """More tokens than the KV cache was allocated for."""


@dataclass
class AttnCache:
    """Decode state of one attention layer. Buffers are preallocated for `max_len` tokens."""
    window: torch.Tensor                         # [b, W, d] last raw KV entries, oldest first
    n_window: int = 0
    comp: torch.Tensor | None = None             # [b, max_len // m, d] compressed entries
    n_comp: int = 0
    comp_state: CompressorState = field(default_factory=CompressorState)
    idx_keys: torch.Tensor | None = None         # [b, max_len // 4, c_I] indexer keys (CSA)
    n_idx: int = 0
    idx_state: CompressorState = field(default_factory=CompressorState)
    # static layout (fixed shapes, for CUDA-graph decoding; see Attention.to_static): the window becomes a ring
    # (position p in slot p % W) and each compressor's pending rows live in fp32 rings {"kv", "score"}
    static: dict | None = None

    def reset(self) -> None:
        """Empty the cache for a new sequence (buffers are kept; what they hold is ignored)."""
        self.n_window = self.n_comp = self.n_idx = 0
        self.comp_state, self.idx_state = CompressorState(), CompressorState()

    def snapshot(self) -> dict:
        """Everything a rollback needs. The compressed buffers are append-only, so their counts suffice."""
        return {"window": self.window.clone(), "n_window": self.n_window, "n_comp": self.n_comp, "n_idx": self.n_idx,
                "comp_state": self.comp_state.clone(), "idx_state": self.idx_state.clone()}

    def restore(self, snap: dict) -> None:
        self.window.copy_(snap["window"])
        self.n_window, self.n_comp, self.n_idx = snap["n_window"], snap["n_comp"], snap["n_idx"]
        self.comp_state, self.idx_state = snap["comp_state"].clone(), snap["idx_state"].clone()

    def nbytes(self) -> int:
        """Bytes of the preallocated buffers (the formula in dsv4.inference.kv counts exactly these)."""
        return sum(t.numel() * t.element_size() for t in (self.window, self.comp, self.idx_keys) if t is not None)


class Indexer(nn.Module):
    """Lightning indexer: score(t, j) = Σ_h w_{t,h} · ReLU(q_{t,h} · K_j); keeps the top-k visible entries."""
    fused = True             # score with the Triton kernel where it runs (CUDA); False: always the reference path

    def __init__(self, cfg: ModelConfig, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim, self.topk, self.ratio = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, ratio
        self.official = False
        # training: the loss of the last forward, computed only while a training recipe collects it
        # (`collect_loss`, set around its forward by train.recipe.compute_loss; see `kl_loss`)
        self.collect_loss = False
        self.loss: torch.Tensor | None = None
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, fp8_input=True)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads)
        self.compressor = Compressor(cfg.hidden_size, self.head_dim, ratio, cfg.qk_rope_head_dim, cfg.rms_norm_eps,
                                     for_indexer=True)

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """-> q [b, L, H, c] (rotated/rounded under official numerics), head weights [b, L, H] fp32."""
        q = Rotary.apply(self.wq_b(qr).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin)
        if self.official:
            q = indexer_roundtrip(q)
        w = self.weights_proj(x).float() * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w

    def select(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, t: torch.Tensor,
               t0: int | None = None) -> torch.Tensor:
        """q [b,C,H,c], w [b,C,H], keys [b,N,c], t [C] absolute positions -> entry ids [b, C, k], −1 = none.
        Queries are scored in sub-chunks so the score tensor stays under 2^28 elements at any length.
        t0 (optional, = t[0] as a Python int, positions contiguous): a sub-chunk then scores only the entries its
        last query can see, not the later ones it would mask (half the work of a one-pass prefill)."""
        n = keys.shape[1]
        k = min(self.topk, n)
        b, C = q.shape[:2]
        if k == 0:
            return torch.empty(b, C, 0, dtype=torch.long, device=q.device)
        fused = self.fused and indexer_kernel.available(q)
        # the reference path's [C', H, N] scores (the fused kernel's [C', N]) stay under 2^28 elements
        step = max(1, (256 << 20) // max(1, b * (1 if fused else self.n_heads) * n))
        out = []
        for c0 in range(0, C, step):
            qc, wc, tc = q[:, c0:c0 + step], w[:, c0:c0 + step], t[c0:c0 + step]
            m = n if t0 is None else min(n, (t0 + c0 + qc.shape[1]) // self.ratio)   # entries seen by the last query
            idx = torch.full((b, qc.shape[1], k), -1, dtype=torch.long, device=q.device)
            if m:
                n_vis = ((tc + 1) // self.ratio)[:, None]                                # [C', 1]
                if fused:
                    s = indexer_kernel.visible_scores(qc, wc, keys[:, :m], tc, self.ratio)   # [b, C', m]
                else:
                    s = torch.einsum("bchd,bnd->bchn", qc, keys[:, :m].to(qc.dtype)).float().relu_()
                    s = torch.einsum("bchn,bch->bcn", s, wc)                            # [b, C', m]
                    s.masked_fill_(torch.arange(m, device=q.device)[None] >= n_vis, NEG_INF)
                top = s.topk(min(k, m), dim=-1).indices
                idx[..., :top.shape[-1]] = torch.where(top < n_vis[None], top, -1)
            out.append(idx)
        return torch.cat(out, 1)

    def kl_loss(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, sel: torch.Tensor,
                target: torch.Tensor, chunk: int = 512, dense: bool = False) -> torch.Tensor | None:
        """The indexer's own training loss. Its top-k pick is not differentiable, so the LM loss never reaches
        its weights; as DeepSeek-V3.2 trains the DSA indexer (which V4's CSA applies to compressed entries), it
        learns to match the main attention: per query, KL(target ‖ softmax of its scores over the same picks),
        target from `Attention._indexer_target`; mean over the queries that have picks (0 if none has; no host
        sync, so a CUDA graph can hold it). q [b,L,H,c], w [b,L,H], keys [b,N,c], sel / target [b,L,k].
        Recomputed chunk by chunk in the backward (activation checkpointing): the gathered keys [b, chunk, k, c]
        never pile up over a long sequence; dense: score all entries by one GEMM instead of gathering the
        picked keys (faster while the entries are few). None without picks to score (k = 0)."""
        if sel.shape[-1] == 0:
            return None
        n = (sel >= 0).any(-1).sum().clamp(min=1)
        total = sum(checkpoint(_kl_sum, q[:, c0:c0 + chunk], w[:, c0:c0 + chunk], keys, sel[:, c0:c0 + chunk],
                               target[:, c0:c0 + chunk], dense, use_reentrant=False)
                    for c0 in range(0, sel.shape[1], chunk))
        return total / n

    def select_static(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, n_vis: torch.Tensor) -> torch.Tensor:
        """Decode form of `select` over a preallocated key buffer keys [b, Ncap, c] of which the first n_vis
        (0-dim tensor) entries exist: q [b,1,H,c], w [b,1,H] -> [b, 1, min(top-k, Ncap)], −1 = none."""
        n = keys.shape[1]
        k = min(self.topk, n)
        if k == 0:
            return torch.empty(q.shape[0], q.shape[1], 0, dtype=torch.long, device=q.device)
        s = torch.einsum("bchd,bnd->bchn", q, keys.to(q.dtype)).float().relu_()
        s = torch.einsum("bchn,bch->bcn", s, w)
        visible = torch.arange(n, device=q.device) < n_vis
        idx = s.masked_fill_(~visible, NEG_INF).topk(k, dim=-1).indices
        return torch.where(idx < n_vis, idx, -1)


def _kl_sum(q, w, keys, sel, target, dense: bool) -> torch.Tensor:
    """Σ over queries of KL(target ‖ softmax(s)), s the indexer's scores of the picks (−1 picks: s masked,
    target 0). dense: score every entry by one GEMM and take the picks' scores (few entries), else gather the
    picked keys. The mask is finite, so a query without picks gives 0 and no NaN (its target is all 0)."""
    b, C, k = sel.shape
    if dense:
        s = torch.einsum("bchd,bnd->bchn", q, keys.to(q.dtype)).float().relu()
        s = torch.einsum("bchn,bch->bcn", s, w.float()).gather(-1, sel.clamp(min=0))   # [b, C, k]
    else:
        flat = (sel.clamp(min=0) + keys.shape[1] * torch.arange(b, device=sel.device)[:, None, None]).flatten()
        kg = keys.flatten(0, 1)[flat].view(b, C, k, -1).to(q.dtype)                  # [b, C, k, c]
        s = torch.einsum("bchd,bckd->bchk", q, kg).float().relu()
        s = torch.einsum("bchk,bch->bck", s, w.float())                               # [b, C, k]
    s = s.masked_fill(sel < 0, -1e30)
    return (target * (target.clamp_min(1e-30).log() - s.log_softmax(-1))).sum()


def _probs_at_picks(p: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """p [b, C, h, N] over all compressed entries -> [b, C, h, k] at the picks sel [b, C, k], 0 at −1 picks."""
    return p.gather(-1, sel.clamp(min=0)[:, :, None].expand(-1, -1, p.shape[2], -1)).masked_fill(sel[:, :, None] < 0, 0)


class Attention(nn.Module):
    query_chunk = 512
    fused = True             # one-pass calls on CUDA (prefill, scoring, training) use the fused sparse MQA
                             # (sparse_attention.py: the Triton forward, or FlexAttention's)
    fused_training = True    # False: training keeps the reference path (backward: sparse_attention_bwd.py on CUDA)
    fused_cached = True      # chunks through a KV cache (chunked prefill, L > 1) use the Triton forward
                             # (sparse_attention_fwd.py); decode steps (L = 1) keep the reference path
    csa_mask_factor = 4      # CSA picks applied as a mask while n_compressed ≤ factor · top-k, gathered beyond
    fused_output = "cuda"    # under autograd, the output step by grouped_output.py's ops: "cuda" (there only),
                             # "always" (the CPU too: tests), "" (never)

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim
        self.n_groups, self.o_lora_rank, self.eps = cfg.o_groups, cfg.o_lora_rank, cfg.rms_norm_eps
        dense = cfg.attention == "dense"
        self.ratio = 0 if dense else cfg.compress_ratios[layer_id]
        self.window = cfg.max_position_embeddings if dense else cfg.sliding_window
        self.official = False
        self.recorder = None     # dissection: a callable(event, **tensors) fed from the reference path
        h, d = self.n_heads, self.head_dim
        self.attn_sink = nn.Parameter(torch.zeros(h))
        self.wq_a = Linear(cfg.hidden_size, cfg.q_lora_rank, fp8_input=True)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(cfg.q_lora_rank, h * d, fp8_input=True)
        self.wkv = Linear(cfg.hidden_size, d, fp8_input=True)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.wo_a = Linear(h * d // self.n_groups, self.n_groups * self.o_lora_rank)
        self.wo_b = Linear(self.n_groups * self.o_lora_rank, cfg.hidden_size, fp8_input=True)
        if self.ratio:
            # compressed layers: compress_rope_theta with YaRN; sliding-only layers: rope_theta, no YaRN
            self.rope = Rotary(self.rope_dim, cfg.compress_rope_theta, cfg.yarn)
            self.compressor = Compressor(cfg.hidden_size, d, self.ratio, self.rope_dim, cfg.rms_norm_eps, False)
            self.indexer = Indexer(cfg, self.ratio) if self.ratio == 4 else None
        else:
            self.rope = Rotary(self.rope_dim, cfg.rope_theta, None)
            self.compressor = self.indexer = None

    # ------------------------------------------------------------------------------------------ cache
    def new_cache(self, batch: int, max_len: int, device, dtype) -> AttnCache:
        c = AttnCache(window=torch.zeros(batch, min(self.window, max_len), self.head_dim, device=device, dtype=dtype))
        if self.ratio:
            c.comp = torch.zeros(batch, max_len // self.ratio, self.head_dim, device=device, dtype=dtype)
            if self.indexer is not None:
                c.idx_keys = torch.zeros(batch, max_len // self.ratio, self.indexer.head_dim, device=device, dtype=dtype)
        return c

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, start_pos: int = 0, cache: AttnCache | None = None) -> torch.Tensor:
        """x [b, L, D] holding positions start_pos … start_pos+L−1 -> [b, L, D]. A tensor start_pos (0-dim)
        selects the static decode step (L = 1, cache in the static layout, see `to_static`)."""
        if isinstance(start_pos, torch.Tensor):
            return self._decode_static(x, start_pos, cache)
        b, L, _ = x.shape
        h, d, r = self.n_heads, self.head_dim, self.rope_dim
        t_all = torch.arange(start_pos, start_pos + L, device=x.device)
        cos, sin = self.rope.angles(t_all)

        qr = self.q_norm(self.wq_a(x))                                             # [b, L, q_lora]
        q = unweighted_rms(self.wq_b(qr).unflatten(-1, (h, d)), self.eps)           # [b, L, h, d]
        q = Rotary.apply(q, cos, sin)
        kv = Rotary.apply(self.kv_norm(self.wkv(x)), cos, sin)                      # [b, L, d]
        if self.official:
            kv = kv_roundtrip(kv, r)

        # raw keys: the cached tail of earlier tokens, then this call's tokens
        if cache is not None and cache.n_window:
            raw = torch.cat([cache.window[:, :cache.n_window], kv], 1)
        else:
            raw = kv
        raw_start = start_pos - (raw.shape[1] - L)

        comp = idx_sel = None
        if self.ratio:
            comp = self._compressed(x, start_pos, cache, self.compressor, "comp")   # [b, N, d]
            if self.indexer is not None:
                # the pick is not differentiable: the indexer sees the model's activations detached and trains on
                # its own loss only (Indexer.kl_loss, while a recipe collects it), as the LM loss trains the rest;
                # otherwise it builds no autograd graph at all
                learn = self.indexer.collect_loss and cache is None and start_pos == 0 and torch.is_grad_enabled()
                with torch.set_grad_enabled(learn):
                    xi, qri = x.detach(), qr.detach()
                    keys = self._compressed(xi, start_pos, cache, self.indexer.compressor, "idx_keys")
                    iq, iw = self.indexer.queries(xi, qri, cos, sin)
                with torch.no_grad():
                    idx_sel = torch.cat([self.indexer.select(iq[:, c0:c0 + self.query_chunk],
                                                             iw[:, c0:c0 + self.query_chunk], keys,
                                                             t_all[c0:c0 + self.query_chunk], start_pos + c0)
                                         for c0 in range(0, L, self.query_chunk)], 1)   # [b, L, k]
                if learn:
                    target = self._indexer_target(q.detach(), kv.detach(), comp.detach(), idx_sel, t_all)
                    self.indexer.loss = self.indexer.kl_loss(iq, iw, keys, idx_sel, target, self.query_chunk,
                                                             keys.shape[1] <= self.csa_mask_factor * idx_sel.shape[-1])
                if self.recorder is not None:
                    self.recorder("indexer", selected=idx_sel, positions=t_all, ratio=self.ratio)
        if cache is not None:
            tail = raw[:, -cache.window.shape[1]:]
            cache.window[:, :tail.shape[1]] = tail
            cache.n_window = tail.shape[1]

        if (self.fused and cache is None and start_pos == 0 and self.recorder is None and sparse_attention.available(q)
                and (self.fused_training or not sparse_attention.needs_grad(q, kv, comp, self.attn_sink))):
            o = sparse_attention.attend_or_none(q, kv, comp, idx_sel, self.attn_sink, self.window, self.ratio)
            if o is not None:                        # None: the kernel cannot compile here (warned once)
                return self._output(o.to(x.dtype), cos, sin)
        if (self.fused and self.fused_cached and cache is not None and L > 1 and self.recorder is None
                and sparse_attention_fwd.available(q) and not sparse_attention.needs_grad(q, kv, comp, self.attn_sink)):
            o = sparse_attention.attend_cached_or_none(q, raw, raw_start, start_pos, comp, idx_sel, self.attn_sink,
                                                       self.window, self.ratio)
            if o is not None:                        # None: the kernel cannot run here (warned once)
                return self._output(o.to(x.dtype), cos, sin)
        outs = [self._attend(q[:, c0:c0 + self.query_chunk], raw, raw_start, t_all[c0:c0 + self.query_chunk],
                             start_pos + c0, comp, None if idx_sel is None else idx_sel[:, c0:c0 + self.query_chunk])
                for c0 in range(0, L, self.query_chunk)]
        return self._output(torch.cat(outs, 1).to(x.dtype), cos, sin)

    def _output(self, o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output o [b, L, h, d] -> [b, L, D]."""
        wo_a = self.wo_a.weight.to(o.dtype).view(self.n_groups, self.o_lora_rank, -1)
        # inverse RoPE, then the grouped low-rank projection (each group of h/g heads -> o_lora_rank), then wo_b
        fast = self.fused_output in ("always", "cuda" if o.is_cuda else "") and sparse_attention.needs_grad(o, wo_a)
        return self.wo_b((grouped_output if fast else plain_output)(o, wo_a, cos, sin))

    # ------------------------------------------------------------------------------------------ static decode
    def to_static(self, cache: AttnCache, pos: int) -> None:
        """Rewrite a cache filled by `forward` for positions 0…pos−1 into the static layout, in place: window
        slot p % W holds position p; each compressor's rows since its last complete window (and, overlap, the
        rows of that window) move into fixed-size fp32 rings. Buffers are allocated once per cache."""
        Wb = cache.window.shape[1]
        if cache.n_window == Wb and pos % Wb:
            # window[:, i] holds position pos − W + i, which belongs in slot (pos − W + i) % W
            cache.window.copy_(cache.window.roll(pos % Wb, dims=1))
        elif cache.n_window not in (Wb, pos):        # pragma: no cover - guarded by forward's bookkeeping
            raise ValueError(f"cache holds {cache.n_window} window entries at position {pos}")
        if not self.ratio:
            return
        if cache.static is None:
            cache.static = {}
        parts = [("comp", self.compressor, cache.comp_state)]
        if self.indexer is not None:
            parts.append(("idx", self.indexer.compressor, cache.idx_state))
        for name, cmp, state in parts:
            m, R = cmp.ratio, cmp.ring_size
            width = cmp.wkv.weight.shape[0]
            ring = cache.static.get(name)
            if ring is None:
                b, dev = cache.window.shape[0], cache.window.device
                ring = cache.static[name] = {"kv": torch.zeros(b, R, width, device=dev),
                                             "score": torch.zeros(b, R, width, device=dev)}
            ring["kv"].zero_()
            ring["score"].fill_(NEG_INF)             # rows never written (before position 0) weigh nothing
            P = pos % m
            if P:
                assert state.pending_kv is not None and state.pending_kv.shape[1] == P
                rows = torch.arange(pos - P, pos, device=ring["kv"].device) % R
                ring["kv"][:, rows] = state.pending_kv.float()
                ring["score"][:, rows] = state.pending_score.float()
            if cmp.overlap and state.prev_kv is not None:
                rows = torch.arange(pos - P - m, pos - P, device=ring["kv"].device) % R
                ring["kv"][:, rows] = state.prev_kv.float()
                ring["score"][:, rows] = state.prev_score.float()

    def _decode_static(self, x: torch.Tensor, pos: torch.Tensor, cache: AttnCache) -> torch.Tensor:
        """One token per sequence, x [b, 1, D], at the position held by the 0-dim long tensor `pos`, over a
        cache in the static layout. Every shape is fixed by the cache's capacity and nothing is read back to
        the host, so the step can be captured in a CUDA graph; every write depends only on (token, pos), so
        re-running a step is harmless (what a graph warm-up does)."""
        h, d = self.n_heads, self.head_dim
        t = pos.view(1)
        cos, sin = self.rope.angles(t)
        qr = self.q_norm(self.wq_a(x))
        q = Rotary.apply(unweighted_rms(self.wq_b(qr).unflatten(-1, (h, d)), self.eps), cos, sin)   # [b,1,h,d]
        kv = Rotary.apply(self.kv_norm(self.wkv(x)), cos, sin)                                   # [b,1,d]
        if self.official:
            kv = kv_roundtrip(kv, self.rope_dim)
        Wb = cache.window.shape[1]
        cache.window.index_copy_(1, t % Wb, kv.to(cache.window.dtype))
        slot = torch.arange(Wb, device=x.device)
        kpos = t - (t - slot) % Wb                                                   # position held by each slot
        band = ((kpos >= 0) & (kpos > t - self.window))[None]                        # [1, Wb]

        comp = sel = None
        if self.ratio:
            comp = self._compress_static(x, pos, cache, self.compressor, cache.comp, "comp")
            if self.indexer is not None:
                keys = self._compress_static(x, pos, cache, self.indexer.compressor, cache.idx_keys, "idx")
                iq, iw = self.indexer.queries(x, qr, cos, sin)
                sel = self.indexer.select_static(iq, iw, keys, (pos + 1) // self.ratio)
        o = self._attend_keys(q, cache.window, band, t, comp, sel)
        return self._output(o.to(x.dtype), cos, sin)

    def _compress_static(self, x, pos, cache, compressor: Compressor, store: torch.Tensor, name: str) -> torch.Tensor:
        """Feed this token to the compressor's ring; when it completes a window, its entry goes to slot pos // m
        of `store` (written either way, with the old value when incomplete). Returns the whole buffer."""
        entry, complete = compressor.step(x, pos, cache.static[name], self.rope)
        N = store.shape[1]
        if N:
            i = (pos // compressor.ratio).clamp(max=N - 1).view(1)
            store.index_copy_(1, i, torch.where(complete, entry.to(store.dtype), store.index_select(1, i)))
        return store

    def _compressed(self, x, start_pos, cache, compressor: Compressor, buf: str) -> torch.Tensor:
        """Run the compressor on this call's tokens; return every entry so far [b, N, ·]."""
        if cache is None:
            return compressor(x, start_pos, CompressorState(), self.rope)
        comp = buf == "comp"
        new = compressor(x, start_pos, cache.comp_state if comp else cache.idx_state, self.rope)
        store, n0 = (cache.comp, cache.n_comp) if comp else (cache.idx_keys, cache.n_idx)
        n1 = n0 + new.shape[1]
        if n1 > store.shape[1]:
            raise CacheOverflowError(f"KV cache overflow: {n1} compressed entries > capacity {store.shape[1]} "
                                     "(allocate the cache with a larger max_len)")
        store[:, n0:n1] = new
        if comp:
            cache.n_comp = n1
        else:
            cache.n_idx = n1
        return store[:, :n1]

    def _attend(self, q, raw, raw_start, t, t0, comp, sel) -> torch.Tensor:
        """One query chunk. q [b,C,h,d]; raw [b,R,d] raw KV from position raw_start; t [C] positions starting at
        the int t0; comp [b,N,d] compressed entries or None; sel [b,C,k] CSA picks (−1 = none) or None.

        Products run in the input dtype (fp32 accumulation inside the GEMMs, as the official kernel), softmax in
        fp32. CSA picks are applied as a mask over all entries while they are few (N ≤ 4k: one dense GEMM beats
        a gather), and gathered otherwise, so memory stays O(C·(window + k)) at long context."""
        kw, band, comp = self._chunk_keys(raw, raw_start, t, t0, q.shape[1], comp)
        if self.recorder is not None and sel is not None:   # a callable: computed only if the recorder asks
            self.recorder("indexer_recall", recall=lambda: self._pick_recall(q, kw, band, t, comp, sel))
        return self._attend_keys(q, kw, band, t, comp, sel)

    @torch.no_grad()
    def _pick_recall(self, q, kw, band, t, comp, sel) -> torch.Tensor:
        """Dissection: how much of the attention a dense pass would give the compressed entries lands on the
        indexer's picks. The same softmax over every visible entry (as HCA attends), then per query and head
        Σ_picks p / Σ_visible p, mean over heads -> [b, C], NaN for a query that sees no entry yet. 1 where
        the picks cover every visible entry. Queries in sub-chunks, so the dense scores stay under 2^26."""
        b, C, h = q.shape[:3]
        out = torch.full((b, C), float("nan"), device=q.device)
        N = 0 if comp is None else comp.shape[1]
        if N == 0:
            return out
        step = max(1, (1 << 26) // max(1, b * h * (N + kw.shape[1])))
        for c0 in range(0, C, step):
            c1 = min(C, c0 + step)
            p, kwc, _, _ = self._probs(q[:, c0:c1], kw, band[c0:c1], t[c0:c1], comp, None)
            pc = p[..., kwc.shape[1]:-1]                                             # [b, C', h, N]
            s = sel[:, c0:c1]
            picked = _probs_at_picks(pc, s).sum(-1)                                  # [b, C', h]
            out[:, c0:c1] = (picked / pc.sum(-1)).mean(-1)          # 0/0 = NaN: nothing visible yet
        return out

    def _chunk_keys(self, raw, raw_start, t, t0, C, comp):
        """What C queries at positions t (from the int t0) see: raw keys kw [b, Nw, d] with band [C, Nw] (which
        query sees which key), and the compressed entries up to the last one the chunk's last query sees."""
        W = self.window
        lo = max(raw_start, t0 - W + 1)
        hi = t0 + C
        kw = raw[:, lo - raw_start:hi - raw_start]                                   # [b, Nw, d]
        kpos = torch.arange(lo, hi, device=raw.device)
        band = (kpos[None] <= t[:, None]) & (kpos[None] > t[:, None] - W)            # [C, Nw]
        if comp is not None:        # entries later than the chunk's last query sees would only be masked
            comp = comp[:, :(hi // self.ratio)]
        return kw, band, comp

    def _probs(self, q, kw, band, t, comp, sel):
        """The attention probabilities of `_attend_keys` -> (p [b, C, h, Nw + (N or k) + 1] fp32 over the raw
        keys, the compressed entries — all N, or the k gathered picks — and the sink; kw and kc in q's dtype
        (kc [b, C, k, d] gathered or [b, N, d]; None without entries); whether the picks were gathered)."""
        scale = self.head_dim ** -0.5
        b, C = q.shape[:2]
        kw = kw.to(q.dtype)
        scores = [torch.einsum("bchd,bnd->bchn", q, kw).float().mul_(scale).masked_fill_(~band[None, :, None], NEG_INF)]
        kc, gathered = None, False
        if comp is not None and comp.shape[1]:
            N = comp.shape[1]
            kc = comp.to(q.dtype)
            if sel is None:                                                          # HCA: every visible entry
                hide = torch.arange(N, device=q.device)[None] >= ((t + 1) // self.ratio)[:, None]   # [C, N]
                hide = hide[None, :, None]
            elif N <= self.csa_mask_factor * sel.shape[-1]:                          # CSA, few entries: mask
                hide = ~indexer_kernel.pick_table(sel, N)[:, :, None]                # [b, C, 1, N]
            else:                                                                    # CSA, many entries: gather
                flat = (sel.clamp(min=0) + N * torch.arange(b, device=q.device)[:, None, None]).flatten()
                kc = kc.flatten(0, 1)[flat].view(b, C, -1, kc.shape[-1])               # [b, C, k, d]
                hide, gathered = (sel < 0)[:, :, None], True
            sc = torch.einsum("bchd,bckd->bchk" if gathered else "bchd,bnd->bchn", q, kc)
            scores.append(sc.float().mul_(scale).masked_fill_(hide, NEG_INF))
        sink = self.attn_sink.float()[None, None, :, None].expand(b, C, -1, 1)
        p = torch.cat(scores + [sink], -1).softmax(-1)                                 # sink only widens the denominator
        return p, kw, kc, gathered

    def _attend_keys(self, q, kw, band, t, comp, sel) -> torch.Tensor:
        """q [b,C,h,d] over raw keys kw [b,Nw,d] (band [C, Nw]: which ones each query sees), then compressed
        entries comp [b,N,d] of which query t sees the first (t+1)//ratio, through CSA picks sel or all (HCA)."""
        p, kw, kc, gathered = self._probs(q, kw, band, t, comp, sel)
        nw = kw.shape[1]
        if self.recorder is not None:     # attention mass per query and head on window / compressed / sink
            self.recorder("attention", window=p[..., :nw].sum(-1), compressed=p[..., nw:-1].sum(-1), sink=p[..., -1],
                          positions=t)
        p = p.to(q.dtype)
        o = torch.einsum("bchn,bnd->bchd", p[..., :nw], kw)
        if kc is not None:
            o = o + torch.einsum("bchk,bckd->bchd" if gathered else "bchn,bnd->bchd", p[..., nw:-1], kc)
        return o

    @torch.no_grad()
    def _indexer_target(self, q, kv, comp, sel, t) -> torch.Tensor:
        """The indexer's training target for a one-pass call from position 0 (q [b,L,h,d], kv [b,L,d], comp
        [b,N,d], sel [b,L,k], t [L]): per query, the main attention's probability on each CSA pick, summed over
        heads and normalised over the picks -> [b, L, k] fp32, 0 at −1 picks (all 0 for a query without any).
        From the reference path's probabilities, chunk by chunk, whichever path computed the layer's output."""
        out = []
        for c0 in range(0, q.shape[1], self.query_chunk):
            qc, sc, tc = q[:, c0:c0 + self.query_chunk], sel[:, c0:c0 + self.query_chunk], t[c0:c0 + self.query_chunk]
            kw, band, cc = self._chunk_keys(kv, 0, tc, c0, qc.shape[1], comp)
            p, kw, _, gathered = self._probs(qc, kw, band, tc, cc, sc)
            pc = p[..., kw.shape[1]:-1]                                              # [b, C, h, k or N]
            if pc.shape[-1] == 0:                                                    # no entry visible yet
                out.append(torch.zeros(sc.shape, device=q.device))
                continue
            if not gathered:
                pc = _probs_at_picks(pc, sc)
            pc = pc.sum(2).masked_fill_(sc < 0, 0)                                   # [b, C, k]
            out.append(pc / pc.sum(-1, keepdim=True).clamp_min(1e-30))
        return torch.cat(out, 1)
