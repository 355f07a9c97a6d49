"""The V4 optimizer: Muon for the blocks' weight matrices, AdamW for everything else, as ONE optimizer object
(one `param_groups` list whose 'lr' the trainer sets, one state_dict).

Why our own Muon and not `torch.optim.Muon` (torch 2.13 has one): torch's runs 5 Newton–Schulz steps with
Keller Jordan's coefficients only, scales updates by sqrt(max(1, A/B)) or 0.2·sqrt(max(A, B)), and would
orthogonalise each FSDP2 shard separately (a shard of a matrix is not the matrix). V4 needs:

* hybrid Newton–Schulz: 8 quintic steps with (a, b, c) = (3.4445, −4.7750, 2.0315), which push every
  singular value quickly into roughly [0.7, 1.2], then 2 steps with (2, −1.5, 0.5), whose fixed point 1 has
  zero slope, so the singular values settle at 1 (the band is checked in tests/test_optim.py);
* Nesterov momentum M_t = μ·M_{t−1} + G_t, orthogonalising μ·M_t + G_t;
* update RMS matched to AdamW: O · sqrt(max(n, m)) · 0.18 (n × m the matrix), so one learning rate and one
  weight decay serve both rules; decoupled weight decay W ← W·(1 − η·λ) − η·O.
  (The 0.18 factor is from the V4 report as given in the training issue; ../shared/spec/v4.md does not
  cover the optimizer. It is the `rms_scale` argument.)

Which parameters: Muon takes the 2-D weights of attention (wq_a, wq_b, wkv, wo_a, wo_b), compressor and
indexer projections, the router (gate.weight), every expert's w1/w2/w3 and the MTP projections. AdamW takes
the embedding, the output head, every hc_* parameter (the mHC maps), attention sinks, compressor `ape`, norms,
biases and any other 0/1-D tensor; the frozen gate bias (requires_grad=False, moved by bias balancing) is in
no group. `wo_a` is g independent [o_lora, h·d/g] matrices stored stacked, so it is orthogonalised per group.

FSDP2: parameters, gradients and the momentum are DTensors sharded on dim 0. Muon gathers the full Nesterov
matrix (`full_tensor()`, an all-gather), every rank runs Newton–Schulz on it (the same result everywhere), and
each keeps its own rows (`distribute_tensor(..., src_data_rank=None)`, no communication). AdamW is
element-wise and runs on the local shards unchanged. The optimizer state is kept as plain local tensors
(the shard's rows) and state_dict() stores them keyed by parameter name, so a resume needs the same world size
(the trainer checks it).
"""
from __future__ import annotations

import math

import torch
from torch import nn

QUINTIC = (3.4445, -4.7750, 2.0315)
STABILISE = (2.0, -1.5, 0.5)


class OptimError(ValueError):
    """An optimizer state that does not fit the model (the message names the parameter)."""


