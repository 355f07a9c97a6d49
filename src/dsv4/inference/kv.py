"""KV-cache size from the config alone, per layer type, and the comparison with a V3.2-style MLA cache."""
from __future__ import annotations

from ..config import ModelConfig


def layer_cache_values(cfg: ModelConfig, layer_id: int, context: int) -> dict[str, int]:
    """Values (not bytes) held by one layer's preallocated decode cache for `context` tokens
    (what `Attention.new_cache` allocates per sequence)."""
    d, r = cfg.head_dim, cfg.compress_ratios[layer_id]
    out = {"window": min(cfg.sliding_window, context) * d, "compressed": 0, "indexer": 0}
    if r:
        out["compressed"] = (context // r) * d
        if r == 4:
            out["indexer"] = (context // r) * cfg.index_head_dim
    return out


def kv_report(cfg: ModelConfig, context: int, bytes_per_value: float = 2.0, include_mtp: bool = False) -> dict:
    """Bytes per layer type and in total for one sequence of `context` tokens."""
    n = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if include_mtp else 0)
    by_kind: dict[str, dict] = {}
    total = 0
    for i in range(n):
        kind = cfg.layer_kind(i)
        vals = layer_cache_values(cfg, i, context)
        b = sum(vals.values()) * bytes_per_value
        e = by_kind.setdefault(kind, {"layers": 0, "bytes": 0.0, "bytes_per_layer": b})
        e["layers"] += 1
        e["bytes"] += b
        total += b
    return {"context": context, "bytes_per_value": bytes_per_value, "by_kind": by_kind, "total_bytes": total}


def mla_v32_bytes(cfg: ModelConfig, context: int, kv_lora_rank: int = 512, rope_dim: int = 64,
                  index_head_dim: int = 128, bytes_per_value: float = 2.0) -> float:
    """A DeepSeek-V3.2-style cache for the same depth: every layer keeps, for every token, the MLA latent
    (kv_lora_rank + rope_dim values) plus one lightning-indexer key (index_head_dim values)."""
    per_token = kv_lora_rank + rope_dim + index_head_dim
    return cfg.num_hidden_layers * context * per_token * bytes_per_value


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.2f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.2f} TiB"
