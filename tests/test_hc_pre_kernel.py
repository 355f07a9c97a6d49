"""The fused mHC pre step (`hc_pre_kernel`: mixes, maps, Sinkhorn and collapse in one Triton kernel per
direction) equals `mhc.hc_pre`'s PyTorch ops, values and gradients. Runs where Triton runs: on a CUDA machine,
or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped elsewhere (CI's CPU build of torch has
no Triton). The sm90 compile test needs only Triton's compiler."""
import pytest
import torch

from conftest import compile_for_hopper, model_equal_with_switch, rel_diff, triton_compiler

from dsv4.model import hc_pre_kernel, mhc
from dsv4.model.mhc import Fusion

DEV = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(not hc_pre_kernel.available(torch.empty(0, device=DEV)),
                               reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")


def _inputs(dtype, b, s, n, D, seed):
    g = torch.Generator().manual_seed(seed)
    m = (2 + n) * n
    h = torch.randn(b, s, n, D, generator=g).to(DEV, dtype)
    fn = (torch.randn(m, n * D, generator=g) * 0.1).to(DEV)
    base, scale = (torch.randn(m, generator=g) * 0.3).to(DEV), (torch.rand(3, generator=g) + 0.5).to(DEV)
    return [t.requires_grad_() for t in (h, fn, base, scale)], g


@runs_here
@pytest.mark.parametrize("dtype,shape,bf16_split", [(torch.float32, (2, 19, 4, 48), False),    # ragged tokens, width
                                                    (torch.float32, (1, 20, 3, 32), False),    # n = 3: padded comb
                                                    (torch.bfloat16, (1, 37, 4, 64), False),   # a bf16 model's
                                                    (torch.bfloat16, (1, 37, 4, 64), True)])   # … by bf16 pieces
def test_pre_and_gradients_equal_reference(dtype, shape, bf16_split, monkeypatch):
    """y, post, comb and the gradients w.r.t. the streams, fn, base and scale equal the PyTorch ops' (Sinkhorn
    as its PyTorch loop) for random upstream gradients of all three outputs. bf16 results are rounded once, the
    reference's too; Triton's interpreter rounds fp32 -> bf16 toward zero (a GPU to nearest), so bf16 values may
    differ by one bf16 step. Bounds of 1e-5 leave room for the GPU's tf32x3 products (the interpreter's fp32
    products land near 1e-7); a wrong term lands above 1e-2. (The reference must not take the kernel itself, on
    by default under autograd: pre_kernel off for it.)"""
    monkeypatch.setattr(Fusion, "enabled", False)
    monkeypatch.setattr(Fusion, "pre_kernel", False)
    monkeypatch.setattr(hc_pre_kernel.Config, "bf16_split", bf16_split)
    (h, fn, base, scale), g = _inputs(dtype, *shape, seed=shape[1])
    ref_in = [t.detach().clone().requires_grad_() for t in (h, fn, base, scale)]
    got = hc_pre_kernel.hc_pre(h, fn, base, scale, 20, 1e-6, 1e-6)
    ref = mhc.hc_pre(*ref_in, 20, 1e-6, 1e-6)
    assert got[0].dtype == dtype and got[0].shape == shape[:2] + shape[3:]
    assert rel_diff(got[0], ref[0]) < (1e-5 if dtype == torch.float32 else 2 ** -7)
    assert rel_diff(got[1], ref[1]) < 1e-5 and rel_diff(got[2], ref[2]) < 1e-5
    ups = [torch.randn(t.shape, generator=g).to(DEV) for t in ref]
    for out in (got, ref):
        sum((o.float() * u).sum() for o, u in zip(out, ups)).backward()
    assert h.grad.dtype == dtype
    assert rel_diff(h.grad, ref_in[0].grad) < (1e-5 if dtype == torch.float32 else 2 ** -7)
    for a, r in zip((fn, base, scale), ref_in[1:]):
        assert rel_diff(a.grad, r.grad) < 1e-5
    # every gradient path matters: without the Sinkhorn's gradient the maps' gradients would be far off
    ref_in[2].grad = None
    sum((o.float() * u).sum() for o, u in zip(mhc.hc_pre(*ref_in, 20, 1e-6, 1e-6)[:2], ups[:2])).backward()
    assert rel_diff(base.grad, ref_in[2].grad) > 1e-2


@runs_here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_forward_equals_one_kernel(dtype, monkeypatch):
    """Config.split: the mixes' products over 4 programs per row block (`_pre_part`), summed by the forward
    kernel, give the one-kernel results up to summation order, and the split really applies at this width."""
    (h, fn, base, scale), _ = _inputs(dtype, 1, 37, 4, 64, seed=11)
    monkeypatch.setattr(hc_pre_kernel.Config, "cols", 32)
    one = hc_pre_kernel.hc_pre(h, fn, base, scale, 20, 1e-6, 1e-6)
    monkeypatch.setattr(hc_pre_kernel.Config, "split", 4)
    assert hc_pre_kernel._split(4 * 64) == 4
    split = hc_pre_kernel.hc_pre(h, fn, base, scale, 20, 1e-6, 1e-6)
    for a, b in zip(split, one):
        assert rel_diff(a, b) < (1e-6 if a.dtype == torch.float32 else 2 ** -7)
    assert rel_diff(split[2], one[2]) < 1e-6                         # comb (fp32 at either stream dtype)


def test_supported_only_where_the_kernel_computes_the_call():
    h = torch.empty(1, 2, 4, 8)
    assert not hc_pre_kernel.supported(h, "hc")                     # unconstrained comb (ablation): no Sinkhorn
    assert not hc_pre_kernel.supported(torch.empty(1, 2, 2, 8), "mhc")   # comb block under a dot's 16 columns
    assert not hc_pre_kernel.supported(h.half(), "mhc")
    assert hc_pre_kernel.supported(h, "mhc") == hc_pre_kernel.available(h)


@runs_here
def test_model_with_pre_kernel_equals_reference(monkeypatch):
    """Whole model: logits and every gradient equal with the kernel on and off (fp32), and the kernel really
    runs; the compiled case has its own test below."""
    gref = model_equal_with_switch(monkeypatch, "pre_kernel", hc_pre_kernel, "hc_pre", DEV, seed=3, seq=21)
    assert any("hc_ffn_scale" in n for n in gref) and any("hc_attn_base" in n for n in gref)


@pytest.mark.skipif(DEV != "cuda", reason="torch.compile of the custom op: CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pre_kernel_inside_torch_compile(dtype, monkeypatch):
    """Traced into a compiled function (as the compiled blocks and the mHC functions are), forward and
    backward, against the eager PyTorch ops."""
    (h, fn, base, scale), _ = _inputs(dtype, 2, 40, 4, 64, seed=5)
    hr = h.detach().clone().requires_grad_()
    monkeypatch.setattr(Fusion, "pre_kernel", True)
    f = torch.compile(lambda t: sum(o.float().square().sum() for o in mhc.hc_pre(t, fn, base, scale, 20, 1e-6, 1e-6)),
                      fullgraph=True)
    f(h).backward()
    monkeypatch.setattr(Fusion, "pre_kernel", False)
    sum(o.float().square().sum() for o in mhc.hc_pre(hr, fn, base, scale, 20, 1e-6, 1e-6)).backward()
    assert rel_diff(h.grad, hr.grad) < (1e-5 if dtype == torch.float32 else 2 ** -7)


@pytest.mark.parametrize("compiled", [False, True])
def test_bf16_pieces_carry_fp32(compiled):
    """hi + mid + lo = w exactly for fp32 values over many binades (each piece bf16), and a bf16 x times the
    pieces, summed in fp64, equals x·w: the bf16 dots lose nothing but the fp32 sums' rounding. Also compiled:
    the op's body is traced into compiled blocks, and a split by rounding casts (piece = w.bfloat16(), rest =
    w - piece.float()) compiles to mid = lo = 0 there (Inductor drops the round trip)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 512, generator=g) * torch.logspace(-8, 8, 512)
    torch._dynamo.reset()
    p = (torch.compile(hc_pre_kernel._pieces, fullgraph=True) if compiled else hc_pre_kernel._pieces)(w)
    assert p.dtype == torch.bfloat16 and p.shape == (3, 64, 512)
    assert torch.equal(p[0].double() + p[1].double() + p[2].double(), w.double())
    x = torch.randn(8, 512, generator=g).bfloat16().double()
    assert torch.allclose(sum(x @ q.double().t() for q in p), x @ w.double().t(), rtol=1e-12, atol=0)


@pytest.mark.skipif(not triton_compiler(), reason="needs Triton's compiler (not its interpreter)")
@pytest.mark.parametrize("h_dtype", ["bf16", "fp32", "bf16-pieces"])
def test_pre_kernels_compile_for_hopper(h_dtype):
    """Both kernels compile for sm90 (no GPU needed) at the bench model's size (n 4, D 1024) within an H100's
    shared memory per program."""
    k = hc_pre_kernel
    np4, npp = k._sizes(4)
    pieces = 3 if h_dtype == "bf16-pieces" else 0
    h_dtype = h_dtype.split("-")[0]
    consts = dict(D=1024, N=4, NP4=np4, NPP=npp, ITERS=20, BM=k.Config.rows, BD=k.Config.cols,
                  PREC=k.Config.precision)
    fwd = dict(consts, PIECES=pieces)
    f32 = {n: "fp32" for n in ("W", "SCALE", "BASE", "POST", "COMB", "MIX", "RSTD", "DPOST", "DCOMB", "DZ", "DA", "SCR",
                               "PART", "SSP")}
    no_iters = {n: v for n, v in consts.items() if n != "ITERS"}
    w = ("W",) if pieces else ()                    # the pieces are bf16
    for kernel, c, streams, floats in ((k._pre_fwd, dict(fwd, SPLIT=1), ("H", "Y") + w, ("eps", "hc_eps")),
                                       (k._pre_fwd, dict(fwd, SPLIT=4), ("H", "Y") + w, ("eps", "hc_eps")),
                                       (k._pre_part, dict(no_iters, SPLIT=4, PIECES=pieces), ("H",) + w, ()),
                                       (k._pre_bwd, consts, ("H", "DY", "DH"), ("hc_eps",))):
        ptr = dict(f32, **{name: h_dtype for name in streams})
        shared = compile_for_hopper(kernel, c, ptr, floats=floats, num_warps=k.Config.warps)
        assert shared <= 227 * 1024, (kernel, shared)


def test_kernels_serve_autograd_only(monkeypatch):
    """With the switches on, hc_pre and hc_expand take their kernels under autograd (training) and the PyTorch
    ops without it (prefill, decode: the kernel's forward alone was the slower one on an H200)."""
    from dsv4.model import hc_expand_kernel

    class Ran(Exception):
        pass

    def stand_in(*args, **kwargs):
        raise Ran
    for module, fn in ((hc_pre_kernel, "hc_pre"), (hc_expand_kernel, "hc_expand")):
        monkeypatch.setattr(module, "supported", lambda *a: True)
        monkeypatch.setattr(module, fn, stand_in)
    monkeypatch.setattr(mhc.Fusion, "pre_kernel", True)
    monkeypatch.setattr(mhc.Fusion, "expand_kernel", True)
    h, y = torch.randn(1, 3, 4, 8), torch.randn(1, 3, 8)
    fn, base, scale = torch.randn(24, 32) * 0.1, torch.randn(24), torch.rand(3)
    with torch.no_grad():
        x, post, comb = mhc.hc_pre(h, fn, base, scale, 20, 1e-6, 1e-6)
        assert mhc.hc_expand(y, h, post, comb).shape == h.shape and x.shape == y.shape
    with pytest.raises(Ran):
        mhc.hc_pre(h, fn, base, scale, 20, 1e-6, 1e-6)
    with pytest.raises(Ran):
        mhc.hc_expand(y, h, post, comb)
