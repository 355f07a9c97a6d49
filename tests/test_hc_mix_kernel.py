"""The Triton mHC mixing kernel (projection + norm, forward and backward) equals mHC's PyTorch ops. Runs where
Triton runs: on a CUDA machine, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped elsewhere
(CI's CPU build of torch has no Triton)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import compile_for_hopper, model_equal_with_switch, rel_diff, triton_compiler

from dsv4.model import hc_mix_kernel, mhc
from dsv4.model.mhc import Fusion

DEV = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(not hc_mix_kernel.available(torch.empty(0, device=DEV)),
                               reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")


def _reference(x, fn, eps):
    x = x.float()
    return F.linear(x, fn) * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


@runs_here
@pytest.mark.parametrize("dtype,M,K,N", [(torch.float32, 70, 200, 24),     # ragged rows and columns, several
                                         (torch.float32, 130, 64, 4),      # row slices; hc_head's 4 maps
                                         (torch.bfloat16, 65, 96, 24)])    # the streams in bf16 (a bf16 model)
def test_mixes_and_gradients_equal_reference(dtype, M, K, N):
    """Same mixes and the same gradients w.r.t. the streams and fn (fp32 products). In bf16 the streams'
    gradient is rounded to bf16 as the reference's is: against the reference's unrounded fp32 gradient it is off
    by that rounding alone."""
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, K, generator=g) * 2).to(DEV, dtype).requires_grad_()
    fn = (torch.randn(N, K, generator=g) * 0.1).to(DEV).requires_grad_()
    xr, fr = x.detach().float().requires_grad_(), fn.detach().clone().requires_grad_()
    y, yr = hc_mix_kernel.mixes(x, fn, 1e-6), _reference(xr, fr, 1e-6)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert rel_diff(y, yr) < 1e-6
    dy = torch.randn(M, N, generator=g).to(DEV)
    (y * dy).sum().backward()
    (yr * dy).sum().backward()
    assert x.grad.dtype == dtype
    assert rel_diff(fn.grad, fr.grad) < 1e-5
    assert rel_diff(x.grad, xr.grad) < (1e-5 if dtype == torch.float32 else 2 ** -8)
    # the norm's own gradient term matters: dropping it would be far off
    assert rel_diff(dy @ fr.detach() * torch.rsqrt(xr.detach().square().mean(-1, keepdim=True) + 1e-6), xr.grad) > 1e-2


@runs_here
def test_model_with_mix_kernel_equals_reference(monkeypatch):
    """Whole model (every sublayer's hc_pre and the final hc_head): logits and every gradient equal with the
    kernel on and off (fp32), and the kernel really runs; the compiled case has its own test below. (The mix
    kernel serves hc_pre only while the whole-pre kernel is off.)"""
    monkeypatch.setattr(Fusion, "pre_kernel", False)
    gref = model_equal_with_switch(monkeypatch, "mix_kernel", hc_mix_kernel, "mixes", DEV)
    assert any("hc_attn_fn" in n for n in gref) and "hc_head_fn" in gref


@pytest.mark.skipif(DEV != "cuda", reason="torch.compile of the custom op: CUDA")
def test_mix_kernel_inside_torch_compile(monkeypatch):
    """Traced into the compiled hc_pre (as training and the compiled decode step use it), forward and backward."""
    monkeypatch.setattr(Fusion, "mix_kernel", True)
    monkeypatch.setattr(Fusion, "pre_kernel", False)                 # (else hc_pre takes the whole-pre kernel)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 40, 4, 64, generator=g).to(DEV).requires_grad_()
    fn, base, scale = (torch.randn(24, 256, generator=g) * 0.1).to(DEV), torch.randn(24).to(DEV), torch.rand(3).to(DEV)
    hr = h.detach().clone().requires_grad_()
    f = torch.compile(lambda t: sum(o.float().square().sum() for o in mhc.hc_pre(t, fn, base, scale, 20, 1e-6, 1e-6)),
                      fullgraph=True)
    f(h).backward()
    monkeypatch.setattr(Fusion, "mix_kernel", False)
    sum(o.float().square().sum() for o in mhc.hc_pre(hr, fn, base, scale, 20, 1e-6, 1e-6)).backward()
    assert rel_diff(h.grad, hr.grad) < 1e-5


@pytest.mark.skipif(not triton_compiler(), reason="needs Triton's compiler (not its interpreter)")
@pytest.mark.parametrize("x_dtype", ["bf16", "fp32"])
def test_mix_kernels_compile_for_hopper(x_dtype):
    """All three kernels compile for sm90 (no GPU needed) within an H100's shared memory per program."""
    k = hc_mix_kernel
    consts = {"BM": k.Config.rows, "BK": k.Config.cols, "NP": 32}
    ptr = {n: "fp32" for n in ("W", "MIX", "RSTD", "G", "PART")}
    ptr.update(X=x_dtype, DX=x_dtype)
    for kernel in (k._mix_fwd, k._mix_bwd_x, k._mix_bwd_w):
        shared = compile_for_hopper(kernel, consts, ptr, floats=("eps",))
        assert shared <= 227 * 1024, (kernel, shared)
