"""The V4 training recipe pieces that live outside the optimizer: losses (next token + MTP + sequence-wise
balance + the CSA indexers' KL), aux-loss-free bias balancing, anticipatory routing, and learning-rate /
sequence-length schedules."""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from ..model import MoE, Transformer
from ..model.attention import Indexer


# ------------------------------------------------------------------------------------------------ losses
@dataclass
class LossParts:
    total: torch.Tensor
    lm: torch.Tensor
    mtp: torch.Tensor | None
    balance: torch.Tensor | None
    indexer: torch.Tensor | None = None


def compute_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, mtp_weight: float = 0.3,
                 balance_weight: float = 1e-4, indexer_weight: float = 1.0) -> LossParts:
    """inputs/targets [b, s] (targets = inputs shifted by one). The MTP block at position t sees the main
    streams h_t and the embedding of token t+1 (= targets[t]) and predicts token t+2 (= targets[t+1]). The MoE
    layers compute their sequence-wise balance losses, and the CSA layers' indexers their KL losses against the
    main attention (`Indexer.kl_loss`: the only signal their weights get), only during this call and only with
    a weight > 0. The indexer loss reaches nothing but the indexers, so its weight scales only their step."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    indexers = [m for m in model.modules() if isinstance(m, Indexer)]
    for m in moes:
        m.collect_balance = balance_weight > 0
    for m in indexers:
        m.collect_loss = indexer_weight > 0
    try:
        lm, h = model(inputs, return_hidden=True, targets=targets)      # head + cross-entropy in chunks
        total = lm
        mtp = None
        if mtp_weight > 0 and len(model.mtp) and inputs.shape[1] > 1:
            mtp = model.mtp_forward(h[:, :-1], targets[:, :-1], targets=targets[:, 1:])
            total = total + mtp_weight * mtp
        balance = _mean([m.aux_loss for m in moes])
        if balance is not None:
            total = total + balance_weight * balance
        indexer = _mean([m.loss for m in indexers])
        if indexer is not None:
            total = total + indexer_weight * indexer
    finally:
        for m in moes:
            m.collect_balance, m.aux_loss = False, None
        for m in indexers:
            m.collect_loss, m.loss = False, None
    return LossParts(total, lm, mtp, balance, indexer)


def _mean(losses: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [v for v in losses if v is not None]
    return torch.stack(present).mean() if present else None


# ------------------------------------------------------------------------------------ bias balancing
@torch.no_grad()
def update_gate_biases(model: torch.nn.Module, speed: float) -> float:
    """Aux-loss-free balancing: after a step, raise the selection bias of under-loaded experts and lower that
    of over-loaded ones by `speed` (sign update on the load accumulated since the last call, summed over all
    ranks). Returns the mean max-violation (max load / mean load − 1) over layers, for logging.
    Under FSDP2 the bias is a sharded DTensor: the (identical on every rank) update is applied to our rows."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    viol = []
    for m in model.modules():
        if not isinstance(m, MoE) or m.gate.bias is None:
            continue
        load = m.load
        if dist:
            torch.distributed.all_reduce(load)
        if load.sum() > 0:
            mean = load.mean()
            delta = speed * torch.sign(mean - load)
            bias = m.gate.bias
            if _is_dtensor(bias):
                from torch.distributed.tensor import distribute_tensor
                delta = distribute_tensor(delta.to(bias.dtype), bias.device_mesh, bias.placements, src_data_rank=None)
            bias.add_(delta)
            viol.append(float(load.max() / mean - 1))
        load.zero_()
    return sum(viol) / len(viol) if viol else 0.0


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if _is_dtensor(t) else t


def dense_expert_grads(model: torch.nn.Module) -> list:
    """Give every routed expert a gradient every step, zero when it got no tokens (the loop path only runs
    experts that were picked). Why: under FSDP2 each rank must reduce the same set of gradients, and an
    expert idle on one rank but busy on another would break that; it also makes one process and many agree
    (an idle expert still gets momentum and weight decay, as with the dense gradient buffers of large-scale
    training). Adds 0·Σ(expert weights) to the MoE output while training. Returns the hook handles."""
    def hook(mod, args, out):
        if not mod.training or mod._grouped(args[0]):   # the grouped path stacks (so differentiates) all experts
            return out
        zero = sum(p.sum() for e in mod.experts for p in e.parameters()) * 0.0
        return out + zero.to(out.dtype)
    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MoE)]


