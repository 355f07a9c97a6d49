"""DeepSeekMoE: sqrt-softplus gate with an aux-loss-free selection bias, hash-routed first layers, routed
experts plus one shared expert, all SwiGLU with clamping."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .expert_dispatch import combine_rows, gather_rows, inverse_permutation, stack_experts
from .layers import Linear


class Gate(nn.Module):
    """scores = sqrt(softplus(x·Wᵀ)) in fp32; experts chosen by top-k of (scores + bias) — the bias steers
    selection only — or, in hash layers, by the fixed table tid2eid[token id]; weights = the chosen scores,
    normalised to sum 1, times routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.topk, self.score_func, self.route_scale = cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor
        self.hash = layer_id < cfg.num_hash_layers
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size))
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, self.topk, dtype=torch.int32))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)
        # anticipatory routing: when set, experts are *selected* with these earlier gate parameters
        self.route_params: tuple[torch.Tensor, torch.Tensor] | None = None

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores_with(x, self.weight)

    def scores_with(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        logits = x.float() @ weight.float().t()
        if self.score_func == "softmax":
            return logits.softmax(-1)
        if self.score_func == "sigmoid":
            return logits.sigmoid()
        return F.softplus(logits).sqrt()

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], input_ids [T] -> weights [T, k] fp32, expert ids [T, k] int64."""
        s = self.scores(x)
        if self.hash:
            if input_ids is None:  # pragma: no cover - guarded by the model
                raise ValueError("hash-routed MoE layers need the token ids")
            idx = self.tid2eid[input_ids].long()
        elif self.route_params is not None:
            w_old, b_old = self.route_params
            with torch.no_grad():
                idx = (self.scores_with(x, w_old) + b_old.float()).topk(self.topk, dim=-1).indices
        else:
            idx = (s + self.bias.float()).topk(self.topk, dim=-1).indices
        w = s.gather(1, idx)
        if self.score_func != "softmax":
            w = w / w.sum(-1, keepdim=True)
        return w * self.route_scale, idx


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(gate) · up with V4's clamping (limit ≤ 0 disables it)."""
    if limit > 0:
        up = up.clamp(-limit, limit)
        gate = gate.clamp(max=limit)
    return F.silu(gate) * up


