"""The fused, chunked head + cross-entropy (model/head_loss.py) equals cross_entropy over the full logits."""
import pytest
import torch
import torch.nn.functional as F

from dsv4.model.head_loss import head_cross_entropy


def _project(x, w):
    return F.linear(x.float(), w.float())


def _data(T=37, D=12, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g), torch.randn(V, D, generator=g), torch.randint(0, V, (T,), generator=g)


@pytest.mark.parametrize("linear", [False, True])
@pytest.mark.parametrize("chunk", [5, 37, 100])
@pytest.mark.parametrize("which", ["both", "x", "w"])
def test_value_and_gradients_equal_full_logits(chunk, which, linear):
    """Ragged / exact / single chunks; gradients for x, w or both (the other gets none); an upstream scale
    (mean and weighting) reaches both gradients. linear: dW accumulated by a GEMM per chunk (fp32_linear.addmm32_)
    instead of autograd's dW added up."""
    x, w, t = _data()
    x.requires_grad_(which in ("both", "x"))
    w.requires_grad_(which in ("both", "w"))
    ref = F.cross_entropy(_project(x, w), t, reduction="sum")
    ref_g = torch.autograd.grad(0.3 * ref / 37, [a for a in (x, w) if a.requires_grad])
    got = head_cross_entropy(x, w, t, _project, chunk, linear=linear)
    got_g = torch.autograd.grad(0.3 * got / 37, [a for a in (x, w) if a.requires_grad])
    assert abs(float(got - ref)) <= 1e-6 * float(ref)
    for a, r in zip(got_g, ref_g):
        assert torch.allclose(a, r, rtol=1e-5, atol=1e-7)


def test_without_gradients_only_the_loss():
    x, w, t = _data(seed=1)
    x.requires_grad_()
    with torch.no_grad():
        got = head_cross_entropy(x, w, t, _project, 8)
    assert not got.requires_grad
    assert abs(float(got - F.cross_entropy(_project(x, w), t, reduction="sum"))) <= 1e-5


@pytest.mark.parametrize("fp32_logits,linear", [(True, False), (False, False), (False, True)])
def test_under_bf16_autocast_gradients_follow_the_autocast_projection(fp32_logits, linear):
    """With autocast on, the chunks' projection and its backward run as an unchunked autocast projection
    would (bf16 GEMMs); gradients agree to bf16 rounding, in the parameters' own dtype. Logits the projection
    returns in bf16 (the fp32 head form under autocast) still get an fp32 loss and softmax. linear: dW from
    bf16 dz and x by the GEMM accumulating in fp32 (the model's head under `dsv4 train`'s autocast)."""
    x, w, t = _data(T=64, D=32, V=300, seed=2)
    x.requires_grad_()
    w.requires_grad_()
    proj = (lambda a, b: F.linear(a, b).float()) if fp32_logits else (lambda a, b: F.linear(a, b))  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(proj(x, w).float(), t, reduction="sum")
        got = head_cross_entropy(x, w, t, proj, 16, linear=linear)
    ref_g, got_g = torch.autograd.grad(ref, (x, w)), torch.autograd.grad(got, (x, w))
    assert abs(float(got - ref)) <= 1e-5 * float(ref)
    for a, r in zip(got_g, ref_g):
        assert a.dtype == torch.float32
        assert float((a - r).norm()) <= 2e-2 * float(r.norm())


