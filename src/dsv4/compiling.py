"""How dsv4 calls torch.compile: one set of Inductor options and one recompile limit for every compile site.

Why `assert_indirect_indexing: False`: Inductor compiles the user-defined Triton kernels it finds in a graph (ours,
registered by `torch.library.triton_op`: sparse attention, Sinkhorn, the mHC kernels) with Triton's `debug` flag
set to this option, whose default is True (torch 2.11-2.13, `triton_heuristics._precompile_config`; seen in the
stop-23 H200 log as `'debug': True`). Under that flag Triton checks every int32 add, sub and mul of a kernel for
overflow with a device assert, which eager launches never do. Off, a kernel compiles inside a compiled block as it
does when launched eagerly; what is lost is the bounds asserts of Inductor's own gathers (index_select,
embedding), which dsv4's inputs never trip (token ids and picks are checked before they reach a kernel).
`OPTIONS` is a module-level dict so an A/B can flip it (`benchmarks/compile_debug_ab.py`); set it before the first
compiled call: Inductor reads it when it compiles."""
from __future__ import annotations

from typing import Callable

import torch

OPTIONS: dict = {"assert_indirect_indexing": False}
RECOMPILE_LIMIT = 64   # training, no-grad prefill at several lengths and decode at several batches exceed dynamo's 8


def raise_recompile_limit() -> None:
    """Beyond the limit dynamo silently falls back to eager: keep room for every shape family we run."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def compile_fn(fn: Callable, **kwargs) -> Callable:
    """torch.compile with dsv4's Inductor options (kwargs: dynamic, fullgraph, ...)."""
    raise_recompile_limit()
    return torch.compile(fn, options=dict(OPTIONS), **kwargs)


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every transformer block and MTP block in place (`Module.compile`), as `dsv4 train --compile`
    does: parameter and checkpoint names stay those of the official layout."""
    raise_recompile_limit()
    for blk in list(model.layers) + list(getattr(model, "mtp", [])):
        blk.compile(options=dict(OPTIONS))
