import os
import sys

import pytest
import torch

from dsv4.config import preset
from dsv4.model import Transformer, init_weights


def random_tiny(seed: int = 1, preset_name: str = "tiny", **overrides) -> Transformer:
    """The tiny preset with every parameter random (biases, sinks, ape, hc bases too) so no path is trivially
    zero; hash tables random as well."""
    cfg = preset(preset_name).replace(**overrides) if overrides else preset(preset_name)
    torch.manual_seed(seed)
    m = init_weights(Transformer(cfg), std=0.1, seed=seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("_base", "attn_sink", "ape", "bias")):
                p.normal_(0, 0.3)
        for n, b in m.named_buffers():
            if n.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                                     for _ in range(cfg.vocab_size)]).int())
    return m.eval()


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run thousands of small kernels per step; on a busy 2-core machine two OpenMP threads wait on
    each other at every one of them (measured: 30 s instead of 0.4 s per step). One thread avoids that."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model():
    return random_tiny()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32 (1e-12 keeps an all-zero b from dividing by zero)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm()) / (float(b.norm()) + 1e-12)


def triton_compiler() -> bool:
    """Whether Triton's compiler (not its interpreter) is importable: kernels can then be compiled for a GPU
    target on any machine, which catches what the interpreter lets through (e.g. an if whose branches give a
    value two shapes) and shows their shared-memory needs."""
    import os
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") != "1"


def compile_for_hopper(kernel, constexprs: dict, pointers: dict, floats: tuple = (), num_warps: int = 8) -> int:
    """Compile a @triton.jit kernel for sm90 (no GPU needed): constexprs by name, pointer arguments by name ->
    their element type ('fp32', 'bf16', 'i32'), `floats` the fp32 scalars, every other argument i32. -> bytes of
    shared memory per program."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "constexpr" if n in constexprs else f"*{pointers[n]}" if n in pointers else
           "fp32" if n in floats else "i32" for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert ".entry" in compiled.asm["ptx"]
    return compiled.metadata.shared


def leave_gloo_worker() -> None:
    """End an mp.spawn gloo worker whose work is done: a barrier (every rank has finished talking), then
    os._exit(0), skipping destroy_process_group and the interpreter's teardown. Why: gloo's teardown in one rank
    can race the other rank's transport thread, which then dies in std::terminate ('terminate called without an
    active exception', SIGABRT) after a run whose results were all written — CI failed so once (stop 21) with a
    barrier before destroy_process_group already in place. A worker that raised still tears down normally."""
    import torch.distributed as dist
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def model_equal_with_switch(monkeypatch, switch: str, kernel_module, kernel_fn: str, device: str, seed: int = 7,
                            seq: int = 33) -> dict:
    """mHC fast path `Fusion.<switch>` on vs off in the whole tiny model (fp32, mHC eager): logits within 1e-5
    and every gradient within 1e-4; then a failing stand-in for `kernel_module.<kernel_fn>` must surface (the
    kernel really runs). -> the reference gradients by name, for further checks. (On CUDA mHC is otherwise
    compiled, and a compiled graph keeps calling the op it traced, not the stand-in.)"""
    from dsv4.model.mhc import Fusion
    monkeypatch.setattr(Fusion, "enabled", False)
    model = random_tiny(seed).float().to(device).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(Fusion, switch, on)
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        logits.logsumexp(-1).mean().backward()
        outs.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, gref), (got, ggot) = outs
    assert rel_diff(got, ref) < 1e-5
    assert gref.keys() == ggot.keys()
    for n, g in gref.items():
        assert rel_diff(ggot[n], g) < 1e-4, (n, rel_diff(ggot[n], g))

    class Ran(Exception):
        pass

    def stand_in(*args, **kwargs):
        raise Ran
    monkeypatch.setattr(kernel_module, kernel_fn, stand_in)
    with pytest.raises(Ran):
        model(ids)
    return gref
