"""The fused mHC expand step (`hc_expand_kernel`) equals `mhc.hc_expand`'s PyTorch ops, values and gradients.
Runs where Triton runs: on a CUDA machine, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1);
skipped elsewhere (CI's CPU build of torch has no Triton). The sm90 compile test needs only Triton's compiler."""
import pytest
import torch

from conftest import compile_for_hopper, model_equal_with_switch, rel_diff, triton_compiler

from dsv4.model import hc_expand_kernel, mhc
from dsv4.model.mhc import Fusion

DEV = "cuda" if torch.cuda.is_available() else "cpu"
runs_here = pytest.mark.skipif(not hc_expand_kernel.available(torch.empty(0, device=DEV)),
                               reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")


@runs_here
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2, 19, 4, 48)),    # ragged tokens and stream width
                                         (torch.float32, (1, 20, 3, 32)),    # n = 3: padded stream block
                                         (torch.bfloat16, (1, 37, 4, 64))])  # a bf16 model's streams
def test_expand_and_gradients_equal_reference(dtype, shape, monkeypatch):
    """h' and the gradients of y, h, post and comb equal the PyTorch function's. bf16 results are rounded once,
    the reference's too; Triton's interpreter rounds fp32 -> bf16 toward zero (a GPU to nearest), so bf16
    values may differ by one bf16 step. (The reference must not take the kernel itself, on by default under
    autograd: expand_kernel off for it.)"""
    monkeypatch.setattr(Fusion, "enabled", False)
    monkeypatch.setattr(Fusion, "expand_kernel", False)
    b, s, n, D = shape
    g = torch.Generator().manual_seed(s)
    y = torch.randn(b, s, D, generator=g).to(DEV, dtype)
    h = torch.randn(b, s, n, D, generator=g).to(DEV, dtype)
    post = (2 * torch.rand(b, s, n, generator=g)).to(DEV)
    comb = torch.rand(b, s, n, n, generator=g).to(DEV)
    ins = [t.requires_grad_() for t in (y, h, post, comb)]
    ref_in = [t.detach().clone().requires_grad_() for t in ins]
    got, ref = hc_expand_kernel.hc_expand(*ins), mhc.hc_expand(*ref_in)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    assert got.dtype == dtype and got.shape == h.shape
    assert rel_diff(got, ref) < tol
    up = torch.randn(h.shape, generator=g).to(DEV, dtype)
    got.backward(up)
    ref.backward(up)
    for a, r in zip(ins, ref_in):
        assert a.grad.dtype == a.dtype
        assert rel_diff(a.grad, r.grad) < (tol if a.dtype == dtype else 1e-5)
    # comb enters transposed (h'_k takes comb[j, k]): the other orientation would be far off
    assert rel_diff(mhc.hc_expand(y.detach(), h.detach(), post.detach(), comb.detach().transpose(-1, -2)),
                    ref.detach()) > 1e-2


def test_supported_only_for_float_streams():
    y, h = torch.empty(1, 2, 8), torch.empty(1, 2, 4, 8)
    assert not hc_expand_kernel.supported(y.half(), h.half())
    assert not hc_expand_kernel.supported(y, h[0])
    assert hc_expand_kernel.supported(y, h) == hc_expand_kernel.available(h)


@runs_here
def test_model_with_expand_kernel_equals_reference(monkeypatch):
    """Whole model: logits and every gradient equal with the kernel on and off (fp32), and the kernel really runs."""
    gref = model_equal_with_switch(monkeypatch, "expand_kernel", hc_expand_kernel, "hc_expand", DEV, seed=4, seq=19)
    assert any("hc_attn_fn" in n for n in gref)


@runs_here
def test_model_with_both_mhc_kernels_equals_reference(monkeypatch):
    """The pre and expand kernels together (the form training would run): whole model on/off."""
    from dsv4.model import hc_pre_kernel
    monkeypatch.setattr(Fusion, "pre_kernel", True)
    model_equal_with_switch(monkeypatch, "expand_kernel", hc_expand_kernel, "hc_expand", DEV, seed=5, seq=17)
    assert Fusion.pre_kernel and hc_pre_kernel.supported(torch.empty(1, 1, 4, 8, device=DEV), "mhc")


@pytest.mark.skipif(DEV != "cuda", reason="torch.compile of the custom op: CUDA")
def test_expand_kernel_inside_torch_compile(monkeypatch):
    """Traced into a compiled function, forward and backward, against the eager PyTorch function."""
    g = torch.Generator().manual_seed(6)
    y, h = torch.randn(2, 40, 64, generator=g).to(DEV), torch.randn(2, 40, 4, 64, generator=g).to(DEV)
    post, comb = torch.rand(2, 40, 4, generator=g).to(DEV), torch.rand(2, 40, 4, 4, generator=g).to(DEV)
    ins = [t.requires_grad_() for t in (y, h, post, comb)]
    ref_in = [t.detach().clone().requires_grad_() for t in ins]
    monkeypatch.setattr(Fusion, "expand_kernel", True)
    torch.compile(lambda *a: mhc.hc_expand(*a).square().sum(), fullgraph=True)(*ins).backward()
    monkeypatch.setattr(Fusion, "expand_kernel", False)
    mhc.hc_expand(*ref_in).square().sum().backward()
    for a, r in zip(ins, ref_in):
        assert rel_diff(a.grad, r.grad) < 1e-5


@pytest.mark.skipif(not triton_compiler(), reason="needs Triton's compiler (not its interpreter)")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_expand_kernels_compile_for_hopper(dtype):
    """Both kernels compile for sm90 (no GPU needed) at the bench model's size (n 4, D 1024)."""
    k = hc_expand_kernel
    consts = dict(D=1024, N=4, NP=4, BM=k.Config.rows, BD=k.Config.cols)
    ptr = {n: "fp32" for n in ("POST", "COMB", "DPOST", "DCOMB")}
    ptr.update({n: dtype for n in ("Y", "H", "OUT", "G", "DY", "DH")})
    for kernel in (k._expand_fwd, k._expand_bwd):
        shared = compile_for_hopper(kernel, consts, ptr, num_warps=k.Config.warps)
        assert shared <= 227 * 1024, (kernel, shared)
