"""The DeepSeek-V4 model: embed -> expand to hc_mult streams -> blocks (attention, MoE, each wrapped in
mHC) -> hyper-head -> norm -> head; plus the MTP block that predicts the token after next.

Parameter names equal the official checkpoint's (`layers.N.attn.wq_a.weight`, `layers.N.hc_attn_fn`, …)
so loading is a plain name-for-name copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import Attention, AttnCache
from .head_loss import head_cross_entropy
from .layers import Linear, RMSNorm
from .mhc import hc_expand_fast, hc_head_fast, hc_pre_fast
from .moe import MoE


class Block(nn.Module):
    """attention and MoE sublayers, each entered through the mHC collapse and left through its expand."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.residual = cfg.residual
        self.iters, self.hc_eps, self.norm_eps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.attn = Attention(cfg, layer_id)
        self.ffn = MoE(cfg, layer_id)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.residual != "plain":
            n, D = cfg.hc_mult, cfg.hidden_size
            mix = (2 + n) * n
            for sub in ("attn", "ffn"):
                self.register_parameter(f"hc_{sub}_fn", nn.Parameter(torch.zeros(mix, n * D)))
                self.register_parameter(f"hc_{sub}_base", nn.Parameter(torch.zeros(mix)))
                self.register_parameter(f"hc_{sub}_scale", nn.Parameter(torch.ones(3)))

    def _sublayer(self, h: torch.Tensor, sub: str, fn) -> torch.Tensor:
        if self.residual == "plain":                       # ablation: one stream, ordinary residual
            return h + fn(h[:, :, 0]).unsqueeze(2)
        x, post, comb = hc_pre_fast(h, getattr(self, f"hc_{sub}_fn"), getattr(self, f"hc_{sub}_base"),
                                    getattr(self, f"hc_{sub}_scale"), self.iters, self.hc_eps, self.norm_eps,
                                    "mhc" if self.residual == "mhc" else "hc")
        return hc_expand_fast(fn(x), h, post, comb)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor | None, start_pos: int = 0,
                cache: AttnCache | None = None) -> torch.Tensor:
        """h [b, s, n, D] -> [b, s, n, D]."""
        h = self._sublayer(h, "attn", lambda x: self.attn(self.attn_norm(x), start_pos, cache))
        return self._sublayer(h, "ffn", lambda x: self.ffn(self.ffn_norm(x), input_ids))