class Expert(nn.Module):
    """SwiGLU in fp32 with clamping: up ∈ [−limit, limit], gate ≤ limit; the routing weight multiplies the
    hidden activation before w2 (as the official code does)."""

    def __init__(self, dim: int, inter: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = Linear(dim, inter, fp8_input=True)
        self.w2 = Linear(inter, dim, fp8_input=True)
        self.w3 = Linear(dim, inter, fp8_input=True)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        hid = swiglu(self.w1(x).float(), self.w3(x).float(), self.limit)
        if weight is not None:
            hid = weight * hid
        return self.w2(hid.to(x.dtype))


class MoE(nn.Module):
    """Routed experts + shared expert. `impl` picks how the routed experts run: 'loop' (the reference: one
    expert at a time), 'grouped' (tokens sorted by expert, three grouped GEMMs, no host sync) or 'auto'
    (grouped on CUDA in plain numerics, loop otherwise). Both give the same result up to summation order.
    `dispatch` picks how the grouped path moves rows and weights: 'gather' (`expert_dispatch`: one copy per
    stacked weight, gathers both ways, no atomics) or 'index_add' (the form before stop 29: stack + cat of the
    weights, x[tok] and an fp32 index_add back), kept for the A/B. `split_first`: w1‖w3's output split before
    its fp32 cast (the same values; see `_routed_grouped`), False: cast first, as before (H100, compiled + CUDA-graph
    step at b2×4096: 74.28 ms against 74.53, stop 30's `benchmarks/switch_ab.py --variants
    "default:;cast_first:MoE.split_first=0"`)."""
    impl = "auto"
    dispatch = "gather"
    split_first = True

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg, layer_id)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = (Expert(cfg.hidden_size, cfg.moe_intermediate_size, cfg.swiglu_limit)
                               if cfg.n_shared_experts else None)
        self.last_counts: torch.Tensor | None = None     # tokens per expert of the last call
        # training: load accumulated since the last bias update, and the sequence-wise balance loss
        self.register_buffer("load", torch.zeros(cfg.n_routed_experts), persistent=False)
        # the sequence-wise balance loss of the last forward, computed only while a training recipe collects it
        # (`collect_balance`, set around its forward by train.recipe.compute_loss): a forward nobody takes a loss
        # from then keeps no autograd graph alive through this module (nor pays for the extra scoring)
        self.collect_balance = False
        self.aux_loss: torch.Tensor | None = None
        self.topk = cfg.num_experts_per_tok
        # (w13 [E, 2I, D], w2 [E, D, I]) stacked once by an inference caller (see `stack_experts`); None: stacked
        # from the expert weights on every call, as training needs
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def stack_experts(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts' weights as the grouped GEMMs take them: w13 [E, 2I, D] (w1 rows then w3 rows)
        and w2 [E, D, I], copies in `dtype`."""
        with torch.no_grad():
            return self._expert_weights(dtype)

    def _expert_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 [E, 2I, D], w2 [E, D, I] from the per-expert parameters (differentiable): one copy of each weight
        (`expert_dispatch.stack_experts`), or with dispatch 'index_add' three stacks and one cat per call."""
        ws = {name: [getattr(e, name).weight for e in self.experts] for name in ("w1", "w3", "w2")}
        if self.dispatch == "gather":
            return stack_experts(ws["w1"], ws["w3"], ws["w2"], dtype)
        return torch.cat([torch.stack(ws["w1"]), torch.stack(ws["w3"])], 1).to(dtype), torch.stack(ws["w2"]).to(dtype)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                                  # [T, D]
        w, idx = self.gate(x, None if input_ids is None else input_ids.reshape(-1))
        # tokens per expert, without bincount's read-back of the largest id (no host sync: CUDA-graph safe)
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, idx.flatten(), torch.ones(idx.numel(), dtype=torch.long, device=x.device))
        self.last_counts = counts.detach()
        if self.training and not self.gate.hash:
            self.load += counts.to(self.load.dtype)
            if self.collect_balance:
                self.aux_loss = self._sequence_balance_loss(x.view(shape), idx.view(*shape[:-1], -1))
        if self._grouped(x):
            y = self._routed_grouped(x, w, idx, counts)                              # [T, D] fp32
        else:
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            for e in torch.nonzero(counts).flatten().tolist():
                tok, slot = torch.where(idx == e)
                y.index_add_(0, tok, self.experts[e](x[tok], w[tok, slot, None]).float())
        if self.shared_experts is not None:
            y = y + self.shared_experts(x).float()
        return y.to(x.dtype).view(shape)

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.impl == "auto":
            official = self.experts[0].w1.official
            bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                                 and torch.get_autocast_dtype("cuda") == torch.bfloat16)
            return x.is_cuda and bf16 and not official and hasattr(torch, "_grouped_mm")
        return self.impl == "grouped"

    def _routed_grouped(self, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
        """(token, slot) pairs sorted by expert; w1|w3 as one grouped GEMM, then w2 -> each token's sum over its
        experts [T, D] fp32."""
        if x.is_cuda and x.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
            x = x.to(torch.get_autocast_dtype("cuda"))                               # fp32 input under bf16 autocast
        k = idx.shape[1]
        order = idx.flatten().argsort(stable=True)                                   # [T·k]
        offs = counts.cumsum(0).to(torch.int32)                                       # group ends
        if self.stacked is not None and self.stacked[0].dtype == x.dtype and not torch.is_grad_enabled():
            w13, w2 = self.stacked
        else:
            w13, w2 = self._expert_weights(x.dtype)                                   # [E, 2I, D], [E, D, I]
        if self.dispatch == "gather":
            inv = inverse_permutation(order)
            xs = gather_rows(x, order, inv, k)                                        # [T·k, D], by expert
        else:
            xs = x[order // k]
        h13 = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs)                # [T·k, 2I]
        # split first, then fp32 (the same values): compiled, the backward joins the halves' gradients once, in
        # bf16. With `.float()` before the split, Inductor's code for one layer (seen on the CPU; stop 29) wrote
        # them as an fp32 [T·k, 2I] buffer and then twice in bf16, once per backward GEMM
        if self.split_first:
            gate, up = (t.float() for t in h13.chunk(2, -1))                          # [T·k, I] each
        else:
            gate, up = h13.float().chunk(2, -1)
        hid = swiglu(gate, up, self.experts[0].limit) * w.flatten()[order, None]
        out = torch._grouped_mm(hid.to(x.dtype), w2.transpose(-2, -1), offs=offs)   # [T·k, D]
        if self.dispatch == "gather":
            return combine_rows(out, order, inv, k)
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, order // k, out.float())

    def _sequence_balance_loss(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sequence-wise balance loss Σ_i f_i·P_i per sequence (averaged over the batch):
        f_i = E/(k·T) · #tokens of the sequence routed to i, P_i = mean over its tokens of the normalised
        score s_i / Σ_j s_j. x [b, T, D], idx [b, T, k]."""
        b, T, _ = x.shape
        s = self.gate.scores(x.reshape(-1, x.shape[-1])).view(b, T, -1)
        p = (s / s.sum(-1, keepdim=True)).mean(1)                                      # [b, E]
        hits = torch.zeros(b, self.n_experts, device=x.device).scatter_add_(
            1, idx.reshape(b, -1), torch.ones(b, T * idx.shape[-1], device=x.device))
        f = hits * self.n_experts / (self.topk * T)
        return (f * p).sum(-1).mean()
