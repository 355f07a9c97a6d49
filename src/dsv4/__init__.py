"""dsv4 — DeepSeek-V4 in plain, fast PyTorch: run it, train it, dissect it.

    import dsv4
    model = dsv4.load("path/to/checkpoint")          # official layout; FP8/FP4 dequantised on load
    logits = model(input_ids)                        # [batch, seq, vocab]
    new_ids = dsv4.generate(model, prompt_ids, max_new_tokens=64)
    with dsv4.inspect.capture(model) as cap: ...    # dissection hooks (docs/inspect.md)
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ConfigError, ModelConfig, load_config, param_counts, preset
from .inference.generate import generate, generate_speculative
from .model import Transformer, init_weights

__version__ = "0.1.0"


def build(config: str | Path | ModelConfig, seed: int | None = 0, device="cpu", dtype=torch.float32) -> Transformer:
    """A randomly initialised model from a preset name, a config.json path or a ModelConfig."""
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    return init_weights(Transformer(cfg), seed=seed).to(device=device, dtype=dtype)


def load(path: str | Path, device="cpu", dtype=torch.float32, numerics: str | None = None,
         progress: bool = True) -> Transformer:
    """Load a checkpoint directory (config.json + *.safetensors in the official naming). The model is built
    on the meta device and filled tensor by tensor, so host memory never holds the checkpoint twice.
    numerics: 'plain' or 'official'; default 'official' when the config carries a quantization_config."""
    from .checkpoint import load_state_into
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_json(path / "config.json")
    with torch.device("meta"):
        model = Transformer(cfg)
    load_state_into(model, path, dtype=dtype, device=device, progress=progress)
    _materialize_derived_buffers(model, device)
    model.eval()
    return model.set_numerics(numerics or ("official" if cfg.quantized else "plain"))


def save(model: Transformer, path: str | Path, fmt: str = "plain") -> None:
    """Write the model in the official layout (fmt='official' stores FP8 / FP4 weights as the hub files do)."""
    from .checkpoint import save_state
    save_state(model.state_dict(), path, model.cfg.to_dict(), fmt=fmt)


def _materialize_derived_buffers(model: Transformer, device) -> None:
    """Non-persistent buffers are not in checkpoints: rebuild them on the target device."""
    from .model.layers import Rotary
    from .model.moe import MoE
    for m in model.modules():
        if isinstance(m, Rotary):
            m.reset(device)
        elif isinstance(m, MoE):
            m.load = torch.zeros(m.n_experts, device=device)


def __getattr__(name: str):
    """`dsv4.inspect` (the dissection tools) is imported on first use: it pulls in matplotlib."""
    if name == "inspect":
        import importlib
        return importlib.import_module(".inspect", __name__)
    raise AttributeError(f"module 'dsv4' has no attribute {name!r}")


__all__ = ["ConfigError", "ModelConfig", "Transformer", "build", "generate", "generate_speculative", "init_weights",
           "load", "load_config", "param_counts", "preset", "save"]