def _kernel_here() -> bool:
    from dsv4.model import ce_kernel
    return ce_kernel.available(torch.empty(1, device="cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_pytorch_ops(dtype):
    """The Triton kernel (one program per row: online log-sum-exp, then dz = softmax − onehot) gives the PyTorch
    ops' loss per row and dz, over a vocabulary that ends in a partial block; dz in the logits' dtype."""
    if not _kernel_here():
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    from dsv4.model import ce_kernel
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(4)
    V = ce_kernel.BLOCK + 904
    z = (torch.randn(6, V, generator=g) * 4).to(dtype).to(dev)
    t = torch.tensor([0, 5, V - 1, ce_kernel.BLOCK, 17, ce_kernel.BLOCK - 1]).to(dev)
    rows, dz = ce_kernel.loss_and_grad(z, t)
    zf = z.float()
    ref_rows = torch.logsumexp(zf, -1) - zf.gather(1, t[:, None]).squeeze(1)
    ref_dz = zf.softmax(-1) - F.one_hot(t, V).float()
    assert dz.dtype == dtype
    assert torch.allclose(rows, ref_rows, rtol=1e-6, atol=1e-5)
    # the online log-sum-exp rounds differently from logsumexp: ~1e-7 of an lse of ~20, so p is good to ~1e-5
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    assert torch.allclose(dz.float(), ref_dz, rtol=tol, atol=1e-7 if dtype == torch.float32 else 1e-3)


def test_fused_loss_with_the_kernel_equals_full_logits(monkeypatch):
    """head_cross_entropy with the kernel on (head_loss.Config.kernel): value and gradients of full logits."""
    if not _kernel_here():
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    from dsv4.model import head_loss
    monkeypatch.setattr(head_loss.Config, "kernel", True)
    calls = []
    real = head_loss.ce_kernel.loss_and_grad
    monkeypatch.setattr(head_loss.ce_kernel, "loss_and_grad", lambda z, t: calls.append(z.shape) or real(z, t))
    dev = "cuda" if torch.cuda.is_available() else "cpu"          # where the kernel runs (CPU: interpreter)
    x, w, t = (a.to(dev) for a in _data(T=37, D=12, V=50))
    x.requires_grad_()
    w.requires_grad_()
    ref = F.cross_entropy(_project(x, w), t, reduction="sum")
    ref_g = torch.autograd.grad(ref, (x, w))
    got = head_cross_entropy(x, w, t, _project, 8)
    got_g = torch.autograd.grad(got, (x, w))
    assert len(calls) == 5                                       # every chunk through the kernel
    assert abs(float(got - ref)) <= 1e-6 * float(ref)
    for a, r in zip(got_g, ref_g):
        assert float((a - r).norm()) <= 1e-5 * float(r.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scale_kernel_equals_mul(dtype):
    """ce_kernel.scaled (the backward's g · dW in the weight's dtype) gives ATen's mul into that dtype, over a
    size that ends in a partial block: bit for bit on CUDA (and in fp32); Triton's interpreter rounds fp32 to
    bf16 toward zero where the GPU rounds to nearest, so there within one bf16 step."""
    if not _kernel_here():
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    from dsv4.model import ce_kernel
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 1000, generator=g).to(dev)
    s = torch.tensor(0.37, device=dev)
    got = ce_kernel.scaled(x, s, dtype)
    assert got.dtype == dtype and got.shape == x.shape
    ref = torch.mul(x, s, out=torch.empty(x.shape, dtype=dtype, device=dev))
    if dev == "cuda" or dtype == torch.float32:
        assert torch.equal(got, ref)
    else:
        assert float(((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-30)).max()) <= 2 ** -7
        assert float((got.float() - (x * s).float()).abs().max()) > 0          # rounded, not a copy of fp32


def test_kernel_compiles_for_hopper():
    from conftest import compile_for_hopper, triton_compiler
    if not triton_compiler():
        pytest.skip("needs Triton's compiler (not its interpreter)")
    from dsv4.model import ce_kernel
    for dt in ("bf16", "fp32"):
        shared = compile_for_hopper(ce_kernel._ce_kernel, {"BLOCK": ce_kernel.BLOCK},
                                    {"Z": dt, "T": "i64", "LOSS": "fp32", "DZ": dt})
        assert shared <= 227 * 1024, (dt, shared)
        shared = compile_for_hopper(ce_kernel._scale_kernel, {"BLOCK": ce_kernel.SCALE_BLOCK}, {"X": "fp32", "G": "fp32", "OUT": dt})
        assert shared <= 227 * 1024, (dt, shared)