# ------------------------------------------------------------------------------- anticipatory routing
class SpikeDetector:
    """A loss is a spike when it exceeds the running mean of the last `window` losses by `k` standard
    deviations (after `warmup` observations)."""

    def __init__(self, window: int = 50, k: float = 4.0, warmup: int = 20):
        self.hist: deque[float] = deque(maxlen=window)
        self.k, self.warmup = k, warmup

    def __call__(self, loss: float) -> bool:
        spike = False
        if len(self.hist) >= self.warmup:
            mean = sum(self.hist) / len(self.hist)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.hist) / len(self.hist))
            spike = loss > mean + self.k * max(std, 1e-6)
        if not spike:
            self.hist.append(loss)
        return spike

    def state_dict(self) -> dict:
        return {"hist": list(self.hist)}

    def load_state_dict(self, sd: dict) -> None:
        self.hist.clear()
        self.hist.extend(sd["hist"])


class AnticipatoryRouting:
    """Keeps the gate parameters of the last `delta` steps. On a loss spike, expert *selection* at step t uses
    the gate parameters of step t − delta (a sliding lag; the routing weights still use the current ones) for
    `duration` steps, then switches back. Spike detection pauses while it is on."""

    def __init__(self, model: torch.nn.Module, delta: int = 10, duration: int = 50, detector: SpikeDetector | None = None):
        self.gates = [m.gate for m in model.modules() if isinstance(m, MoE) and not m.gate.hash]
        self.delta, self.duration = delta, duration
        self.detector = detector or SpikeDetector()
        self.history: deque[list[tuple[torch.Tensor, torch.Tensor]]] = deque(maxlen=delta + 1)
        self.remaining = 0
        self.events: list[dict] = []

    @torch.no_grad()
    def snapshot(self) -> None:
        """Call once per step, after the optimizer step (full tensors, also under FSDP2)."""
        self.history.append([(_full(g.weight.detach()).clone(), _full(g.bias.detach()).clone()) for g in self.gates])
        if self.remaining > 0:
            self._route_with(self.history[0])

    def _route_with(self, params) -> None:
        for g, p in zip(self.gates, params):
            g.route_params = p

    def observe(self, step: int, loss: float) -> str | None:
        """Feed this step's loss (the same value on every rank); returns 'on' / 'off' when the routing mode
        changes (for the log)."""
        if self.remaining > 0:
            self.remaining -= 1
            if self.remaining == 0:
                self._route_with([None] * len(self.gates))
                self.events.append({"step": step, "event": "off"})
                return "off"
            return None
        if self.detector(loss) and len(self.history) > 0:
            self._route_with(self.history[0])              # the oldest kept: `delta` steps back when full
            self.remaining = self.duration
            self.events.append({"step": step, "event": "on", "loss": loss, "steps_back": len(self.history) - 1})
            return "on"
        return None

    @property
    def active(self) -> bool:
        return self.remaining > 0

    def state_dict(self) -> dict:
        return {"history": list(self.history), "remaining": self.remaining, "events": list(self.events),
                "detector": self.detector.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        dev = self.gates[0].weight.device if self.gates else "cpu"
        self.history.clear()
        self.history.extend([[(w.to(dev), b.to(dev)) for w, b in snap] for snap in sd["history"]])
        self.remaining, self.events = sd["remaining"], list(sd["events"])
        self.detector.load_state_dict(sd["detector"])
        self._route_with(self.history[0] if self.remaining > 0 else [None] * len(self.gates))


# ----------------------------------------------------------------------------------------- schedules
def lr_at(step: int, total: int, peak: float, warmup: int, kind: str = "cosine", min_ratio: float = 0.1,
          decay_frac: float = 0.2) -> float:
    """Linear warmup, then cosine to min_ratio·peak, or WSD (constant, then linear decay over the last
    `decay_frac` of training)."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if kind == "constant":
        return peak
    if kind == "wsd":
        start = int(total * (1 - decay_frac))
        if step < start:
            return peak
        frac = (step - start) / max(1, total - start)
        return peak * (1 - (1 - min_ratio) * frac)
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def seq_len_at(step: int, schedule: list[tuple[int, int]], default: int) -> int:
    """Progressive sequence length: schedule = [(from_step, seq_len), …] sorted by step."""
    cur = default if not schedule else schedule[0][1]
    for start, length in schedule:
        if step >= start:
            cur = length
    return cur
