"""Layer-by-layer inspection: checkpoints larger than the device (DeepSeek-V4-Flash: 284B parameters, ~570 GB in
bf16) are dissected one block at a time.

    from dsv4.inspect.layerwise import inspect_layerwise
    rep = inspect_layerwise("DeepSeek-V4-Flash", tokenizer, device="cuda", dtype=torch.bfloat16)

The model is built on the meta device; the embedding, final norm, output head and hyper-head (what the logit
lens needs) are read once and stay resident; then for each layer i only `layers.{i}.*` is read from the
safetensors (FP8 / FP4 dequantised on the way, see dsv4.checkpoint.CheckpointReader), every prompt × mode's
residual streams [1, s, hc, D] pass through that block with the capture hooks on, and the block goes back to the
meta device before the next one is read. Peak device memory: the largest block + the resident parts + the
streams of all runs + one hook's temporaries. The records equal those of `inspect_model` on the whole model (same
kernels in the same order); the MTP blocks are never read (inspection does not use them).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..checkpoint import CheckpointReader
from ..config import ModelConfig
from ..model import Transformer
from .analyze import build_report
from .capture import ALL, capture
from .prompts import BUILTIN, Prompt
from .runner import _decoder, encode_runs

_PER_LAYER = ("layers.", "mtp.")


def skeleton(cfg: ModelConfig) -> Transformer:
    """The model on the meta device (no memory)."""
    with torch.device("meta"):
        return Transformer(cfg)


def memory_plan(model: Transformer, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes of the model's tensors once loaded in `dtype` (integer buffers keep theirs): `total` (whole model,
    MTP included), `resident` (embedding, norm, head, hyper-head), `layers` (one entry per block), `max_layer`.
    Works on a meta skeleton."""
    size = torch.tensor([], dtype=dtype).element_size()
    resident, layers, mtp = 0, [0] * len(model.layers), 0
    for name, t in model.state_dict(keep_vars=True).items():
        b = t.numel() * (size if t.is_floating_point() else t.element_size())
        if name.startswith("layers."):
            layers[int(name.split(".")[1])] += b
        elif name.startswith("mtp."):
            mtp += b
        else:
            resident += b
    return {"total": resident + sum(layers) + mtp, "resident": resident, "layers": layers,
            "max_layer": max(layers, default=0)}


def free_memory(device) -> int | None:
    """Free bytes on `device`: CUDA's free memory, or the host's available memory for the CPU (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
    return None


class LayerwiseModel:
    """A checkpoint as a meta-device Transformer whose embedding, final norm, head and hyper-head are resident on
    `device`; `with lw.block(i) as blk:` materialises block i (read from the files) and frees it on exit.
    numerics: as for dsv4.load (default 'official' for FP8 / FP4 checkpoints). Close it (or use `with`) to
    release the file handles."""

    def __init__(self, path, device="cpu", dtype: torch.dtype = torch.float32, numerics: str | None = None):
        from .. import _materialize_derived_buffers
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a DeepSeek-V4 checkpoint directory (no config.json)")
        cfg = ModelConfig.from_json(self.path / "config.json")
        self.model = skeleton(cfg)
        self.reader = CheckpointReader(self.model, self.path, dtype=dtype, device=device)
        self.device, self.dtype = self.reader.device, dtype
        try:
            self.reader.load_into(self.model, [n for n in self.reader.names() if not n.startswith(_PER_LAYER)])
            _materialize_derived_buffers(self.model, self.device)       # RoPE frequencies, MoE load: small
            self.model.eval().set_numerics(numerics or ("official" if cfg.quantized else "plain"))
        except BaseException:
            self.reader.close()
            raise
        self.plan = memory_plan(self.model, dtype)

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    def __enter__(self) -> "LayerwiseModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()

    def loaded_layers(self) -> list[int]:
        """Indices of the blocks holding any real (non-meta) parameter or buffer right now."""
        return [i for i, blk in enumerate(self.model.layers)
                if any(not t.is_meta for t in blk.state_dict(keep_vars=True).values())]

    @contextmanager
    def block(self, i: int):
        """Block i with its weights on the device inside the `with`, back on the meta device after it."""
        names = self.reader.names(f"layers.{i}.")
        blk = self.model.layers[i]
        try:
            self.reader.load_into(self.model, names)
            if blk.ffn._grouped(torch.empty(0, dtype=self.dtype, device=self.device)):
                blk.ffn.stacked = blk.ffn.stack_experts(self.dtype)   # grouped GEMMs: stack once, not per run
            yield blk
        finally:
            blk.ffn.stacked = blk.ffn.last_counts = None
            self.reader.unload(self.model, names)


@torch.no_grad()
def inspect_layerwise(ckpt, tokenizer, prompts: Sequence[Prompt] = BUILTIN,
                      modes: Iterable[str] = ("chat", "thinking"), max_tokens: int | None = None,
                      what: Iterable[str] = ALL, progress: bool = False, meta: dict | None = None,
                      device="cpu", dtype: torch.dtype = torch.float32, numerics: str | None = None,
                      **capture_options) -> dict:
    """`inspect_model` for a checkpoint directory (or an open LayerwiseModel) read one block at a time.

    All runs advance together: embed every prompt × mode, then per layer load the block, pass every run's streams
    through it under the capture hooks, free the block. progress: one bar ticking per layer. The report's
    numbers equal inspect_model's on the fully loaded model; meta gains `layerwise: true` and, on CUDA, the
    peak device memory (`peak_device_gb`)."""
    own = not isinstance(ckpt, LayerwiseModel)
    lw = LayerwiseModel(ckpt, device, dtype, numerics) if own else ckpt
    try:
        model, dev = lw.model, lw.device
        modes = list(modes)
        runs = encode_runs(tokenizer, prompts, modes, max_tokens, model.cfg.vocab_size)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        with capture(model, what, progress=False, **capture_options) as cap:
            curs = [cap.start(ids, p.name, mode, dev) for p, mode, ids in runs]
            hs = [model.embed(c["ids_dev"][None]).unsqueeze(2).repeat(1, 1, model.n_streams, 1) for c in curs]
            from tqdm.auto import tqdm
            bar = tqdm(range(len(model.layers)), desc=f"{lw.path.name} layer by layer", unit="layer",
                       disable=not progress)
            for i in bar:
                bar.set_postfix_str(f"layer {i}: reading")
                with lw.block(i) as blk:
                    bar.set_postfix_str(f"layer {i}: {len(curs)} runs")
                    for k, cur in enumerate(curs):
                        with cap.recording(cur):
                            hs[k] = blk(hs[k], cur["ids_dev"][None], 0, None)
            bar.close()
            for cur, h in zip(curs, hs):
                cap.finish(cur, model._logits(h, model, model.norm))
            del hs
        info = {"layerwise": True}
        if dev.type == "cuda":
            info["peak_device_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        meta = {"prompts": len(prompts), "modes": ",".join(modes), "max_tokens": max_tokens, **info,
                **(meta or {})}
        return build_report(cap.records, model.cfg, meta=meta, decode=_decoder(tokenizer))
    finally:
        if own:
            lw.close()
