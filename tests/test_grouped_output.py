"""grouped_output.py (the attention's output step under autograd: inverse RoPE + grouped wo_a without a pass
over the whole output) equals the plain form of Attention._output: values and gradients, alone and in the
whole tiny model."""
import pytest
import torch

from conftest import compile_for_hopper, random_tiny, rel_diff, triton_compiler
from dsv4.model.attention import Attention
from dsv4.model.grouped_output import grouped_output, plain_output as _plain
from dsv4.model.layers import Rotary


@pytest.mark.parametrize("b,heads,groups", [(1, 4, 2), (2, 8, 4), (3, 4, 1)])
def test_values_and_gradients_equal_the_plain_form(b, heads, groups):
    g = torch.Generator().manual_seed(b)
    L, d, r, n_out = 7, 16, 8, 5
    rope = Rotary(r, 10000.0)
    cos, sin = rope.angles(torch.arange(100, 100 + L))                      # large angles: rotations that matter
    o = torch.randn(b, L, heads, d, generator=g, requires_grad=True)
    w = torch.randn(groups, n_out, heads // groups * d, generator=g, requires_grad=True)
    dy = torch.randn(b, L, groups * n_out, generator=g)
    ref = _plain(o, w, cos, sin)
    ref_g = torch.autograd.grad(ref, (o, w), dy)
    got = grouped_output(o, w, cos, sin)
    got_g = torch.autograd.grad(got, (o, w), dy)
    assert got.shape == ref.shape
    assert rel_diff(got, ref) < 1e-6
    for a, e in zip(got_g, ref_g):
        assert rel_diff(a, e) < 1e-6
    # the rope channels carry the rotation: without it the result would be off by far more than rounding
    assert rel_diff(got, torch.einsum("blgi,gri->blgr", o.reshape(b, L, groups, -1), w).flatten(2)) > 1e-2


def test_under_autocast_as_the_plain_form():
    """fp32 o and w under bf16 autocast (as `dsv4 train` runs): bf16 result and fp32 gradients, as the plain
    form's autocast einsum gives them, within bf16 rounding."""
    g = torch.Generator().manual_seed(9)
    cos, sin = Rotary(8, 10000.0).angles(torch.arange(50, 56))
    o = torch.randn(2, 6, 4, 16, generator=g, requires_grad=True)
    w = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    dy = torch.randn(2, 6, 10, generator=g)
    outs = []
    for fn in (_plain, grouped_output):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(o, w, cos, sin)
        outs.append((y, torch.autograd.grad(y, (o, w), dy.to(y.dtype))))
    (ref, ref_g), (got, got_g) = outs
    assert got.dtype == ref.dtype == torch.bfloat16
    assert rel_diff(got, ref) < 1e-2
    for a, e in zip(got_g, ref_g):
        assert a.dtype == torch.float32 and rel_diff(a, e) < 1e-2


def test_whole_model_equal_with_and_without(monkeypatch):
    """Logits and every gradient of the tiny model (fp32; on CUDA where there is one) with Attention.fused_output
    on vs off; the op really runs (a failing stand-in surfaces). Within 1e-4, or 10× what two runs without it
    differ by (on CUDA the attention backward's atomic adds make runs differ: embed.weight by 1.4e-4 once on an
    H200); a wrong rotation or projection would be off by O(1)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = random_tiny(3).float().to(device).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 29), generator=torch.Generator().manual_seed(3)).to(device)
    outs = []
    for mode in ("", "", "always"):
        monkeypatch.setattr(Attention, "fused_output", mode)
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.logsumexp(-1).mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, gref), (again, gagain), (got, ggot) = outs
    assert rel_diff(got, ref) < max(1e-5, 10 * rel_diff(again, ref)) and gref.keys() == ggot.keys()
    for n, e in gref.items():
        assert rel_diff(ggot[n], e) < max(1e-4, 10 * rel_diff(gagain[n], e)), n

    import dsv4.model.attention as attention

    def stand_in(*args):
        raise RuntimeError("grouped_output ran")
    monkeypatch.setattr(attention, "grouped_output", stand_in)
    with pytest.raises(RuntimeError, match="grouped_output ran"):
        model(ids)
    with torch.no_grad():                                                 # inference keeps the plain form
        model(ids)


@pytest.mark.skipif(not triton_compiler(), reason="needs Triton's compiler (not its interpreter)")
def test_rope_kernel_compiles_for_hopper():
    """The rope kernel compiles for sm90 at V4's sizes (64 of 512 channels, 64 heads), both forms, bf16."""
    from dsv4.model import grouped_output as go
    for delta in (True, False):
        shared = compile_for_hopper(go._rope_kernel, {"H": 64, "D": 512, "R": 64, "SIGN": -1.0, "DELTA": delta,
                                                      "ROWS": go.ROWS},
                                    {"X": "bf16", "COS": "fp32", "SIN": "fp32", "OUT": "bf16"}, num_warps=4)
        assert shared <= 227 * 1024
