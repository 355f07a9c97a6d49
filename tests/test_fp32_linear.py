"""The compressor's fp32 projection on bf16 tensor cores (model/fp32_linear.py): same values as fp32 GEMMs."""
import pytest
import torch

from dsv4.model import fp32_linear as fl

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and hasattr(torch.ops.aten.mm, "dtype") else [])


def test_three_bf16_pieces_hold_an_fp32_value():
    """hi + mid + lo gives back every fp32 value (wide exponent range, both signs) exactly; two pieces would
    leave errors near 2⁻¹⁶."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-60, 60, (4096,), generator=g).float())
    hi, mid, lo = fl.bf16_pieces(a)
    assert hi.dtype == mid.dtype == lo.dtype == torch.bfloat16
    err = (hi.double() + mid.double() + lo.double() - a.double()).abs()
    assert bool((err == 0).all())
    assert float(((hi.double() + mid.double() - a.double()).abs() / a.double().abs()).max()) > 2.0 ** -20


def test_pieces_stay_exact_under_torch_compile():
    """The split inside a compiled graph (the compiled blocks' backward) is still exact: Inductor drops a
    bf16 -> fp32 round trip inside a fused kernel, so a split by rounding casts (piece = rest.bfloat16(),
    rest - piece.float()) compiles to mid = lo = 0, a 4e-3 error; the bit-mask split has none."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-60, 60, (4096,), generator=g).float())
    hi, mid, lo = torch.compile(fl.bf16_pieces, fullgraph=True)(a)
    assert bool((hi.double() + mid.double() + lo.double() == a.double()).all())
    assert bool((mid != 0).any())


@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients_equal_fp32_products(monkeypatch, device):
    """y = x·wᵀ, dx and dW through the tensor-core form against float64 products of the same numbers: within
    fp32 rounding (1e-6 relative), where a bf16 GEMM with bf16 output is ~1e-3 off. (On the CPU the form is
    forced on; its products are then fp32 GEMMs of the bf16 pieces, the same exact products.)"""
    if device == "cpu":
        monkeypatch.setattr(fl, "usable", lambda x, w: True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 96, 256, generator=g).bfloat16().to(device).requires_grad_()
    w = (torch.randn(192, 256, generator=g) / 16).bfloat16().to(device).requires_grad_()
    up = torch.randn(2, 96, 192, generator=g).to(device)                     # an fp32 incoming gradient
    y = fl.fp32_linear(x, w)
    assert y.dtype == torch.float32
    (y * up).sum().backward()

    xd, wd, ud = x.detach().double(), w.detach().double(), up.double()
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
    assert rel(y.detach(), xd @ wd.t()) < 1e-6
    dw_exact = ud.flatten(0, 1).t() @ xd.flatten(0, 1)
    assert w.grad.dtype == torch.bfloat16 and rel(w.grad, dw_exact) < 4e-3       # (bf16 output: rounding only)
    assert rel(fl._split_mm(up.flatten(0, 1).t(), x.detach().flatten(0, 1)), dw_exact) < 1e-6   # … before it
    assert x.grad.dtype == torch.bfloat16 and rel(x.grad, ud @ wd) < 4e-3          # (bf16 output: rounding only)
    # … of a value within fp32 rounding: only rare elements near a bf16 tie round the other way (H100: 4e-5;
    # CPU 5e-6), where g as one bf16 piece is 2.6e-3 off (two pieces: 1.2e-4; the dW check above needs three)
    assert rel(x.grad, (ud @ wd).bfloat16().double()) < 2e-4
    assert rel((x.detach() @ w.detach().bfloat16().t()).float(), xd @ wd.t()) > 1e-4   # what a bf16 GEMM gives


def test_off_cuda_or_disabled_it_is_the_plain_fp32_product(monkeypatch):
    """Where the form does not apply (CPU, fp32 weights, or Config.enabled False) the result is
    x.float() @ w.float().t() itself, bit for bit."""
    x = torch.randn(3, 5, 64).bfloat16()
    w = torch.randn(32, 64)
    assert torch.equal(fl.fp32_linear(x, w), x.float() @ w.t())
    assert not fl.usable(x, w.bfloat16())                                            # CPU
    if DEVICES[-1] == "cuda":
        assert fl.usable(x.cuda(), w.bfloat16().cuda()) and not fl.usable(x.cuda(), w.cuda())   # fp32 weights
        monkeypatch.setattr(fl.Config, "enabled", False)
        assert not fl.usable(x.cuda(), w.bfloat16().cuda())


@pytest.mark.parametrize("device", DEVICES)
def test_addmm32_accumulates_in_place_in_fp32(device):
    """acc ← beta·acc + a@b for bf16 a, b into an fp32 acc, in acc's own memory (the fused head loss's dW):
    beta 1 adds to what is there, beta 0 ignores it (NaN included); fp32 precision against float64, where a
    bf16 result added to acc would be ~1e-3 off."""
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(*s, generator=g).bfloat16().to(device) for s in ((192, 300), (300, 80)))
    start = torch.randn(192, 80, generator=g).to(device)
    ref = start.double() + a.double() @ b.double()
    acc = start.clone()
    out = fl.addmm32_(acc, a, b)
    assert out.data_ptr() == acc.data_ptr() and acc.dtype == torch.float32
    assert float((acc.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    acc = torch.full((192, 80), float("nan"), device=device)
    fl.addmm32_(acc, a, b, beta=0.0)
    assert float((acc.double() - a.double() @ b.double()).abs().max() / ref.abs().max()) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_mm_few_rows_has_fp32_precision(device):
    """a (fp32, few rows) @ b (bf16): on CUDA a's three bf16 pieces in one GEMM, fp32 precision against float64
    (a rounded to bf16 instead would be ~1e-3 off); fp32 b takes the fp32 GEMM."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(24, 500, generator=g).to(device)
    b = torch.randn(500, 96, generator=g).bfloat16().to(device)
    ref = a.double() @ b.double()
    for bb in (b, b.float()):
        got = fl.mm_few_rows(a.t().contiguous().t(), bb)          # a transposed view, as the caller passes it
        assert got.dtype == torch.float32 and got.shape == (24, 96)
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-6
    assert float((a.bfloat16().double() @ b.double() - ref).norm() / ref.norm()) > 1e-4


@pytest.mark.skipif(DEVICES[-1] != "cuda", reason="the fp32-output bf16 GEMM runs on CUDA only")
def test_fp32_linear_compiles_in_one_graph():
    """Inside torch.compile the projection (and its backward, which dynamo traces with it) is one graph with
    the same values and gradients as eager; addmm32_ keeps its beta semantics there (NaN in acc ignored at beta
    0). torch 2.11 broke the graph at the fp32-output addmm (`got multiple values for argument 'beta'`)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 256, generator=g).bfloat16().cuda().requires_grad_()
    w = (torch.randn(96, 256, generator=g) / 16).bfloat16().cuda().requires_grad_()
    up = torch.randn(2, 64, 96, generator=g).cuda()
    loss = lambda x, w: (fl.fp32_linear(x, w) * up).sum()          # noqa: E731
    x2, w2 = (t.detach().clone().requires_grad_() for t in (x, w))
    loss(x, w).backward()
    torch.compile(loss, fullgraph=True)(x2, w2).backward()
    for name, got, want in (("dx", x2.grad, x.grad), ("dW", w2.grad, w.grad)):
        err = float((got.float() - want.float()).abs().max())
        assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3), (name, err)
    a, b = (torch.randn(*s, generator=g).bfloat16().cuda() for s in ((128, 300), (300, 80)))
    start = torch.randn(128, 80, generator=g).cuda()
    for beta in (0.0, 1.0, 0.5):
        acc0 = torch.full_like(start, float("nan")) if beta == 0 else start
        got = torch.compile(fl.addmm32_, fullgraph=True)(acc0.clone(), a, b, beta)
        ref = (0 if beta == 0 else beta * start.double()) + a.double() @ b.double()
        err = float((got.double() - ref).abs().max() / ref.abs().max())
        assert err < 1e-6, (beta, err)
