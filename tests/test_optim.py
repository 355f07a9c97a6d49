"""Muon + AdamW (dsv4.train.optim): Newton–Schulz accuracy, the parameter split, update size, state round
trip, and FSDP2 (DTensor) parameters on gloo giving the same step as a single process."""
import io
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from dsv4.train.optim import build_optimizer, newton_schulz, param_kind
from conftest import leave_gloo_worker, random_tiny


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (64, 64), (4, 48, 96)])
def test_hybrid_newton_schulz_lands_singular_values_at_one(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.99 and s.max() < 1.01, (s.min(), s.max())     # documented band after 8 + 2 steps
    quintic_only = torch.linalg.svdvals(newton_schulz(g, steps=(8, 0)))
    assert (quintic_only - 1).abs().max() > 0.1                       # the 2 stabilising steps are what tightens it


def test_newton_schulz_ill_conditioned_and_bf16():
    torch.manual_seed(1)
    u, _, v = torch.linalg.svd(torch.randn(64, 64))
    g = u @ torch.diag(torch.logspace(0, -3, 64)) @ v.T              # condition number 1000
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.99 and s.max() < 1.01
    s16 = torch.linalg.svdvals(newton_schulz(torch.randn(96, 64), dtype=torch.bfloat16).float())
    assert s16.min() > 0.98 and s16.max() < 1.02
    # orthogonalisation keeps the singular vectors: U Vᵀ of g
    assert torch.allclose(newton_schulz(g), u @ v.T, atol=2e-2)


def test_param_split():
    model = random_tiny()
    opt = build_optimizer(model, lr=1e-3)
    kinds = {n: g["kind"] for g in opt.param_groups for n in g["names"]}
    for name in ("layers.1.attn.wq_a.weight", "layers.1.attn.wo_a.weight", "layers.1.attn.compressor.wkv.weight",
                 "layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.weights_proj.weight",
                 "layers.2.ffn.experts.3.w2.weight", "layers.0.ffn.shared_experts.w1.weight",
                 "layers.2.ffn.gate.weight", "mtp.0.e_proj.weight"):
        assert kinds[name] == "muon", name
    for name in ("embed.weight", "head.weight", "layers.0.hc_attn_fn", "hc_head_fn", "mtp.0.hc_head_fn",
                 "layers.1.attn.compressor.ape"):
        assert kinds[name] == "adamw", name
    for name in ("layers.0.attn_norm.weight", "layers.0.attn.attn_sink", "layers.0.hc_ffn_base",
                 "layers.0.hc_ffn_scale", "norm.weight", "hc_head_scale"):
        assert kinds[name] == "adamw_nodecay", name
    assert "layers.2.ffn.gate.bias" not in kinds                       # moved by bias balancing, not by gradients
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(kinds) == n_trainable
    wo_a = opt.param_groups[0]["names"].index("layers.1.attn.wo_a.weight")
    assert opt.param_groups[0]["blocks"][wo_a] == model.cfg.o_groups
    assert all(g["kind"] != "muon" for g in build_optimizer(model, 1e-3, muon=False).param_groups)
    assert param_kind("x.weight", torch.zeros(3)) == "adamw_nodecay"


def test_muon_update_rms_matches_adamw_scale():
    """One step from zero momentum, no decay: the update's RMS is 0.18·lr for any shape (per wo_a group too)."""
    torch.manual_seed(0)
    lr = 1e-2
    for shape in [(32, 128), (128, 16)]:
        lin = torch.nn.Linear(shape[1], shape[0], bias=False)
        w0 = lin.weight.detach().clone()
        lin.weight.grad = torch.randn(shape)
        build_optimizer(lin, lr=lr, weight_decay=0.0).step()
        rms = (lin.weight.detach() - w0).square().mean().sqrt()
        assert abs(rms / lr - 0.18) < 0.18 * 0.01, (shape, rms / lr)

    model = random_tiny()
    w = model.layers[1].attn.wo_a.weight
    w0 = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p is w else None
    build_optimizer(model, lr=lr, weight_decay=0.0).step()
    g = model.cfg.o_groups
    upd = ((w0 - w.detach()) / lr).view(g, -1, w.shape[1])               # [g, o_lora, in]
    for blk in upd:                                                      # each group orthogonal on its own
        s = torch.linalg.svdvals(blk / (0.18 * max(blk.shape) ** 0.5))
        assert s.min() > 0.98 and s.max() < 1.02


def _train_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=g)
    for _ in range(n):
        opt.zero_grad()
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()


def test_state_dict_round_trip_reproduces_next_step_exactly():
    a = random_tiny().train()
    opt_a = build_optimizer(a, lr=3e-3)
    _train_steps(a, opt_a, 3, seed=0)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)

    b = random_tiny(seed=7).train()                                   # different weights, then restored
    b.load_state_dict(saved["model"])
    opt_b = build_optimizer(b, lr=123.0)                              # hyper-parameters come from the state
    opt_b.load_state_dict(saved["opt"])
    assert opt_b.param_groups[0]["lr"] == 3e-3
    _train_steps(a, opt_a, 1, seed=5)
    _train_steps(b, opt_b, 1, seed=5)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_state_dict_mismatch_names_the_parameter():
    from dsv4.train.optim import OptimError
    a = random_tiny()
    opt = build_optimizer(a, 1e-3)
    _train_steps(a.train(), opt, 1, seed=0)
    sd = opt.state_dict()
    sd["state"]["embed.weight"]["exp_avg"] = torch.zeros(3, 3)
    with pytest.raises(OptimError, match="embed.weight"):
        build_optimizer(random_tiny(), 1e-3).load_state_dict(sd)


# ---------------------------------------------------------------------------------------- FSDP2 on gloo
def _toy(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 7, bias=False))   # odd rows: uneven shards


def _grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(5, 6, generator=g), torch.randn(5, generator=g), torch.randn(7, 5, generator=g)]


def _fsdp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,))                       # CPU even where a GPU exists
    m = _toy()
    fully_shard(m[0], mesh=mesh)
    fully_shard(m, mesh=mesh)
    opt = build_optimizer(m, lr=0.05, weight_decay=0.1)
    assert type(m[0].weight).__name__ == "DTensor"
    for step in range(3):
        for p, g in zip(m.parameters(), _grads(step)):
            from torch.distributed.tensor import distribute_tensor
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
    full = [p.full_tensor() for p in m.parameters()]
    sd = opt.state_dict()                                              # local shards, by name
    local_rows = sd["state"]["0.weight"]["momentum"].shape[0]
    if rank == 0:
        torch.save({"params": full, "rows": local_rows}, out_file)
    leave_gloo_worker()


def test_muon_on_fsdp2_dtensors_matches_single_process():
    ref = _toy()
    opt = build_optimizer(ref, lr=0.05, weight_decay=0.1)
    for step in range(3):
        for p, g in zip(ref.parameters(), _grads(step)):
            p.grad = g.clone()
        opt.step()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.pt")
        mp.spawn(_fsdp_worker, args=(2, os.path.join(d, "init"), out), nprocs=2)
        got = torch.load(out)
    assert got["rows"] == 3                                             # rank 0 holds 3 of the 5 rows
    for a, b in zip(ref.parameters(), got["params"]):
        assert torch.allclose(a.detach(), b, atol=1e-6, rtol=1e-5)
