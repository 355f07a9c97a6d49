"""One dataclass mirroring DeepSeek-V4's ``config.json`` (Hugging Face field names).

Why HF names: the official checkpoints ship this file, and users read it; the official ``inference/``
code uses shorter aliases (``dim``, ``n_layers`` ...) which are exposed as properties for readability.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json field is missing, unknown-valued or inconsistent (the message names it)."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    num_key_value_heads: int = 1
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_lora_rank: int = 1024
    o_groups: int = 8
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    num_hash_layers: int = 3
    swiglu_limit: float = 10.0
    # hybrid attention
    compress_ratios: list[int] = field(default_factory=lambda: [0, 0] + [4, 128] * 20 + [4, 0])
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # RoPE
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict | None = field(default_factory=lambda: {
        "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
        "beta_fast": 32, "beta_slow": 1})
    max_position_embeddings: int = 1048576
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    # MTP
    num_nextn_predict_layers: int = 1
    # misc
    hidden_act: str = "silu"
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    expert_dtype: str | None = None
    quantization_config: dict | None = None
    # dsv4 ablation switches (not in official configs; defaults = the paper's choices)
    residual: str = "mhc"          # "mhc" | "hc" (no Sinkhorn) | "plain" (ordinary residual, hc_mult forced to 1)
    attention: str = "hybrid"      # "hybrid" (per compress_ratios) | "dense" (every layer sliding-window 0 -> full causal)
    extra: dict = field(default_factory=dict, repr=False)   # unknown fields kept for round-trip

    # ------------------------------------------------------------------ official aliases
    @property
    def dim(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def rope_head_dim(self) -> int:
        return self.qk_rope_head_dim

    @property
    def window_size(self) -> int:
        return self.sliding_window

    @property
    def n_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def yarn(self) -> dict:
        """YaRN parameters used on compressed layers (factor, original_seq_len, beta_fast, beta_slow)."""
        rs = self.rope_scaling or {}
        return {
            "factor": float(rs.get("factor", 1.0)),
            "original_seq_len": int(rs.get("original_max_position_embeddings", 0)) if rs else 0,
            "beta_fast": float(rs.get("beta_fast", 32)),
            "beta_slow": float(rs.get("beta_slow", 1)),
        }

    @property
    def quantized(self) -> bool:
        """True for configs of the official FP8/FP4 (quantisation-aware-trained) checkpoints."""
        return bool(self.quantization_config)

    def layer_kind(self, layer_id: int) -> str:
        """'sliding', 'csa' (ratio 4) or 'hca' (ratio 128) for a main or MTP layer index."""
        r = self.compress_ratios[layer_id]
        return {0: "sliding", 4: "csa"}.get(r, "hca")

    # ------------------------------------------------------------------ validation
    def validate(self) -> "ModelConfig":
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{fld}': {msg}")

        n_ratio = self.num_hidden_layers + self.num_nextn_predict_layers
        need(isinstance(self.compress_ratios, (list, tuple)), "compress_ratios", "must be a list of ints")
        # Some published configs carry extra trailing entries (padding); fewer than needed is an error.
        need(len(self.compress_ratios) >= n_ratio, "compress_ratios",
             f"has {len(self.compress_ratios)} entries but num_hidden_layers + num_nextn_predict_layers = {n_ratio}")
        for i, r in enumerate(self.compress_ratios):
            need(r == 0 or (isinstance(r, int) and r > 1), "compress_ratios",
                 f"entry {i} is {r!r}; allowed: 0 (sliding window), 4 (CSA) or a ratio > 4 such as 128 (HCA)")
            need(r != 4 or self.sliding_window > 0, "compress_ratios", "CSA layers need sliding_window > 0")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "vocab_size",
                     "q_lora_rank", "o_lora_rank", "o_groups", "n_routed_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters", "index_n_heads", "index_head_dim",
                     "index_topk", "sliding_window"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name,
                 f"must be a positive integer, got {getattr(self, name)!r}")
        need(self.num_key_value_heads == 1, "num_key_value_heads", "DeepSeek-V4 uses one shared KV head (MQA)")
        need(0 < self.qk_rope_head_dim <= self.head_dim and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even and <= head_dim ({self.head_dim}), got {self.qk_rope_head_dim}")
        need(self.qk_rope_head_dim <= self.index_head_dim, "index_head_dim",
             f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim})")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups",
             f"num_attention_heads ({self.num_attention_heads}) must be divisible by o_groups ({self.o_groups})")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"{self.num_experts_per_tok} > n_routed_experts ({self.n_routed_experts})")
        need(self.scoring_func in ("sqrtsoftplus", "sigmoid", "softmax"), "scoring_func",
             f"unknown scoring function {self.scoring_func!r}")
        need(0 <= self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers",
             f"{self.num_hash_layers} not in [0, num_hidden_layers]")
        need(self.n_shared_experts in (0, 1), "n_shared_experts", "only 0 or 1 shared expert is supported")
        need(self.residual in ("mhc", "hc", "plain"), "residual", f"unknown residual kind {self.residual!r}")
        need(self.attention in ("hybrid", "dense"), "attention", f"unknown attention kind {self.attention!r}")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", None), "rope_scaling", f"only YaRN is supported, got type {kind!r}")
        if self.quantized:
            self.check_official_numerics()
        return self

    def check_official_numerics(self) -> None:
        """The official rounding works in fixed blocks: FP8 activations per 128 values, FP8 KV per 64, FP4
        indexer per 32 after a Hadamard rotation. Raise naming the field whose size does not fit."""
        def need(cond: bool, fld: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"official numerics: config field '{fld}' {msg}")
        for fld in ("hidden_size", "q_lora_rank", "moe_intermediate_size"):
            need(getattr(self, fld) % 128 == 0, fld, f"= {getattr(self, fld)} must be a multiple of 128")
        need(self.o_groups * self.o_lora_rank % 128 == 0, "o_lora_rank", "× o_groups must be a multiple of 128")
        need((self.head_dim - self.qk_rope_head_dim) % 64 == 0, "head_dim",
             "minus qk_rope_head_dim must be a multiple of 64")
        need(self.index_head_dim % 32 == 0 and self.index_head_dim & (self.index_head_dim - 1) == 0,
             "index_head_dim", "must be a power of two and a multiple of 32")

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        if "compress_ratios" in kwargs:
            kwargs["compress_ratios"] = list(kwargs["compress_ratios"])
            # transformers-style configs list the main layers only; the MTP blocks' attention is then
            # sliding-window only (ratio 0), which is what the official configs give them too
            n_main, n_mtp = kwargs.get("num_hidden_layers"), kwargs.get("num_nextn_predict_layers", 1)
            if n_main is not None and len(kwargs["compress_ratios"]) == n_main:
                kwargs["compress_ratios"] += [0] * n_mtp
        cfg = cls(**kwargs, extra=extra)
        return cfg.validate()

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config file at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.extra)
        d.setdefault("architectures", ["DeepseekV4ForCausalLM"])
        d.setdefault("model_type", "deepseek_v4")
        return d

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw).validate()

    # ------------------------------------------------------------------ accounting
    def kv_bytes_per_token(self, layer_id: int, bytes_per_value: float = 2.0) -> float:
        """Asymptotic KV-cache bytes per token for one layer (the sliding window is a constant, excluded)."""
        r = self.compress_ratios[layer_id]
        if r == 0:
            return 0.0
        per = self.head_dim / r
        if r == 4:
            per += self.index_head_dim / r
        return per * bytes_per_value


def _flash() -> ModelConfig:
    return ModelConfig(quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
                       expert_dtype="fp4").validate()


def _pro() -> ModelConfig:
    return ModelConfig(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_lora_rank=1024,
        o_groups=16, n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
        index_topk=1024, compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0],
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                             "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
        expert_dtype="fp4").validate()


def _tiny() -> ModelConfig:
    """Every layer type, hash + learned routing, binding top-k, on CPU in milliseconds."""
    return ModelConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=64,
        qk_rope_head_dim=16, q_lora_rank=32, o_lora_rank=16, o_groups=2, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=1, compress_ratios=[0, 4, 16, 4, 0, 0],
        sliding_window=8, index_n_heads=16, index_head_dim=32, index_topk=4, hc_mult=4,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=4096, torch_dtype="float32", swiglu_limit=1.0).validate()


def _small() -> ModelConfig:
    """A few-minute CPU training size (~20M parameters) with the real V4 tokenizer's vocabulary."""
    return ModelConfig(
        vocab_size=129280, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
        qk_rope_head_dim=32, q_lora_rank=128, o_lora_rank=64, o_groups=2, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=256, num_hash_layers=1, compress_ratios=[0, 4, 32, 4, 0],
        sliding_window=64, index_n_heads=4, index_head_dim=64, index_topk=16,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024,
                      "beta_fast": 32, "beta_slow": 1},
        max_position_embeddings=16384, torch_dtype="float32").validate()