# ---------------------------------------------------------------------------------------- Newton–Schulz
def newton_schulz(g: torch.Tensor, steps: tuple[int, int] = (8, 2), eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximate U·Vᵀ of g = U·S·Vᵀ. g [..., n, m] (batched over leading dims) -> same shape, in g's dtype.
    steps = (quintic steps, stabilising steps)."""
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:                                   # iterate on the wide orientation: the Gram matrix is smaller
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)   # Frobenius ≥ spectral norm: singular values ≤ 1
    for n_steps, (a, b, c) in zip(steps, (QUINTIC, STABILISE)):
        for _ in range(n_steps):
            gram = x @ x.mT                                   # [..., n, n]
            x = a * x + (b * gram + c * gram @ gram) @ x      # a·x + b·(xxᵀ)x + c·(xxᵀ)²x
    if tall:
        x = x.mT
    return x.to(g.dtype)


# ---------------------------------------------------------------------------------------- parameter split
ADAMW_NAMES = ("embed.weight", "head.weight")


def param_kind(name: str, p: torch.Tensor) -> str:
    """'muon', 'adamw' (2-D, decayed), 'adamw_nodecay' (0/1-D: norms, biases, sinks, hc bases/scales)."""
    leaf = name.rsplit(".", 1)[-1]
    if p.ndim < 2:
        return "adamw_nodecay"
    if name in ADAMW_NAMES or leaf.startswith("hc_") or leaf == "ape" or p.ndim != 2:
        return "adamw"
    return "muon"


def muon_blocks(name: str, model: nn.Module | None) -> int:
    """How many independent matrices a Muon parameter stacks along dim 0 (wo_a: o_groups; else 1)."""
    if name.endswith("attn.wo_a.weight") and model is not None and hasattr(model, "cfg"):
        return model.cfg.o_groups
    return 1


# ---------------------------------------------------------------------------------------- the optimizer
def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def _view(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor as a plain tensor sharing its storage (in-place ops write through)."""
    return t._local_tensor if _is_dtensor(t) else t


def _gather_full(us: list[torch.Tensor]) -> torch.Tensor:
    """Same-shape matrices -> their full values stacked [K, n, m]. FSDP2 DTensors (1-D mesh, rows sharded
    like torch.chunk) take one padded all-gather for the whole list; other layouts use full_tensor()."""
    if not _is_dtensor(us[0]):
        return torch.stack(us)
    from torch.distributed.tensor import Shard
    u0 = us[0]
    if u0.device_mesh.ndim != 1 or tuple(u0.placements) != (Shard(0),):
        return torch.stack([u.full_tensor() for u in us])
    import torch.distributed as dist
    mesh, (rows, cols) = u0.device_mesh, u0.shape
    world, chunk = mesh.size(), -(-u0.shape[0] // mesh.size())
    sizes = [max(0, min(chunk, rows - r * chunk)) for r in range(world)]    # torch.chunk's split
    local = torch.stack([u.to_local() for u in us])                          # [K, own rows, m]
    padded = local.new_zeros(len(us), chunk, cols)
    padded[:, :local.shape[1]] = local
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=mesh.get_group())
    return torch.cat([o[:, :n] for o, n in zip(out, sizes)], dim=1)           # [K, n, m]


class MuonAdamW(torch.optim.Optimizer):
    """Each param group has 'kind' ('muon' | 'adamw' | 'adamw_nodecay'), 'names' and 'blocks' (per param)."""

    def __init__(self, groups: list[dict], lr: float, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_steps: tuple[int, int] = (8, 2), rms_scale: float = 0.18, ns_dtype: torch.dtype | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, betas=betas,
                        eps=eps, ns_steps=tuple(ns_steps), rms_scale=rms_scale)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            live = [(p, b) for p, b in zip(group["params"], group["blocks"]) if p.grad is not None]
            if group["kind"] == "muon":
                self._muon_group(live, group)
            else:
                for p, _ in live:
                    self._adamw(p, group)
        return loss

    def _muon_group(self, live: list[tuple[torch.Tensor, int]], group: dict) -> None:
        """Matrices of one shape (all experts' w1, say) are gathered with one collective (FSDP2) and
        orthogonalised in one batched Newton–Schulz: a few large ops instead of hundreds of tiny ones."""
        by_shape: dict[tuple, list] = {}
        for p, blocks in live:
            st = self.state[p]
            g = _view(p.grad)
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(g)
            buf = st["momentum"].mul_(group["momentum"]).add_(g)             # M_t = μ M_{t−1} + G_t
            u = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
            if _is_dtensor(p.grad):
                from torch.distributed.tensor import DTensor
                u = DTensor.from_local(u, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            by_shape.setdefault((tuple(p.shape), blocks, p.dtype, p.device), []).append((p, u))
        lr = group["lr"]
        for (shape, blocks, _, device), items in by_shape.items():
            fulls = _gather_full([u for _, u in items])                      # [K, n, m] whole matrices
            mats = fulls.reshape(len(items) * blocks, shape[0] // blocks, shape[1])
            dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
            o = newton_schulz(mats, group["ns_steps"], dtype=dtype)
            o = o * (math.sqrt(max(mats.shape[1:])) * group["rms_scale"])
            for (p, _), upd in zip(items, o.split(blocks)):
                upd = upd.reshape(shape)
                if _is_dtensor(p):
                    from torch.distributed.tensor import distribute_tensor
                    upd = distribute_tensor(upd, p.device_mesh, p.placements, src_data_rank=None)  # our rows
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(upd.to(p.dtype), alpha=-lr)

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        st = self.state[p]
        w, g = _view(p), _view(p.grad)                   # element-wise: local shards are all we need
        if "exp_avg" not in st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(w)
            st["exp_avg_sq"] = torch.zeros_like(w)
        b1, b2 = group["betas"]
        st["step"] += 1
        t = st["step"]
        st["exp_avg"].lerp_(g, 1 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
        lr = group["lr"]
        wd = 0.0 if group["kind"] == "adamw_nodecay" else group["weight_decay"]
        w.mul_(1 - lr * wd)
        w.addcdiv_(st["exp_avg"], denom, value=-lr / (1 - b1 ** t))

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """{'param_groups': hyper-parameters (+ names), 'state': {param name: {key: local tensor or int}}}."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        state = {}
        for g in self.param_groups:
            for name, p in zip(g["names"], g["params"]):
                if p in self.state:
                    state[name] = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.state[p].items()}
        return {"param_groups": groups, "state": state}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd["param_groups"]) != len(self.param_groups):
            raise OptimError(f"optimizer state has {len(sd['param_groups'])} parameter groups, "
                             f"this model needs {len(self.param_groups)} (different optimizer or model?)")
        params = {}
        for g, sg in zip(self.param_groups, sd["param_groups"]):
            if list(sg["names"]) != list(g["names"]):
                missing = sorted(set(g["names"]) ^ set(sg["names"]))
                raise OptimError(f"optimizer state's '{g['kind']}' group holds other parameters than the "
                                 f"model's (differing: {missing[:5]})")
            g.update({k: v for k, v in sg.items() if k not in ("names", "blocks", "kind")})
            params.update(zip(g["names"], g["params"]))
        self.state.clear()
        for name, st in sd["state"].items():
            p = params[name]
            self.state[p] = {k: self._placed(v, p, name) for k, v in st.items()}

    @staticmethod
    def _placed(v, p: torch.Tensor, name: str):
        if not torch.is_tensor(v):
            return v
        local = p.to_local() if _is_dtensor(p) else p
        if v.shape != local.shape:
            raise OptimError(f"optimizer state for {name} has shape {tuple(v.shape)}, the parameter "
                             f"{tuple(local.shape)} here (different model or world size?)")
        v = v.to(device=local.device, dtype=local.dtype).clone()
        return v


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, muon: bool = True,
                    **kw) -> MuonAdamW:
    """Muon + AdamW per the V4 recipe; muon=False puts every matrix under AdamW too (the ablation)."""
    buckets: dict[str, dict] = {k: {"params": [], "names": [], "blocks": []}
                                for k in ("muon", "adamw", "adamw_nodecay")}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = param_kind(name, p)
        if kind == "muon" and not muon:
            kind = "adamw"
        b = buckets[kind]
        b["params"].append(p)
        b["names"].append(name)
        b["blocks"].append(muon_blocks(name, model) if kind == "muon" else 1)
    groups = [{"kind": k, **b} for k, b in buckets.items() if b["params"]]
    return MuonAdamW(groups, lr=lr, weight_decay=weight_decay, **kw)
