"""Build Hugging Face transformers' DeepseekV4ForCausalLM from a dsv4 model's weights (official layout on disk),
so tests compare the two implementations on identical random weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4.config import ModelConfig

_KIND = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def hf_config_dict(cfg: ModelConfig) -> dict:
    n = cfg.num_hidden_layers
    ratios = cfg.compress_ratios[:n]
    hca = sorted({r for r in ratios if r not in (0, 4)})
    assert len(hca) <= 1, "transformers supports one HCA ratio per model"
    rs = cfg.rope_scaling or {}
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": n,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "q_lora_rank": cfg.q_lora_rank, "o_lora_rank": cfg.o_lora_rank,
        "o_groups": cfg.o_groups, "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
        "routed_scaling_factor": cfg.routed_scaling_factor, "scoring_func": cfg.scoring_func,
        "norm_topk_prob": True, "num_hash_layers": cfg.num_hash_layers, "swiglu_limit": cfg.swiglu_limit,
        "layer_types": [_KIND.get(r, "heavily_compressed_attention") for r in ratios],
        "compress_rates": {"compressed_sparse_attention": 4,
                           "heavily_compressed_attention": hca[0] if hca else 128},
        "sliding_window": cfg.sliding_window, "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk, "rope_theta": cfg.rope_theta,
        "compress_rope_theta": cfg.compress_rope_theta,
        "rope_parameters": {"rope_type": "yarn", "factor": rs["factor"],
                            "original_max_position_embeddings": rs["original_max_position_embeddings"],
                            "beta_fast": rs["beta_fast"], "beta_slow": rs["beta_slow"]} if rs else None,
        "max_position_embeddings": cfg.max_position_embeddings, "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps, "rms_norm_eps": cfg.rms_norm_eps,
        "num_nextn_predict_layers": 0, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def write_official(model, path: Path) -> None:
    """Main-model tensors in the official naming (MTP dropped: transformers has none)."""
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.cfg)))


def hf_model_from(model, path: Path):
    from transformers import DeepseekV4ForCausalLM
    write_official(model, path)
    hf = DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    hf.eval()
    return hf
