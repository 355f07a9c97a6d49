"""Fused sparse MQA for one-pass calls (training, prefill from position 0) on CUDA, through FlexAttention.

The reference path (`Attention._attend_keys`) computes, per 512-query chunk, score tensors over the window slab
and the compressed entries, masks them, concatenates the sink, softmaxes and multiplies again by the values:
every intermediate goes through memory, forward and backward. Here one FlexAttention kernel (Triton, generated
by torch.compile with its backward) does all of it with an online softmax:

- MQA with shared KV: the h heads of a token become h consecutive query rows of a single head
  ([b, L, h, d] viewed as [b, 1, L·h, d], no copy), so a block of rows (128 / h tokens × h heads) reads each
  key tile once for all heads. Keys and values are the same tensor: [raw KV (padded) ‖ compressed entries].
- Which keys a row sees: its window band of raw KV, then the compressed entries visible to it (HCA) or
  picked for it by the indexer (CSA, a [b, L, N] membership table read inside the kernel). Key blocks no row of
  a query block sees are skipped (the block mask is built from the same rules, not by evaluating every pair).
- Sinks: the kernel's log-sum-exp gives the softmax denominator Z without the sink; the sink only widens it,
  so o = o_flex · Z / (Z + e^sink) = o_flex · sigmoid(lse − sink), differentiable in the sink.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..compiling import compile_fn
from . import indexer_kernel, sparse_attention_bwd, sparse_attention_fwd

try:
    from torch.nn.attention import flex_attention as _fa
except ImportError:                      # pragma: no cover - torch < 2.5
    _fa = None

Q_BLOCK = 128          # query rows (tokens × heads) per block-mask tile
K_BLOCK = 128          # keys per block-mask tile
_compiled = None


def available(q: torch.Tensor) -> bool:
    return _fa is not None and q.is_cuda and Q_BLOCK % q.shape[2] == 0


def _flex(*args, **kwargs):
    global _compiled
    if _compiled is None:
        _compiled = compile_fn(_fa.flex_attention, dynamic=False)
    return _compiled(*args, **kwargs)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attend(q: torch.Tensor, kv: torch.Tensor, comp: torch.Tensor | None, sel: torch.Tensor | None,
           sink: torch.Tensor, window: int, ratio: int, kernel_options: dict | None = None) -> torch.Tensor:
    """q [b,L,h,d] at positions 0…L−1; kv [b,L,d] their raw KV; comp [b,N,d] compressed entries (entry j
    visible from position (j+1)·ratio − 1 on) or None; sel [b,L,k] CSA picks (−1 = none) or None (HCA: every
    visible entry); sink [h] -> o [b, L, h, d] in q's dtype. With gradients needed and `Backward.triton`, the
    backward is the Triton kernel of sparse_attention_bwd.py instead of FlexAttention's; without it (off, or not
    compiling here, e.g. fp32 at head_dim 512 on an H100) FlexAttention's differentiable forward runs: the Triton
    forward is a plain kernel, its output would carry no gradient back."""
    grad = needs_grad(q, kv, comp, sink)
    if grad and Backward.triton and sparse_attention_bwd.available(q) and _backward_ready(q):
        if AsOp.enabled and kernel_options is None:
            return torch.ops.dsv4.sparse_mqa(q, kv, comp, sink, sel, window, ratio)[0]
        return _sparse_mqa(q, kv, comp, sink, sel, window, ratio, kernel_options)
    return _output_and_lse(q, kv, comp, sel, sink, window, ratio, kernel_options, triton=not grad)[0]


def _output_and_lse(q, kv, comp, sel, sink, window, ratio, kernel_options,
                    triton: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward, sink included: -> o [b,L,h,d] (q's dtype), log-denominator [b,L,h] fp32 — by the Triton
    forward where `triton`, `Forward.triton` and it runs here, otherwise by FlexAttention (differentiable)."""
    if triton and Forward.triton and sparse_attention_fwd.available(q):
        return sparse_attention_fwd.forward(q, kv, 0, 0, comp, sel, sink, window, ratio)
    return _with_sink(*_forward(q, kv, comp, sel, window, ratio, kernel_options), sink)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether this call builds an autograd graph through any of these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _with_sink(o: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """o, lse without the sink -> (o with the sink in the denominator, in o's dtype; log-denominator incl. the
    sink). The sink only widens the denominator: o · Z / (Z + e^sink)."""
    lse_all = torch.logaddexp(lse, sink.float())
    return (o.float() * torch.exp(lse - lse_all).unsqueeze(-1)).to(o.dtype), lse_all


class Backward:
    triton = True            # False: FlexAttention's own backward (16×16 tiles for head_dim 512, slower)


class Forward:
    triton = True            # the Triton forward (sparse_attention_fwd.py; 4-6x faster per layer than FlexAttention's
                             # on an H100 at b2x4096, benchmarks/results/2026-11-23_h100_fwd); False: FlexAttention


class AsOp:
    """enabled: the training call (Triton backward) as the torch custom op dsv4::sparse_mqa, which compiled blocks
    trace into one graph, instead of the autograd Function behind `torch.compiler.disable`, which splits each
    block's graph at the attention — into 6–7 graphs on a CSA block, one split per frame the call sits in (the
    block input's gradient is then summed between graphs, and every graph costs host work per step). On by
    default since stop 29: the compiled + CUDA-graph step at b2×4096 on an H100 75.6 -> 74.8 ms, gradients as
    the Function's (`benchmarks/switch_ab.py`). `compiling.compile_blocks` asks whether the backward compiles
    before anything is traced (`prepare_backward`), so a GPU where it does not falls back as in eager."""
    enabled = True


class Unavailable:
    """Why the fused path failed on this machine (set once, then the reference path runs), or None."""
    reason: str | None = None


def attend_or_none(*args, **kwargs) -> torch.Tensor | None:
    """`attend`, or None where this GPU / torch / Triton cannot compile it (e.g. not enough shared memory for
    head_dim 512 tiles): then one warning says why, and the caller's reference path runs from then on."""
    return _or_none(attend, *args, **kwargs)


def attend_cached_or_none(q, raw, raw_start: int, t0: int, comp, sel, sink, window: int, ratio: int):
    """The Triton forward at any start position (prefill chunks through the KV cache; arguments as
    `sparse_attention_fwd.forward`) -> o [b,L,h,d], or None as for `attend_or_none`."""
    out = _or_none(sparse_attention_fwd.forward, q, raw, raw_start, t0, comp, sel, sink, window, ratio)
    return None if out is None else out[0]


def _or_none(fn, *args, **kwargs):
    if Unavailable.reason is not None:
        return None
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - compile failures surface as many exception types
        Unavailable.reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        warnings.warn(f"dsv4: the fused attention kernel does not run here ({Unavailable.reason}); "
                      "using the reference attention path", RuntimeWarning, stacklevel=3)
        return None


_backward_ok: dict = {}


def _backward_ready(q: torch.Tensor) -> bool:
    """_backward_compiles, asked only the first time per (device, heads, head size, dtype). While dynamo traces
    the custom-op path (AsOp) the question waits for the op's first run, which raises if the answer is no:
    asking here would break the graph, and the traced graph keeps that break for good."""
    ok = _backward_ok.get((q.device, q.shape[2], q.shape[3], q.dtype))
    if ok is None and AsOp.enabled and torch.compiler.is_compiling():
        return True
    return _backward_compiles(q) if ok is None else ok


def prepare_backward(device: torch.device, heads: int, head_dim: int, dtypes) -> None:
    """Ask `_backward_compiles` now, outside any traced code, for these query shapes and dtypes (compiled blocks:
    the model's dtype and bf16, autocast's): the traced custom-op path then knows the answer and falls back where
    it is no, instead of raising at its first run."""
    if sparse_attention_bwd.available(torch.empty(0, device=device)):
        for dtype in dict.fromkeys(dtypes):
            _backward_compiles(torch.empty(1, 1, heads, head_dim, device=device, dtype=dtype))


@torch.compiler.disable
def _backward_compiles(q: torch.Tensor) -> bool:
    """Compile and run the Triton backward once on a small problem with q's heads, head size and dtype (all
    three key layouts): a backward that fails to compile would otherwise surface in the middle of loss.backward().
    A failure warns once and FlexAttention's backward is used instead."""
    key = (q.device, q.shape[2], q.shape[3], q.dtype)
    if key not in _backward_ok:
        h, d = q.shape[2:]
        g = torch.Generator(device=q.device).manual_seed(0)
        x = torch.randn(1, 8, h, d, device=q.device, dtype=q.dtype, generator=g)
        kv = torch.randn(1, 8, d, device=q.device, dtype=q.dtype, generator=g)
        comp = torch.randn(1, 2, d, device=q.device, dtype=q.dtype, generator=g)
        lse = torch.full((1, 8, h), 10.0, device=q.device)
        sel = torch.tensor([[[0, -1]] * 8], device=q.device)
        try:
            for c, s in ((None, None), (comp, None), (comp, sel)):
                sparse_attention_bwd.backward(x, kv, c, s, x, x, lse, torch.zeros(h, device=q.device), 4, 4)
            _backward_ok[key] = True
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001
            _backward_ok[key] = False
            warnings.warn(f"dsv4: the Triton attention backward does not compile here for {str(q.dtype)[6:]} "
                          f"queries of {h} heads × {d} ({type(e).__name__}); those use FlexAttention's backward",
                          RuntimeWarning, stacklevel=3)
    return _backward_ok[key]


class _SparseMQA(torch.autograd.Function):
    """FlexAttention (or Triton) forward, Triton backward (one program per token walking exactly its keys)."""

    @staticmethod
    def forward(ctx, q, kv, comp, sink, sel, window, ratio, kernel_options):
        with torch.no_grad():
            out, lse_all = _output_and_lse(q.detach(), kv.detach(), None if comp is None else comp.detach(), sel,
                                           sink, window, ratio, kernel_options)
        ctx.save_for_backward(q, kv, comp, sel, out, lse_all, sink)
        ctx.window, ctx.ratio = window, ratio
        return out

    @staticmethod
    def backward(ctx, do):
        q, kv, comp, sel, out, lse_all, sink = ctx.saved_tensors
        return (*_gradients(q, kv, comp, sel, out, do, lse_all, sink, ctx.window, ctx.ratio), None, None, None, None)


def _gradients(q, kv, comp, sel, out, do, lse, sink, window: int, ratio: int):
    """The Triton backward -> dq, dkv, dcomp (None without comp), dsink, each in its input's dtype."""
    dq, dkv, dcomp, dsink = sparse_attention_bwd.backward(q, kv, comp, sel, out, do, lse, sink, window, ratio)
    return dq, dkv.to(kv.dtype), None if comp is None else dcomp.to(comp.dtype), dsink.to(sink.dtype)


@torch.compiler.disable       # inside compiled blocks (train --compile) the Function runs as is, between graphs
def _sparse_mqa(*args):
    return _SparseMQA.apply(*args)


# The same call as torch custom ops (AsOp.enabled): forward and backward opaque to torch.compile, with autograd.
@torch.library.custom_op("dsv4::sparse_mqa", mutates_args=())
def _mqa_op(q: torch.Tensor, kv: torch.Tensor, comp: torch.Tensor | None, sink: torch.Tensor,
            sel: torch.Tensor | None, window: int, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> o [b, L, h, d] (q's dtype), log-denominator with the sink [b, L, h] fp32."""
    if not _backward_compiles(q):
        raise RuntimeError("dsv4: the Triton attention backward does not compile here (warned above); "
                           "set dsv4.model.sparse_attention.AsOp.enabled = False to use FlexAttention's backward")
    return _output_and_lse(q, kv, comp, sel, sink, window, ratio, None)


@_mqa_op.register_fake
def _(q, kv, comp, sink, sel, window, ratio):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("dsv4::sparse_mqa_backward", mutates_args=())
def _mqa_backward_op(q: torch.Tensor, kv: torch.Tensor, comp: torch.Tensor | None, sel: torch.Tensor | None,
                     out: torch.Tensor, do: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor, window: int,
                     ratio: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_gradients`, with an empty dcomp without comp (a custom op returns tensors)."""
    dq, dkv, dcomp, dsink = _gradients(q, kv, comp, sel, out, do, lse, sink, window, ratio)
    return dq, dkv, q.new_empty(0) if dcomp is None else dcomp, dsink


@_mqa_backward_op.register_fake
def _(q, kv, comp, sel, out, do, lse, sink, window, ratio):
    return (torch.empty_like(q), torch.empty_like(kv), q.new_empty(0) if comp is None else torch.empty_like(comp),
            torch.empty_like(sink))


def _mqa_setup(ctx, inputs, output):
    q, kv, comp, sink, sel, window, ratio = inputs
    ctx.save_for_backward(q, kv, comp, sel, output[0], output[1], sink)
    ctx.window, ctx.ratio, ctx.has_comp = window, ratio, comp is not None


def _mqa_backward(ctx, do, _dlse):
    q, kv, comp, sel, out, lse, sink = ctx.saved_tensors
    dq, dkv, dcomp, dsink = torch.ops.dsv4.sparse_mqa_backward(q, kv, comp, sel, out, do, lse, sink, ctx.window,
                                                               ctx.ratio)
    return dq, dkv, (dcomp if ctx.has_comp else None), dsink, None, None, None


_mqa_op.register_autograd(_mqa_backward, setup_context=_mqa_setup)


def _forward(q, kv, comp, sel, window, ratio, kernel_options):
    """FlexAttention over the window band and the compressed entries, no sink: -> o [b,L,h,d] (q's dtype),
    lse [b,L,h] fp32 (log of the softmax denominator without the sink)."""
    b, L, h, d = q.shape
    tpb = Q_BLOCK // h                                      # tokens per query block
    Lp, Sp = _cdiv(L, tpb) * tpb, _cdiv(L, K_BLOCK) * K_BLOCK
    N = 0 if comp is None else comp.shape[1]
    Np = _cdiv(N, K_BLOCK) * K_BLOCK
    parts = [F.pad(kv.to(q.dtype), (0, 0, 0, Sp - L))]
    if N:
        parts.append(F.pad(comp.to(q.dtype), (0, 0, 0, Np - N)))
    keys = torch.cat(parts, 1).unsqueeze(1)                 # [b, 1, Sp + Np, d]
    rows = (F.pad(q, (0, 0, 0, 0, 0, Lp - L)) if Lp != L else q).reshape(b, 1, Lp * h, d)

    # ---- which key blocks each query block touches: [b, nQ, nK] -----------------------------------------
    dev = q.device
    nQ = Lp // tpb
    t_lo = torch.arange(nQ, device=dev) * tpb
    t_hi = (t_lo + tpb - 1).clamp(max=L - 1)
    kb = torch.arange(Sp // K_BLOCK, device=dev)
    blocks = [((kb[None] >= ((t_lo - window + 1).clamp(min=0) // K_BLOCK)[:, None])
               & (kb[None] <= (t_hi // K_BLOCK)[:, None])).expand(b, -1, -1)]
    member = None
    if N:
        cb = torch.arange(Np // K_BLOCK, device=dev)
        if sel is None:                                     # HCA: the entries the block's last token sees
            blocks.append(((cb[None] * K_BLOCK) < ((t_hi + 1) // ratio)[:, None]).expand(b, -1, -1))
        else:                                               # CSA: the entries any of its tokens picked
            member = F.pad(indexer_kernel.pick_table(sel, Np), (0, 0, 0, Lp - L))  # [b, Lp, Np]
            blocks.append(member.view(b, nQ, tpb, Np // K_BLOCK, K_BLOCK).any(-1).any(2))
    blocks = torch.cat(blocks, -1).unsqueeze(1)                                 # [b, 1, nQ, nK]
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)

    def mask_mod(bi, hi, qi, ki):
        t = qi // h
        in_window = (ki < Sp) & (ki <= t) & (ki > t - window)
        if not N:
            return in_window
        j = (ki - Sp).clamp(min=0)
        if member is None:
            seen = (ki >= Sp) & ((j + 1) * ratio <= t + 1)
        else:
            seen = (ki >= Sp) & member[bi, t, j]
        return in_window | seen

    bm = _fa.BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=(Q_BLOCK, K_BLOCK), mask_mod=mask_mod,
                                      seq_lengths=(Lp * h, keys.shape[2]))
    if hasattr(_fa, "AuxRequest"):
        o, aux = _flex(rows, keys, keys, block_mask=bm, scale=d ** -0.5, kernel_options=kernel_options,
                       return_aux=_fa.AuxRequest(lse=True))
        lse = aux.lse
    else:                                                   # pragma: no cover - older torch
        o, lse = _flex(rows, keys, keys, block_mask=bm, scale=d ** -0.5, kernel_options=kernel_options,
                       return_lse=True)
    return o.view(b, Lp, h, d)[:, :L], lse.view(b, Lp, h)[:, :L].float()