def _tiny_official() -> ModelConfig:
    """The smallest sizes the official block-wise rounding accepts (128-value FP8 blocks)."""
    return _tiny().replace(hidden_size=128, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_lora_rank=64,
                           moe_intermediate_size=128, index_head_dim=64)


PRESETS = {"flash": _flash, "pro": _pro, "tiny": _tiny, "tiny-official": _tiny_official, "small": _small}


def preset(name: str) -> ModelConfig:
    """Named configs: 'flash' and 'pro' carry the official values; 'tiny'/'small' are for tests and demos."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


def load_config(spec: str | Path) -> ModelConfig:
    """A preset name, a config.json path or a checkpoint directory."""
    s = str(spec)
    if s in PRESETS:
        return preset(s)
    return ModelConfig.from_json(s)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token-active parameter counts from the config alone (MTP counted separately)."""
    D, H, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    n = cfg.hc_mult
    mix = (2 + n) * n

    def attn(layer_id: int) -> int:
        p = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * d + D * d + d + H
        p += (H * d // cfg.o_groups) * cfg.o_groups * cfg.o_lora_rank + cfg.o_groups * cfg.o_lora_rank * D
        r = cfg.compress_ratios[layer_id]
        if r:
            c = 2 if r == 4 else 1
            p += 2 * D * c * d + r * c * d + d
            if r == 4:
                ci = cfg.index_head_dim
                p += cfg.q_lora_rank * cfg.index_n_heads * ci + D * cfg.index_n_heads
                p += 2 * D * 2 * ci + r * 2 * ci + ci
        return p

    expert = 3 * D * cfg.moe_intermediate_size
    hc = 2 * (mix * n * D + mix + 3)

    def block(layer_id: int) -> tuple[int, int]:
        common = attn(layer_id) + 2 * D + hc + cfg.n_shared_experts * expert + cfg.n_routed_experts * D
        if layer_id >= cfg.num_hash_layers:
            common += cfg.n_routed_experts
        return common + cfg.n_routed_experts * expert, common + cfg.num_experts_per_tok * expert

    total = active = 0
    for i in range(cfg.num_hidden_layers):
        t, a = block(i)
        total, active = total + t, active + a
    emb_head = 2 * cfg.vocab_size * D + D + n * n * D + n + 1
    total += emb_head
    active += emb_head
    mtp_total = 0
    for j in range(cfg.num_nextn_predict_layers):
        t, _ = block(cfg.num_hidden_layers + j)
        mtp_total += t + 2 * D * D + 3 * D + n * n * D + n + 1
    return {"total": total, "active": active, "mtp": mtp_total}

