"""The fused sparse-MQA path (FlexAttention, sparse_attention.py) computes the reference attention: window band,
HCA's visible entries, CSA's picks and the sinks. On the CPU FlexAttention runs its unfused eager form (no
backward there), which checks the masks and the sink algebra; on CUDA the compiled kernel runs, forward and
backward."""
import pytest
import torch

from conftest import compile_for_hopper, random_tiny, rel_diff, triton_compiler
from dsv4.model import sparse_attention
from dsv4.model.attention import Attention

CUDA = torch.cuda.is_available()


@pytest.fixture
def flex_anywhere(monkeypatch):
    """Let the fused path run on this machine: on the CPU through FlexAttention's eager implementation."""
    if not CUDA:
        from torch.nn.attention import flex_attention as fa
        monkeypatch.setattr(sparse_attention, "_flex", fa.flex_attention)
        monkeypatch.setattr(sparse_attention, "available", lambda q: True)
    yield "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("forward", ["flex", "triton", "triton_blocked"])
@pytest.mark.parametrize("seq", [37, 90, 300])
def test_fused_forward_equals_reference(flex_anywhere, monkeypatch, seq, forward):
    """Logits of the whole model (sliding, CSA with binding top-k, HCA layers; random sinks) agree in fp32. 300
    tokens span several query blocks and key blocks, and more compressed entries than a block. 'triton': the
    Triton forward (Forward.triton; one program per token and group of heads over exactly its keys, online
    softmax, then the sink) instead of FlexAttention, checked to have run in every layer. 'triton_blocked': the
    same with 4 tokens per program (a block that does not divide the lengths; CSA layers in two launches, the
    picks continuing from the window band's partial state)."""
    monkeypatch.setattr(sparse_attention.Forward, "triton", forward != "flex")
    if forward != "flex":
        if not _triton_here():
            pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
        calls = _count_calls(monkeypatch)
        from dsv4.model import sparse_attention_fwd
        monkeypatch.setattr(sparse_attention_fwd.Config, "token_block", 4 if forward == "triton_blocked" else 1)
    model = random_tiny(4).float().to(flex_anywhere)
    assert model.cfg.index_topk < seq // 4 and {0, 4}.issubset(model.cfg.compress_ratios)
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seq)).to(flex_anywhere)
    with torch.no_grad():
        monkeypatch.setattr(Attention, "fused", False)
        ref = model(ids)
        monkeypatch.setattr(Attention, "fused", True)
        out = model(ids)
    if forward != "flex":
        assert len(calls) == model.cfg.num_hidden_layers
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def _reference_and_fused_grads(model, ids, monkeypatch) -> list[dict]:
    """All parameter gradients of one loss, reference attention then fused; both give the same parameters."""
    grads = []
    for fused in (False, True):
        monkeypatch.setattr(Attention, "fused", fused)
        model.zero_grad(set_to_none=True)
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    return grads


@pytest.mark.skipif(not CUDA, reason="FlexAttention has no backward on the CPU")
def test_fused_gradients_equal_reference(monkeypatch):
    """FlexAttention's own backward (Backward.triton off) gives the reference gradients."""
    monkeypatch.setattr(Attention, "fused_training", True)
    monkeypatch.setattr(sparse_attention.Backward, "triton", False)
    monkeypatch.setattr(sparse_attention.Forward, "triton", False)
    model = random_tiny(5).float().cuda().train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()
    grads = _reference_and_fused_grads(model, ids, monkeypatch)
    # all gradients together to 1e-4; each tensor to 1e-3: FlexAttention sums in its own order, and a gradient
    # summed over every token with cancellation moves most (seen on CUDA: layers.0.hc_attn_scale at 4.0e-4,
    # embed.weight at 1.04e-4)
    ref, got = (torch.cat([g[n].flatten() for n in grads[0]]) for g in grads)
    assert float((got - ref).norm()) <= 1e-4 * float(ref.norm())
    for n, g in grads[0].items():
        assert float((grads[1][n] - g).norm()) <= 1e-3 * float(g.norm()) + 1e-9, n
    assert any("attn_sink" in n for n in grads[0])


@pytest.mark.parametrize("window_dkv,pick_dkv,hca_dkv,heads", [
    ("keys", "gemm", "gemm", 4), ("atomic", "atomic", "atomic", 4), ("keys", "atomic", "gemm", 32),
    ("atomic", "gemm", "atomic", 32)])
