"""The grouped experts' data movement (`model/expert_dispatch.py`) equals the plain PyTorch forms it replaces,
values and gradients, eager and compiled; and MoE's two dispatch forms give the same layer."""
import pytest
import torch

from conftest import random_tiny, rel_diff
from dsv4.model.expert_dispatch import combine_rows, gather_rows, inverse_permutation, stack_experts
from dsv4.model.moe import MoE


def _weights(E=5, I=6, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()   # noqa: E731
    return [mk(I, D) for _ in range(E)], [mk(I, D) for _ in range(E)], [mk(D, I) for _ in range(E)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stack_experts_equals_stack_and_cat(dtype):
    """Same tensors as stack/cat, and each expert's gradient is its slot of the stacked gradient, in the weights'
    own dtype also when the stack is in another (fp64 weights stacked as fp32 here)."""
    w1, w3, w2 = _weights()
    w13, w2s = stack_experts(w1, w3, w2, dtype)
    assert w13.dtype == w2s.dtype == dtype
    assert torch.equal(w13, torch.cat([torch.stack(w1), torch.stack(w3)], 1).to(dtype))
    assert torch.equal(w2s, torch.stack(w2).to(dtype))
    g13, g2 = torch.randn_like(w13), torch.randn_like(w2s)
    grads = torch.autograd.grad((w13 * g13).sum() + (w2s * g2).sum(), [*w1, *w3, *w2])
    I = w1[0].shape[0]
    want = [*g13[:, :I].unbind(0), *g13[:, I:].unbind(0), *g2.unbind(0)]
    for got, ref, w in zip(grads, want, [*w1, *w3, *w2]):
        assert got.dtype == w.dtype and torch.equal(got, ref.to(w.dtype))


def test_gather_and_combine_equal_indexing_and_index_add():
    """x[order // k] and index_add over the tokens, values and gradients (fp64: equal to rounding)."""
    T, k, D = 11, 3, 7
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(6, generator=g)[:k] for _ in range(T)])       # distinct experts per token
    order = idx.flatten().argsort(stable=True)
    inv = inverse_permutation(order)
    assert torch.equal(order[inv], torch.arange(T * k)) and torch.equal(inv[order], torch.arange(T * k))
    x = torch.randn(T, D, dtype=torch.float64, generator=g, requires_grad=True)
    out = torch.randn(T * k, D, dtype=torch.float64, generator=g, requires_grad=True)
    gx, gy = torch.randn(T * k, D, dtype=torch.float64, generator=g), torch.randn(T, D, dtype=torch.float64,
                                                                                    generator=g)

    def both(gather, combine):
        xs, y = gather(), combine()
        return (xs, y, *torch.autograd.grad((xs * gx).sum() + (y * gy).sum(), [x, out]))

    new = both(lambda: gather_rows(x, order, inv, k), lambda: combine_rows(out, order, inv, k))
    ref = both(lambda: x[order // k],
               lambda: torch.zeros(T, D, dtype=torch.float64).index_add_(0, order // k, out))
    for a, b in zip(new, ref):
        assert rel_diff(a, b) < 1e-15


def _moe_run(moe, fn, x):
    """y, dL/dx and every parameter's gradient of one MoE call under a fixed random linear loss."""
    moe.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    y = fn(xx, None)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), xx.grad, {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}


def _assert_close(got, ref, tol):
    assert rel_diff(got[0], ref[0]) < tol and rel_diff(got[1], ref[1]) < tol
    assert got[2].keys() == ref[2].keys()
    for n, g in ref[2].items():
        assert rel_diff(got[2][n], g) < tol, n


def test_moe_dispatch_forms_equal(monkeypatch):
    """One MoE layer of the tiny model through the grouped GEMMs in fp32: 'gather' = 'index_add' in the output
    and every gradient (the experts' weights and the layer's input among them)."""
    monkeypatch.setattr(MoE, "impl", "grouped")
    moe = random_tiny(5).layers[3].ffn.train()
    x = torch.randn(2, 24, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(MoE, "dispatch", "index_add")
    ref = _moe_run(moe, moe, x)
    monkeypatch.setattr(MoE, "dispatch", "gather")
    got = _moe_run(moe, moe, x)
    assert sum(n.startswith("experts.") for n in got[2]) > moe.n_experts       # the routed experts' gradients
    _assert_close(got, ref, 1e-5)
    monkeypatch.setattr(MoE, "split_first", False)                          # cast before the split: same values
    _assert_close(_moe_run(moe, moe, x), got, 1e-6)


def test_moe_gather_dispatch_compiles_to_one_graph(monkeypatch):
    """The same layer in bf16 (what the grouped GEMMs take when traced) under torch.compile with fullgraph=True:
    the custom op and the two autograd Functions trace into one graph and give eager's values and gradients."""
    monkeypatch.setattr(MoE, "impl", "grouped")
    moe = random_tiny(5).layers[3].ffn.train().to(torch.bfloat16)
    x = torch.randn(2, 24, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(3)).bfloat16()
    ref = _moe_run(moe, moe, x)
    torch._dynamo.reset()
    try:
        got = _moe_run(moe, torch.compile(moe.forward, fullgraph=True, backend="aot_eager"), x)
    finally:
        torch._dynamo.reset()
    _assert_close(got, ref, 1e-2)