class MTPBlock(Block):
    """Next-next-token module: mixes the main model's final streams with the embedding of the next token,
    runs one Block, and predicts through its own hyper-head and norm and the shared output head."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        D, n = cfg.hidden_size, (1 if cfg.residual == "plain" else cfg.hc_mult)
        self.e_proj = Linear(D, D, fp8_input=True)
        self.h_proj = Linear(D, D, fp8_input=True)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        if cfg.residual != "plain":
            self.hc_head_fn = nn.Parameter(torch.zeros(n, n * D))
            self.hc_head_base = nn.Parameter(torch.zeros(n))
            self.hc_head_scale = nn.Parameter(torch.ones(1))


class Transformer(nn.Module):
    head_fp32 = True    # False: the output head runs in the model dtype (bf16 training: 2x fewer head FLOPs' time)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.n_streams = 1 if cfg.residual == "plain" else cfg.hc_mult
        self.embed = nn.Embedding(cfg.vocab_size, D)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPBlock(cfg, cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers))
        if cfg.residual != "plain":
            n = cfg.hc_mult
            self.hc_head_fn = nn.Parameter(torch.zeros(n, n * D))
            self.hc_head_base = nn.Parameter(torch.zeros(n))
            self.hc_head_scale = nn.Parameter(torch.ones(1))
        self.numerics = "plain"

    # ------------------------------------------------------------------------------------------ numerics
    def set_numerics(self, numerics: str) -> "Transformer":
        """'plain': compute in the parameter dtype, no simulated rounding. 'official': round where DeepSeek's
        inference code rounds (FP8 KV, FP4 indexer, FP8 activations before FP8/FP4 GEMMs)."""
        if numerics not in ("plain", "official"):
            raise ValueError(f"numerics must be 'plain' or 'official', got {numerics!r}")
        if numerics == "official":
            self.cfg.check_official_numerics()
        for m in self.modules():
            if hasattr(m, "official"):
                m.official = numerics == "official"
        self.numerics = numerics
        return self

    # ------------------------------------------------------------------------------------------ forward
    def _head_input(self, h: torch.Tensor, owner: nn.Module, norm: RMSNorm) -> torch.Tensor:
        """Streams [b, s, n, D] -> the normed single stream the head reads [b, s, D] (mHC's hyper-head collapse)."""
        x = h[:, :, 0] if self.cfg.residual == "plain" else hc_head_fast(
            h, owner.hc_head_fn, owner.hc_head_base, owner.hc_head_scale, self.cfg.hc_eps, self.cfg.rms_norm_eps)
        return norm(x)

    def _project(self, x: torch.Tensor, w: torch.Tensor | None = None, upcast: bool = True) -> torch.Tensor:
        """[.., D] -> fp32 logits [.., vocab] (w: the head weight, or a stand-in for it; upcast False: in the
        GEMM's own dtype, for the fused loss, which reads bf16 logits as they are)."""
        w = self.head.weight if w is None else w
        if self.head_fp32:                                                          # fp32 head, as official
            return F.linear(x.float(), w.float())
        z = F.linear(x, w.to(x.dtype))
        return z.float() if upcast else z

    def _logits(self, h: torch.Tensor, owner: nn.Module, norm: RMSNorm,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Streams -> fp32 logits, or with targets [b, s] their mean cross-entropy (chunked, no full logits)."""
        x = self._head_input(h, owner, norm)
        return self._project(x) if targets is None else self._cross_entropy(x, targets)

    loss_chunk = 2048          # tokens per chunk of the fused head + cross-entropy (targets= in forward / mtp_forward)

    def _cross_entropy(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of head(x) [b, s, D] against targets [b, s], `loss_chunk` tokens at a time
        (`head_loss`): fp32 logits exist for one chunk only (at 129K vocab, 1 GiB per 2048 tokens, against 4 GiB
        per 8K-token batch unchunked), and in training each chunk's gradients are taken in the forward, so none
        are kept or recomputed. Same value and gradients as cross_entropy(logits) up to summation order."""
        t = targets.flatten()
        return head_cross_entropy(x.flatten(0, 1), self.head.weight, t, self._native_logits, self.loss_chunk,
                                  linear=True) / t.numel()

    def _native_logits(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self._project(x, w, upcast=False)

    def hidden(self, input_ids: torch.Tensor, start_pos: int = 0, caches: list[AttnCache] | None = None) -> torch.Tensor:
        """Final residual streams [b, s, n, D] (what MTP and the dissection hooks consume)."""
        h = self.embed(input_ids).unsqueeze(2).repeat(1, 1, self.n_streams, 1)     # [b, s, n, D]
        for i, layer in enumerate(self.layers):
            h = layer(h, input_ids, start_pos, None if caches is None else caches[i])
        return h

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, caches: list[AttnCache] | None = None,
                return_hidden: bool = False, last_only: bool = False, targets: torch.Tensor | None = None):
        """input_ids [b, s] at positions start_pos… -> logits [b, s, vocab] (fp32) for every position
        (last_only: [b, 1, vocab], all a prefill needs; targets [b, s]: the mean cross-entropy instead, computed
        in chunks without the full logits)."""
        self._check_ids(input_ids)
        h = self.hidden(input_ids, start_pos, caches)
        out = self._logits(h[:, -1:] if last_only and targets is None else h, self, self.norm, targets)
        return (out, h) if return_hidden else out

    def decode_step(self, ids: torch.Tensor, pos: torch.Tensor, caches: list[AttnCache]) -> torch.Tensor:
        """One token per sequence, ids [b, 1], at the position held by the 0-dim long tensor `pos` -> logits
        [b, vocab]. Caches must be in the static layout (`Attention.to_static`); shapes are fixed and nothing
        is read back to the host (no id validation either), so the step can be captured in a CUDA graph."""
        h = self.embed(ids).unsqueeze(2).repeat(1, 1, self.n_streams, 1)
        for layer, cache in zip(self.layers, caches):
            h = layer(h, ids, pos, cache)
        return self._logits(h, self, self.norm)[:, -1]

    def mtp_forward(self, h: torch.Tensor, next_ids: torch.Tensor, start_pos: int = 0, cache: AttnCache | None = None,
                    depth: int = 0, targets: torch.Tensor | None = None) -> torch.Tensor:
        """MTP logits: h [b, s, n, D] final streams at positions t, next_ids [b, s] the tokens at t+1 ->
        logits [b, s, vocab] predicting the tokens at t+2 (targets [b, s]: their mean cross-entropy instead)."""
        mtp = self.mtp[depth]
        e = mtp.e_proj(mtp.enorm(self.embed(next_ids)))                              # [b, s, D]
        x = e.unsqueeze(2) + mtp.h_proj(mtp.hnorm(h))                                # [b, s, n, D]
        x = mtp(x, next_ids, start_pos, cache)
        return self._logits(x, mtp, mtp.norm, targets)

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return           # no read-back inside a CUDA graph: train.graphed.GraphedStep checks them before
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token id {hi if hi >= self.cfg.vocab_size else lo} outside the vocabulary "
                             f"[0, {self.cfg.vocab_size})")

    # ------------------------------------------------------------------------------------------ caches
    def new_caches(self, batch: int, max_len: int, device=None, dtype=None, mtp: bool = True) -> list[AttnCache]:
        """One AttnCache per layer (then one per MTP block when `mtp`), preallocated for max_len tokens."""
        p = next(self.parameters())
        device, dtype = device or p.device, dtype or p.dtype
        blocks = list(self.layers) + (list(self.mtp) if mtp else [])
        return [blk.attn.new_cache(batch, max_len, device, dtype) for blk in blocks]


def init_weights(model: Transformer, std: float = 0.02, seed: int | None = 0) -> Transformer:
    """Random init for training from scratch: N(0, std) matrices, unit norms, zero sinks/biases/ape,
    hc maps as HF does (fn ~ N(0, std), base 0, scale 1), and a balanced deterministic hash table."""
    g = torch.Generator().manual_seed(seed or 0)
    cfg = model.cfg
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf in ("attn_sink", "ape", "bias") or name.endswith("_base"):
                p.zero_()
            elif name.endswith("_scale"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(balanced_hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.num_experts_per_tok,
                                              seed=int(name.split(".")[1])))
    return model


def balanced_hash_table(vocab: int, n_experts: int, k: int, seed: int = 0) -> torch.Tensor:
    """tid2eid [vocab, k]: each token gets k distinct experts; over the vocabulary every expert is used
    equally often (±1). Deterministic in (vocab, n_experts, k, seed)."""
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(n_experts, generator=g)
    tok = torch.arange(vocab)[:, None]
    slots = (tok * k + torch.arange(k)[None]) % n_experts        # round-robin: k consecutive, distinct experts
    return perm[slots].to(torch.int32)