def test_triton_backward_equals_reference(flex_anywhere, monkeypatch, window_dkv, pick_dkv, hca_dkv, heads):
    """The Triton backward (per token and group of 16 heads over exactly its keys; the CSA and HCA entries' dK
    by GEMMs over each token's coefficients or by atomic adds; the window's dKV per key block or by atomic adds) gives the
    reference path's gradients: every parameter, sinks included. 4 heads fill part of one group; 32 heads are two
    groups, as V4's 64 / 128 heads are several. (Groups are ≥ 16 heads: a Triton dot needs 16 rows; the
    interpreter would also take fewer, a GPU compile does not.) On the CPU it runs under Triton's interpreter
    (fp32)."""
    from dsv4.model import sparse_attention_bwd
    if not sparse_attention_bwd.available(torch.empty(1, 16, device=flex_anywhere)):
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    monkeypatch.setattr(sparse_attention_bwd.Config, "window_dkv", window_dkv)
    monkeypatch.setattr(sparse_attention_bwd.Config, "pick_dkv", pick_dkv)
    monkeypatch.setattr(sparse_attention_bwd.Config, "hca_dkv", hca_dkv)
    monkeypatch.setattr(sparse_attention_bwd.Config, "gemm_chunk_elems", 1 << 12)   # several token chunks
    used = []                                           # which form computed each HCA layer's entries' dK
    real_hca = sparse_attention_bwd.hca_dcomp
    monkeypatch.setattr(sparse_attention_bwd, "hca_dcomp", lambda *a: used.append(1) or real_hca(*a))
    monkeypatch.setattr(Attention, "fused_training", True)
    monkeypatch.setattr(sparse_attention.Backward, "triton", True)
    monkeypatch.setattr(sparse_attention.Forward, "triton", False)      # (both Triton kernels: test below)
    model = random_tiny(6, num_attention_heads=heads).float().to(flex_anywhere).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 90), generator=torch.Generator().manual_seed(3)).to(flex_anywhere)
    grads = _reference_and_fused_grads(model, ids, monkeypatch)
    for n, g in grads[0].items():     # 3e-4: fp32 atomic adds in another order (seen on CUDA: 1.04e-4, embed.weight)
        assert float((grads[1][n] - g).norm()) <= 3e-4 * float(g.norm()) + 1e-9, n
    assert bool(used) == (hca_dkv == "gemm")           # the HCA layer (ratio 16) took the form asked for


def test_kernel_failure_falls_back_to_reference(flex_anywhere, monkeypatch):
    """Where the fused kernel cannot compile (say, too little shared memory for head_dim 512), the model warns
    once, says why, and computes the reference result instead of failing."""
    model = random_tiny(4).float().to(flex_anywhere)
    ids = torch.randint(0, model.cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0)).to(flex_anywhere)

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    monkeypatch.setattr(sparse_attention, "_forward", broken)
    monkeypatch.setattr(sparse_attention.Forward, "triton", False)        # the FlexAttention path fails here
    monkeypatch.setattr(sparse_attention.Unavailable, "reason", None)
    with torch.no_grad():
        monkeypatch.setattr(Attention, "fused", False)
        ref = model(ids)
        monkeypatch.setattr(Attention, "fused", True)
        with pytest.warns(RuntimeWarning, match="shared memory") as rec:
            out = model(ids)
    assert torch.equal(out, ref)
    assert len(rec) == 1 and "shared memory" in sparse_attention.Unavailable.reason


def test_cached_kernel_failure_falls_back_to_reference(monkeypatch):
    """Prefill chunks through the KV cache take the same way out as one-pass calls: where the Triton forward
    cannot run, one warning says why and the chunks get the reference path's logits."""
    from dsv4.model import sparse_attention_fwd
    m = random_tiny(2).float()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(5))

    def chunked():
        caches = m.new_caches(1, 32)
        return torch.cat([m(ids[:, c:c + 10], c, caches) for c in range(0, 30, 10)], 1)

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")
    with torch.no_grad():
        monkeypatch.setattr(Attention, "fused_cached", False)
        ref = chunked()
        monkeypatch.setattr(Attention, "fused_cached", True)
        monkeypatch.setattr(sparse_attention_fwd, "available", lambda q: True)
        monkeypatch.setattr(sparse_attention_fwd, "forward", broken)
        monkeypatch.setattr(sparse_attention.Unavailable, "reason", None)
        with pytest.warns(RuntimeWarning, match="shared memory") as rec:
            out = chunked()
    assert torch.equal(out, ref)
    assert len(rec) == 1 and "shared memory" in sparse_attention.Unavailable.reason


