"""The Triton Sinkhorn kernel (mHC's comb maps) equals `mhc.sinkhorn`, forward and backward. Runs where Triton
runs: on a CUDA machine, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped elsewhere (CI's
CPU build of torch has no Triton)."""
import pytest
import torch

from conftest import compile_for_hopper, triton_compiler

from dsv4.model import mhc, sinkhorn_kernel

DEV = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(not sinkhorn_kernel.available(torch.empty(0, device=DEV)),
                               reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")


def _pair(shape, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * spread).to(DEV).requires_grad_()
    return x, x.detach().clone().requires_grad_()


@runs_here
@pytest.mark.parametrize("shape", [(2, 37, 4, 4), (130, 4, 4), (5, 3, 3)])   # several programs, a ragged last
def test_kernel_equals_reference(shape):                                       # block, n not a power of two
    """Same doubly-stochastic matrices and the same gradient w.r.t. the logits (fp32, to rounding)."""
    x, xr = _pair(shape)
    y, yr = sinkhorn_kernel.sinkhorn(x, 20, 1e-6), mhc.sinkhorn(xr, 20, 1e-6)
    assert (y - yr).abs().max().item() < 1e-6
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    assert (x.grad - xr.grad).norm() / xr.grad.norm() < 1e-5
    # the gradient is not trivially small: rows of a doubly-stochastic matrix still respond to the logits
    assert xr.grad.abs().max() > 1e-3


@runs_here
def test_kernel_follows_iterations_and_eps():
    """Iteration count and eps reach the kernel: 1 iteration (softmax + one column pass) differs from 20, and
    each matches the reference at its own setting."""
    x, _ = _pair((8, 4, 4), seed=2, spread=5.0)
    with torch.no_grad():
        one, many = sinkhorn_kernel.sinkhorn(x, 1, 1e-6), sinkhorn_kernel.sinkhorn(x, 20, 1e-6)
        assert (one - mhc.sinkhorn(x, 1, 1e-6)).abs().max() < 1e-6
        assert (many - one).abs().max() > 1e-3
        big = sinkhorn_kernel.sinkhorn(x, 20, 0.1)
        assert (big - mhc.sinkhorn(x, 20, 0.1)).abs().max() < 1e-6


@pytest.mark.skipif(DEV != "cuda", reason="torch.compile of the custom op: CUDA")
def test_kernel_inside_torch_compile():
    """Traced into a compiled graph (as in the compiled mHC, decode step and blocks), forward and backward."""
    x, xr = _pair((64, 4, 4), seed=3)
    f = torch.compile(lambda t: sinkhorn_kernel.sinkhorn(t * 2.0, 20, 1e-6).square().sum(), fullgraph=True)
    f(x).backward()
    mhc.sinkhorn(xr * 2.0, 20, 1e-6).square().sum().backward()
    assert (x.grad - xr.grad).norm() / xr.grad.norm() < 1e-5


@pytest.mark.skipif(not triton_compiler(), reason="needs Triton's compiler (not its interpreter)")
def test_kernels_compile_for_hopper():
    """Both kernels compile for sm90 (no GPU needed). Triton's interpreter runs code the compiler rejects
    (e.g. a value of different shapes in the two branches of an if), so the tests above alone cannot tell."""
    consts = {"ITERS": 20, "EPS": 1e-6, "N": 4, "NP": 4, "B": 64}
    compile_for_hopper(sinkhorn_kernel._sinkhorn_fwd, consts, {"X": "fp32", "Y": "fp32"})
    compile_for_hopper(sinkhorn_kernel._sinkhorn_bwd, consts, {"X": "fp32", "DY": "fp32", "DX": "fp32"})
