"""How dsv4 calls torch.compile: one place for the compile sites (blocks, the mHC functions, flex attention, the
decode step) and the recompile limit they need.

Inductor's own options stay at their defaults. (Checked in stop 23: Inductor compiles our Triton kernels with
Triton's `debug` flag on, but passes `sanitize_overflow=False`, so the flag only keeps `tl.device_assert`s,
which our kernels do not use: nothing to turn off there.)"""
from __future__ import annotations

from typing import Callable

import torch

RECOMPILE_LIMIT = 64   # training, no-grad prefill at several lengths and decode at several batches exceed dynamo's 8


def raise_recompile_limit() -> None:
    """Beyond the limit dynamo silently falls back to eager: keep room for every shape family we run."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """torch.compile (kwargs: dynamic, fullgraph, ...) with room for our shape families."""
    raise_recompile_limit()
    return torch.compile(fn, **kwargs)


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every transformer block and MTP block in place (`Module.compile`), as `dsv4 train --compile`
    does: parameter and checkpoint names stay those of the official layout."""
    raise_recompile_limit()
    param = next(model.parameters())
    if param.is_cuda:                     # the attention backward's compile check, before anything is traced
        from .model.sparse_attention import prepare_backward
        prepare_backward(param.device, model.cfg.num_attention_heads, model.cfg.head_dim,
                         (param.dtype, torch.bfloat16))
    for blk in list(model.layers) + list(model.mtp):
        blk.compile()
