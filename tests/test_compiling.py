"""dsv4.compiling: compile_blocks compiles every block and the MTP blocks, and leaves room for recompiles."""
import torch

from conftest import random_tiny
from dsv4 import compiling


def test_compile_blocks_compiles_every_block_and_mtp(monkeypatch):
    seen = []

    def fake_compile(fn, **kwargs):
        seen.append(fn)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    model = random_tiny(2)
    compiling.compile_blocks(model)
    blocks = list(model.layers) + list(model.mtp)
    assert len(model.mtp) > 0 and len(seen) == len(blocks)
    assert [f.__self__ for f in seen] == blocks                 # each block's own call, in place
    assert torch._dynamo.config.recompile_limit == compiling.RECOMPILE_LIMIT
