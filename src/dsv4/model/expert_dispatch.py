"""The routed experts' data movement around their grouped GEMMs (`MoE._routed_grouped`), with each byte copied
once and no gradient summed by atomics.

Per MoE layer the grouped path needs three things besides the GEMMs:
- **The experts' weights stacked** as the GEMMs take them: w13 [E, 2I, D] (w1 rows, then w3 rows) and
  w2 [E, D, I]. Written as `torch.cat([stack(w1), stack(w3)], 1)` and `stack(w2)`, Inductor made three stacks
  and then copied w1‖w3 once more into a transposed order: four kernels, 0.26 ms per layer at the bench shape
  on an H200 (stop 28's profile), where one copy of each weight moves its bytes in ~0.1 ms. `stack_experts` is
  a torch custom op (Inductor calls it as it is) that writes each expert's matrices into their slots with one
  multi-tensor copy; in the backward each expert's gradient is a view of the stacked gradient, not a copy.
- **Each token's row once per chosen expert, sorted by expert** (`gather_rows`): x[order // k]. Its autograd
  backward was an index_put, a scatter-add of k rows into each token's gradient; here it is a gather by the
  inverse permutation and a sum over the k slots.
- **The experts' outputs summed back per token** (`combine_rows`): was `zeros(T, D).index_add_(0, tok, out)`,
  fp32 atomics over T·k rows; here a gather by the inverse permutation and a sum over the k slots, whose
  backward is again a gather. Deterministic, and the same sum up to its order.
Measured (stop 29, H100, the compiled + CUDA-graph step at b2×4096, `benchmarks/switch_ab.py`): 77.6 -> 75.6 ms
against the old form, which `MoE.dispatch = "index_add"` still selects.

Correct first: `tests/test_fast_paths.py::test_grouped_experts_equal_loop` (values and gradients against the
per-expert loop, which uses none of this) and `tests/test_expert_dispatch.py`.
"""
from __future__ import annotations

import torch

__all__ = ["stack_experts", "inverse_permutation", "gather_rows", "combine_rows"]


@torch.library.custom_op("dsv4::stack_experts", mutates_args=())
def _stack_op(w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor],
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    E, (I, D) = len(w1), w1[0].shape
    w13 = torch.empty(E, 2 * I, D, dtype=dtype, device=w1[0].device)
    w2s = torch.empty(E, D, I, dtype=dtype, device=w1[0].device)
    if all(w.dtype == dtype for w in w1):
        # every destination slot is a contiguous [I, D] / [D, I] block: one multi-tensor copy, no intermediate
        torch._foreach_copy_([*w13[:, :I].unbind(0), *w13[:, I:].unbind(0), *w2s.unbind(0)], [*w1, *w3, *w2])
    else:
        # other dtype (fp32 weights under bf16 autocast): a cast has to read and write everything anyway
        w13[:, :I].copy_(torch.stack(w1))
        w13[:, I:].copy_(torch.stack(w3))
        w2s.copy_(torch.stack(w2))
    return w13, w2s


@_stack_op.register_fake
def _(w1, w3, w2, dtype):
    E, (I, D) = len(w1), w1[0].shape
    return w1[0].new_empty(E, 2 * I, D, dtype=dtype), w1[0].new_empty(E, D, I, dtype=dtype)


def _stack_setup(ctx, inputs, output):
    w1 = inputs[0]
    ctx.inter, ctx.dtype = w1[0].shape[0], w1[0].dtype


def _stack_backward(ctx, g13, g2):
    """Each expert's gradient: its slot of the stacked gradient, a view (cast where the weights are another
    dtype)."""
    I = ctx.inter
    grads = [g13[:, :I].unbind(0), g13[:, I:].unbind(0), g2.unbind(0)]               # w1, w3, w2 per expert
    return *([g.to(ctx.dtype) for g in gs] for gs in grads), None                   # (.to: no copy in-dtype)


_stack_op.register_autograd(_stack_backward, setup_context=_stack_setup)


def stack_experts(w1: list[torch.Tensor], w3: list[torch.Tensor], w2: list[torch.Tensor],
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert w1, w3 [I, D] and w2 [D, I] -> w13 [E, 2I, D] (w1 rows then w3 rows), w2 [E, D, I] in `dtype`,
    differentiable (module docstring)."""
    return torch.ops.dsv4.stack_experts(list(w1), list(w3), list(w2), dtype)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inv with inv[order[i]] = i, by one scatter (no second sort)."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype the k slots are summed in: fp32, or fp64 for fp64 rows."""
    return torch.promote_types(dtype, torch.float32)


class _GatherRows(torch.autograd.Function):
    """x [T, D] -> x[order // k] [T·k, D]; backward: g[inv] viewed [T, k, D], summed over the k slots."""

    @staticmethod
    def forward(ctx, x, order, inv, k):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        T = inv.numel() // ctx.k
        return g[inv].view(T, ctx.k, -1).to(_acc(g.dtype)).sum(1).to(g.dtype), None, None, None


class _CombineRows(torch.autograd.Function):
    """out [T·k, D] (rows sorted by expert) -> Σ_slots out[inv] viewed [T, k, D], summed in fp32 [T, D]; backward: the
    gradient of each token's row handed to its k rows, g[order // k] in out's dtype."""

    @staticmethod
    def forward(ctx, out, order, inv, k):
        ctx.save_for_backward(order)
        ctx.k, ctx.dtype = k, out.dtype
        return out[inv].view(inv.numel() // k, k, -1).to(_acc(out.dtype)).sum(1)

    @staticmethod
    def backward(ctx, g):
        order, = ctx.saved_tensors
        return g[order // ctx.k].to(ctx.dtype), None, None, None


def gather_rows(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """x [T, D] -> [T·k, D]: row i is token order[i] // k (module docstring)."""
    return _GatherRows.apply(x, order, inv, k)


def combine_rows(out: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """out [T·k, D] in the order of `gather_rows` -> [T, D] in fp32 (fp64 rows: fp64), each token's k rows summed."""
    return _CombineRows.apply(out, order, inv, k)
