"""A training micro-step (forward + backward at one batch shape) captured once in a CUDA graph, then replayed.

Why: a V4 block is thousands of small kernels (mHC, compressors, indexer, routing, attention glue); on an H100
the CPU issuing them leaves the GPU idle for a large part of the step (~60 ms of gaps in a ~250 ms step of the
bench model, compiled). A replay issues the whole step at once.

What it relies on (all true of dsv4's training path on one GPU):
- fixed shapes: one graph per input shape (a new sequence length of the progressive schedule captures anew);
- nothing read back to the host inside the step: the model's token-id check is skipped while capturing, so
  the ids are checked here, before they are copied into the graph's input buffers;
- the same Python control flow and the same tensors at every step: while anticipatory routing is on (MoE
  gates selecting with a new copy of older gate parameters each step) the caller runs the step eagerly;
- gradients that exist before capture: the graph *adds* into them (so gradient accumulation, clipping and
  the optimizers work unchanged); every trainable parameter gets one (zero where unused). If something sets
  them to None (zero_grad's default), the next replay puts the captured tensors back, zeroed.
  Or, with accumulate=False (one micro-step per optimizer step), the graph *writes* them: captured from None,
  each gradient is the graph's own output buffer, which every replay overwrites — no zeroing and no addition
  per parameter (the bench model has ~2,000 parameters, 64 experts × 3 per layer: on the H100 their
  additions and zeroing were ~4,000 small kernels, 10 ms of a 158 ms step).
The first `warmup` calls of a shape run eagerly (real steps, on a side stream as CUDA graphs require): they
compile, autotune and allocate what the capture must find ready.
"""
from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch


class GraphError(RuntimeError):
    """The step could not be captured (it synchronises with the host somewhere)."""


class GraphedStep:
    """step = GraphedStep(model, fn); outs = step(*inputs): fn(*inputs) -> tuple of tensors whose first is the
    loss; runs fn and `outs[0].backward()` (eagerly for the first `warmup` calls of a shape, then from a CUDA
    graph). Returned tensors are the graph's own output buffers: read them (float(), .clone()) before the
    next call overwrites them. accumulate: the backward adds into the parameters' gradients (True) or
    writes them (False; module docstring)."""

    def __init__(self, model: torch.nn.Module, fn: Callable[..., Sequence[torch.Tensor]], warmup: int = 2,
                 check_inputs: Callable[..., None] | None = None, capture_error_mode: str = "global",
                 accumulate: bool = True):
        self.model, self.fn, self.warmup, self.accumulate = model, fn, warmup, accumulate
        self._redirect_stale_streams()            # process-wide, once
        self.capture_error_mode = capture_error_mode
        self.check_inputs = check_inputs
        self.calls: dict[Hashable, int] = {}
        self.graphs: dict[Hashable, tuple] = {}          # key -> (graph, static inputs, static outputs, grads)
        self.captures = 0

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.check_inputs is not None:
            self.check_inputs(*inputs)
        # the warm-up and the capture must see one memory layout: compiled blocks guard on strides, and a capture
        # fed contiguous clones of a strided view (ids[:, :-1] of a batch) recompiled inside the capture, which
        # reads values back and failed (H100, --compile with a CUDA graph at batch 2)
        inputs = tuple(x.contiguous() for x in inputs)
        key = (tuple((tuple(x.shape), x.dtype) for x in inputs), torch.is_autocast_enabled("cuda"))
        if key in self.graphs:
            return self._replay(key, inputs)
        for old in [k for k in self.graphs if k[0] != key[0]]:   # a new shape (progressive sequence length): the
            del self.graphs[old]                                  # old graph's memory goes before the warm-up
        n = self.calls[key] = self.calls.get(key, 0) + 1
        if n <= self.warmup:
            return self._eager(inputs)
        self._capture(key, inputs)
        return self._replay(key, inputs)

    def _params(self) -> list[torch.nn.Parameter]:
        """Trainable parameters, each given a zero gradient where it has none (accumulate; else none at all):
        the warm-up steps then run the very kernels the captured step will (the backward adding into existing
        gradients, or writing new ones; a kernel first launched during a capture must load its module, which a
        capture does not allow)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if not self.accumulate:
                p.grad = None
            elif p.grad is None:
                p.grad = torch.zeros_like(p)
        return params

    @staticmethod
    def _redirect_stale_streams() -> None:
        """Autograd remembers, in each parameter's gradient-accumulation node, the stream of the forward that
        created the node, and reuses the node while any graph holding it lives. A graph kept from an earlier
        forward on the default stream makes the captured backward touch the default stream, which a capture
        forbids ("operation would make the legacy stream depend on a capturing blocking stream"; seen on an H100
        when the MoE layers still kept every training forward's balance loss — they keep it now only inside
        `compute_loss`). Torch versions that can redirect such stale streams are told to (a process-wide autograd
        setting, which only changes what happens during captures)."""
        override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
        if override is not None:
            override(True)

    def _eager(self, inputs) -> tuple[torch.Tensor, ...]:
        self._params()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outs = tuple(self.fn(*inputs))
            outs[0].backward()
        torch.cuda.current_stream().wait_stream(side)
        return tuple(o.detach() for o in outs)

    def _capture(self, key, inputs) -> None:
        params = self._params()                   # the graph adds into these gradients (or creates them)
        static_in = tuple(x.clone() for x in inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:                                      # records the kernels (the additions into grads too), runs none
            with torch.cuda.graph(graph, capture_error_mode=self.capture_error_mode):
                outs = tuple(self.fn(*static_in))
                outs[0].backward()
        except RuntimeError as e:
            raise GraphError(f"the training step cannot be captured in a CUDA graph: {str(e).splitlines()[0][:300]} "
                             "(something in it reads a value back to the host, e.g. the experts' reference loop, "
                             "which runs in fp32, or an autograd graph from an earlier forward on the default "
                             "stream is still alive; train in bf16 or without the CUDA graph)") from e
        grads = [(p, p.grad) for p in params if p.grad is not None]      # (not accumulate: the graph's outputs)
        self.graphs[key] = (graph, static_in, tuple(o.detach() for o in outs), grads)
        self.captures += 1

    def _replay(self, key, inputs) -> tuple[torch.Tensor, ...]:
        graph, static_in, outs, grads = self.graphs[key]
        reset = []
        for p, g in grads:
            if not self.accumulate:                # the replay overwrites g: nothing to zero or keep
                p.grad = g
            elif p.grad is None:                   # zero_grad(set_to_none=True) since the capture
                reset.append(g)
                p.grad = g
            elif p.grad is not g:                  # replaced: keep its value in the captured tensor
                g.copy_(p.grad)
                p.grad = g
        if reset:
            torch._foreach_zero_(reset)
        for dst, src in zip(static_in, inputs):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return outs