@pytest.mark.parametrize("scatter", ["index", "triton"])
@pytest.mark.parametrize("chunk_elems", [1 << 27, 1000, 1])
def test_pick_dcomp_sums_each_picks_contribution(chunk_elems, scatter, monkeypatch):
    """pick_dcomp's dense GEMMs give each compressed entry Σ over the (token, pick) pairs that chose it of the
    pick's coefficients times that token's q and dO rows (written out as loops here), with −1 picks ignored;
    in one chunk, in chunks of 4 tokens and of one token; the coefficients scattered by ATen's index_put or by
    the Triton kernel (on CUDA, or on the CPU under Triton's interpreter). 70 picks per token: the kernel's
    walk over them takes two steps."""
    from dsv4.model import sparse_attention_bwd as sab
    from dsv4.model.indexer_kernel import available
    device = "cuda" if CUDA else "cpu"
    if scatter == "triton" and not available(torch.empty(1, device=device)):
        pytest.skip("Triton does not run here (CPU: set TRITON_INTERPRET=1)")
    monkeypatch.setattr(sab.Config, "gemm_chunk_elems", chunk_elems)
    monkeypatch.setattr(sab.Config, "pick_scatter", scatter)
    g = torch.Generator().manual_seed(0)
    b, L, k, H, d, ratio = 2, 300, 70, 3, 8, 4
    sel = torch.full((b, L, k), -1)
    for i in range(b):
        for t in range(L):
            m = min(k, (t + 1) // ratio)
            sel[i, t, :m] = torch.randperm((t + 1) // ratio, generator=g)[:m]
    coef, q, do = (torch.randn(*shape, generator=g) for shape in ((b, L, k, 2 * H), (b, L, H, d), (b, L, H, d)))
    ref = torch.zeros(b, L // ratio, d)
    for i, t, j in sel.ge(0).nonzero().tolist():
        ref[i, sel[i, t, j]] += coef[i, t, j, :H] @ q[i, t] + coef[i, t, j, H:] @ do[i, t]
    got = sab.pick_dcomp(*(x.to(device) for x in (coef, sel, q, do)), L // ratio, ratio).cpu()
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert (ref.abs().sum(-1) > 0).float().mean() > 0.9 and (sel == -1).any()   # most entries picked; some empty


@pytest.mark.skipif(not triton_compiler(), reason="needs Triton's compiler (not its interpreter)")
@pytest.mark.parametrize("heads", [16, 64, 128])
def test_triton_backward_fits_hopper_at_v4_head_counts(heads):
    """Both backward kernels compile for sm90 at head_dim 512 with V4's head counts and stay within an H100's
    227 KB of shared memory per program (holding all 64 heads of a token at once needed ~290 KB)."""
    from dsv4.model import sparse_attention_bwd as sab
    ptr = {n: "bf16" for n in ("Q", "KV", "COMP", "O", "DO", "DQ")}
    ptr.update({n: "fp32" for n in ("LSE", "SINK", "DKV", "DCOMP", "DSINK", "DELTA")}, SEL="i32", COEF="bf16")
    common = {"H": heads, "HG": sab.Config.head_group, "D": 512, "IEEE": False}
    for mode in (0, 1, 2):                        # window only, HCA entries, CSA picks
        for window_dkv, pick_coef in ((False, mode != 0), (True, False)):     # coefficients: CSA and HCA
            shared = compile_for_hopper(sab._bwd_kernel, {**common, "BN": sab.walk_block(mode), "MODE": mode,
                                                          "WINDOW_DKV": window_dkv, "PICK_COEF": pick_coef},
                                        ptr, floats=("scale",), num_warps=sab.Config.warps)
            assert shared <= 227 * 1024, (mode, window_dkv, shared)
    shared = compile_for_hopper(sab._dkv_window_kernel, {**common, "BK": sab.Config.key_block,
                                                         "TB": sab.Config.token_block}, ptr, floats=("scale",),
                                num_warps=sab.Config.window_warps)
    assert shared <= 227 * 1024, shared


# ---------------------------------------------------------------------------------------- Triton forward
def _triton_here() -> bool:
    from dsv4.model import sparse_attention_fwd
    return sparse_attention_fwd.available(torch.empty(1, 16, device="cuda" if CUDA else "cpu"))


def _count_calls(monkeypatch) -> list:
    """Wrap sparse_attention_fwd.forward so a test can see that the kernel ran (not a fallback)."""
    from dsv4.model import sparse_attention_fwd
    calls, real = [], sparse_attention_fwd.forward

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(sparse_attention_fwd, "forward", counted)
    return calls


@pytest.mark.parametrize("token_block", [1, 4])
def test_triton_forward_through_the_cache_equals_reference(monkeypatch, token_block):
    """Prefill in chunks through the KV cache (Attention.fused_cached): each chunk's queries see the cached tail
    of earlier raw KV (raw_start > 0), the compressed entries of all earlier chunks and their CSA picks; logits
    equal the reference path's chunk by chunk (fp32, two different sequences in the batch), with one token per
    program and with blocks of 4 (10-token chunks: a partial last block)."""
    if not _triton_here():
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    from dsv4.model import sparse_attention_fwd
    monkeypatch.setattr(sparse_attention_fwd.Config, "token_block", token_block)
    dev = "cuda" if CUDA else "cpu"
    calls = _count_calls(monkeypatch)
    m = random_tiny(2).float().to(dev)
    ids = torch.randint(0, m.cfg.vocab_size, (2, 77), generator=torch.Generator().manual_seed(4)).to(dev)
    outs = {}
    with torch.no_grad():
        for fused in (False, True):
            monkeypatch.setattr(Attention, "fused_cached", fused)
            caches = m.new_caches(2, 80)
            outs[fused] = torch.cat([m(ids[:, c:c + 10], c, caches) for c in range(0, 77, 10)], 1)
    assert len(calls) == 8 * m.cfg.num_hidden_layers                     # every chunk, every layer
    ref = outs[False]
    assert float((outs[True] - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.skipif(not triton_compiler(), reason="needs Triton's compiler (not its interpreter)")
@pytest.mark.parametrize("heads", [16, 64, 128])
def test_triton_forward_fits_hopper_at_v4_head_counts(heads):
    """The forward kernel compiles for sm90 at head_dim 512 with V4's head counts, within an H100's shared
    memory per program, for each key layout (window only, HCA, CSA)."""
    from dsv4.model import sparse_attention_fwd as saf
    ptr = {n: "bf16" for n in ("Q", "RAW", "COMP", "O")}
    ptr.update({"SINK": "fp32", "LSE": "fp32", "SEL": "i32"})
    ptr.update({"PART": "fp32", "PLSE": "fp32"})
    tb = saf.Config.token_block
    # (token block, MODE, WINDOW, INIT, FINAL): the launches `forward` makes, at one token per program and at
    # Config.token_block
    launches = {(1, mode, True, False, True) for mode in (0, 1, 2)} | {(tb, 0, True, False, True),
                                                                       (tb, 1, True, False, True)}
    if tb > 1:
        launches |= {(tb, 0, True, False, False), (1, 2, False, True, True)}
    for tb_, mode, window, init, final in sorted(launches):
        shared = compile_for_hopper(saf._fwd_kernel, {"H": heads, "HG": saf.Config.head_group, "TB": tb_, "D": 512,
                                                      "BN": saf.Config.key_block, "MODE": mode, "WINDOW": window,
                                                      "INIT": init, "FINAL": final, "IEEE": False},
                                    ptr, floats=("scale",),
                                    num_warps=saf.Config.warps if tb_ == 1 else saf.Config.block_warps)
        assert shared <= 227 * 1024, (tb_, mode, shared)


def _triton_training(device: str, monkeypatch, as_op: bool) -> None:
    """Both Triton kernels for training (skip where Triton does not run); as_op: as the custom ops."""
    from dsv4.model import sparse_attention_bwd
    if not (_triton_here() and sparse_attention_bwd.available(torch.empty(1, 16, device=device))):
        pytest.skip("needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")
    monkeypatch.setattr(sparse_attention.Forward, "triton", True)
    monkeypatch.setattr(sparse_attention.Backward, "triton", True)
    monkeypatch.setattr(sparse_attention.AsOp, "enabled", as_op)
    monkeypatch.setattr(Attention, "fused_training", True)


@pytest.mark.parametrize("as_op", [False, True])
def test_triton_forward_and_backward_give_reference_gradients(flex_anywhere, monkeypatch, as_op):
    """Training with both Triton kernels (Forward.triton: the forward's output and log-denominator feed the
    backward): every parameter gradient equals the reference path's (fp32). as_op: through the custom ops
    (sparse_attention.AsOp), not the autograd Function (made to fail here)."""
    _triton_training(flex_anywhere, monkeypatch, as_op)
    if as_op:
        monkeypatch.setattr(sparse_attention, "_sparse_mqa", None)       # calling it would raise
    calls = _count_calls(monkeypatch)
    model = random_tiny(6).float().to(flex_anywhere).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 90), generator=torch.Generator().manual_seed(3)).to(flex_anywhere)
    grads = _reference_and_fused_grads(model, ids, monkeypatch)
    assert len(calls) == model.cfg.num_hidden_layers
    for n, g in grads[0].items():     # 3e-4 as for the Triton backward after FlexAttention's forward
        assert float((grads[1][n] - g).norm()) <= 3e-4 * float(g.norm()) + 1e-9, n


def test_without_the_triton_backward_gradients_still_flow(flex_anywhere, monkeypatch):
    """Where the Triton backward cannot compile (on the H100: fp32 at head_dim 512, out of shared memory), a call
    that needs gradients must not run the Triton forward — a plain kernel, whose output carries no gradient back
    (seen on the H100: an fp32 model's attention projections got none) — but FlexAttention's differentiable
    forward. On CUDA every parameter gradient then equals the reference path's."""
    from dsv4.model import sparse_attention_fwd

    def triton_forward(*args, **kwargs):
        raise AssertionError("the Triton forward ran where gradients are needed")
    monkeypatch.setattr(sparse_attention, "_backward_ready", lambda q: False)
    monkeypatch.setattr(sparse_attention.Forward, "triton", True)
    monkeypatch.setattr(sparse_attention_fwd, "available", lambda q: True)
    monkeypatch.setattr(sparse_attention_fwd, "forward", triton_forward)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 40, 16, 32, generator=g).to(flex_anywhere).requires_grad_()
    kv, comp = torch.randn(1, 40, 32, generator=g).to(flex_anywhere), torch.randn(1, 10, 32, generator=g).to(flex_anywhere)
    if not CUDA:         # FlexAttention refuses inputs that need gradients on the CPU: a differentiable stand-in
        monkeypatch.setattr(sparse_attention, "_forward",
                            lambda q, *a: (q * 2, torch.zeros(q.shape[:3], device=q.device)))
    out = sparse_attention.attend(q, kv, comp, None, torch.zeros(16, device=flex_anywhere), 8, 4)
    assert out.requires_grad and out.shape == q.shape
    if CUDA:
        monkeypatch.setattr(Attention, "fused_training", True)
        model = random_tiny(6).float().cuda().train()
        ids = torch.randint(0, model.cfg.vocab_size, (2, 90), generator=torch.Generator().manual_seed(3)).cuda()
        grads = _reference_and_fused_grads(model, ids, monkeypatch)
        for n, ref in grads[0].items():
            assert float((grads[1][n] - ref).norm()) <= 1e-3 * float(ref.norm()) + 1e-9, n


def test_attention_op_compiles_into_one_graph(flex_anywhere, monkeypatch):
    """With sparse_attention.AsOp on, a CSA and an HCA attention layer compile with fullgraph=True (a graph break
    would raise: the autograd Function's torch.compiler.disable breaks every block's graph at the attention), and
    the compiled layer's output and gradients equal eager ones. (On the CPU: Triton's interpreter runs the
    kernels; the indexer scores by its reference path, whose Triton kernel Inductor cannot take on the CPU.)"""
    from dsv4.model.attention import Indexer
    _triton_training(flex_anywhere, monkeypatch, as_op=True)
    monkeypatch.setattr(Indexer, "fused", False)
    model = random_tiny(4).float().to(flex_anywhere).train()
    calls = _count_calls(monkeypatch)
    for layer in (1, 2):                                           # CSA (ratio 4), HCA (ratio 16)
        attn = model.layers[layer].attn
        x = torch.randn(2, 40, model.cfg.hidden_size, generator=torch.Generator().manual_seed(layer))
        x = x.to(flex_anywhere).requires_grad_()
        params = [p for p in attn.parameters() if p.requires_grad]
        outs = []
        for fn in (attn, torch.compile(attn, fullgraph=True)):
            y = fn(x)
            outs.append((y.detach(), torch.autograd.grad(y.square().sum(), [x] + params, allow_unused=True)))
        torch._dynamo.reset()
        (ref, gref), (got, ggot) = outs
        assert rel_diff(got, ref) < 1e-5
        for a, e in zip(ggot, gref):
            if e is not None:
                assert rel_diff(a, e) < 1e-4
    assert len(calls) >= 4                                          # the Triton forward ran, eager and compiled


def test_with_the_attention_op_a_block_traces_to_one_graph(flex_anywhere, monkeypatch):
    """A whole CSA block (bf16: the grouped experts' GEMMs, as training runs them on a GPU) traces to one graph
    with sparse_attention.AsOp on; with the autograd Function it breaks into several (the disabled call sits
    frames deep, and dynamo splits each frame). The mHC kernels are off here: under Triton's interpreter they
    cannot take the fake tensors of a trace."""
    from dsv4.model.attention import Indexer
    from dsv4.model.mhc import Fusion
    from dsv4.model.moe import MoE
    _triton_training(flex_anywhere, monkeypatch, as_op=True)
    monkeypatch.setattr(Indexer, "fused", False)
    monkeypatch.setattr(Fusion, "pre_kernel", False)
    monkeypatch.setattr(Fusion, "expand_kernel", False)
    monkeypatch.setattr(MoE, "impl", "grouped")
    model = random_tiny(4).to(device=flex_anywhere, dtype=torch.bfloat16).train()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 40, model.cfg.hc_mult, model.cfg.hidden_size, generator=g).to(flex_anywhere, torch.bfloat16)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=g).to(flex_anywhere)
    counts = []
    for on in (True, False):
        monkeypatch.setattr(sparse_attention.AsOp, "enabled", on)
        counts.append(torch._dynamo.explain(model.layers[1])(h.requires_grad_(), ids).graph_count)
        torch._dynamo.reset()
    assert counts[0] == 1 and counts[1] > 1, counts


def test_attention_op_says_when_the_triton_backward_cannot_compile(monkeypatch):
    """The custom-op path has no FlexAttention fallback inside a traced graph: where the Triton backward does not
    compile, its first run stops with an error that names the switch, instead of failing mid-backward."""
    monkeypatch.setattr(sparse_attention, "_backward_compiles", lambda q: False)
    q, kv = torch.randn(1, 8, 16, 32), torch.randn(1, 8, 32)
    with pytest.raises(RuntimeError, match="AsOp.enabled = False"):
        torch.ops.dsv4.sparse_mqa(q, kv, None, torch.zeros(16), None, 4, 0)


def test_prepare_backward_answers_before_tracing(monkeypatch):
    """`prepare_backward` (what compile_blocks calls first) records the compile check's answer per dtype, so the
    traced custom-op path reads it instead of assuming yes: where the answer is no, `_backward_ready` says so
    while compiling and the attention falls back as in eager; where it is yes, it says yes."""
    answers = {torch.float32: False, torch.bfloat16: True}
    monkeypatch.setattr(sparse_attention, "_backward_ok", {})
    monkeypatch.setattr(sparse_attention.sparse_attention_bwd, "available", lambda t: True)

    def check(q):
        sparse_attention._backward_ok[(q.device, q.shape[2], q.shape[3], q.dtype)] = answers[q.dtype]
        return answers[q.dtype]
    monkeypatch.setattr(sparse_attention, "_backward_compiles", check)
    sparse_attention.prepare_backward(torch.device("cpu"), 16, 32, (torch.float32, torch.bfloat16, torch.float32))
    assert len(sparse_attention._backward_ok) == 2
    monkeypatch.setattr(sparse_attention.AsOp, "enabled", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert sparse_attention._backward_ready(torch.empty(1, 4, 16, 32)) is False
    assert sparse_attention._backward_ready(torch.empty(1, 4, 16, 32, dtype=torch.bfloat16)) is True
    assert sparse_attention._backward_ready(torch.empty(1, 4, 8, 32)) is True     # not asked: the op will ask
