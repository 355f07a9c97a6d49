"""`dsv4 train`: one loop for one CPU and many GPUs (torchrun + FSDP2), with the V4 recipe.

Resume is bit-exact: model, optimizer, loader position, RNG states, balancing and spike-detector state are
all in the checkpoint, which is written atomically (temporary directory, then rename).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, load_config
from ..model import Transformer, init_weights
from .recipe import AnticipatoryRouting, SpikeDetector, compute_loss, lr_at, seq_len_at, update_gate_biases


class TrainError(ValueError):
    """Bad training settings or files (the message names which)."""


@dataclass
class TrainConfig:
    model: str = "tiny"                     # preset name or config.json path
    out_dir: str = "runs/train"
    data: list[str] = field(default_factory=list)   # text files/folders; empty = the embedded corpus
    data_limit_mb: float = 4.0              # embedded corpus size cap
    steps: int = 200
    batch: int = 8
    seq: int = 128
    seq_schedule: list = field(default_factory=list)  # [[from_step, seq_len], …] progressive length
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"                # cosine | wsd | constant
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    optimizer: str = "muon"                 # muon | adamw
    mtp_weight: float = 0.3
    balance_weight: float = 1e-4
    bias_update_speed: float = 1e-3
    anticipatory: bool = True
    anticipatory_delta: int = 10
    anticipatory_duration: int = 20
    spike_k: float = 4.0
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 100
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"                     # auto = bf16 autocast on GPU, fp32 on CPU
    ablation: dict = field(default_factory=dict)   # ModelConfig overrides: residual, attention, hc_mult, …
    progress: bool = True

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        p = Path(path)
        if not p.exists():
            raise TrainError(f"training config {p} does not exist")
        if p.suffix == ".toml":
            import tomllib
            d = tomllib.loads(p.read_text())
        else:
            d = json.loads(p.read_text())
        return cls.from_dict({**d, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def _device(tc: TrainConfig) -> torch.device:
    if tc.device != "auto":
        return torch.device(tc.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Trainer:
    def __init__(self, tc: TrainConfig):
        self.tc = tc
        self.dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.dist else 0
        self.world = torch.distributed.get_world_size() if self.dist else 1
        self.device = _device(tc)
        self.out = Path(tc.out_dir)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)

        cfg = load_config(tc.model)
        if tc.ablation:
            cfg = cfg.replace(**tc.ablation)
        if cfg.quantized:
            cfg = cfg.replace(quantization_config=None, expert_dtype=None)   # training uses plain numerics
        self.cfg: ModelConfig = cfg
        self.model = init_weights(Transformer(cfg), seed=tc.seed).to(self.device)
        self.model.train()
        self.autocast = (self.device.type == "cuda" and tc.dtype in ("auto", "bf16"))
        if self.dist:
            self._shard()

        from .optim import build_optimizer
        self.opt = build_optimizer(self.model, lr=tc.lr, weight_decay=tc.weight_decay, muon=tc.optimizer == "muon")
        self.routing = AnticipatoryRouting(self.model, tc.anticipatory_delta, tc.anticipatory_duration,
                                           SpikeDetector(k=tc.spike_k)) if tc.anticipatory else None
        self.step = 0
        self.tokens_seen = 0
        self._build_data()

    # ------------------------------------------------------------------------------------------ setup
    def _shard(self) -> None:
        """FSDP2: every block (and the MTP block) sharded separately, then the root."""
        from torch.distributed.fsdp import fully_shard
        for blk in list(self.model.layers) + list(self.model.mtp):
            fully_shard(blk)
        fully_shard(self.model)

    def _build_data(self) -> None:
        from ..tokenizer import load_tokenizer
        from .data import TokenLoader, build_shards, default_corpus_files
        shard_dir = self.out / "data"
        if not (shard_dir / "meta.json").exists():
            if self.rank == 0:
                files = self.tc.data or default_corpus_files(limit_bytes=int(self.tc.data_limit_mb * 2 ** 20))
                build_shards(files, shard_dir, load_tokenizer())
            if self.dist:
                torch.distributed.barrier()
        self.shard_dir = shard_dir
        self.loader = TokenLoader(shard_dir, self.tc.batch, self.tc.seq, seed=self.tc.seed, rank=self.rank,
                                  world=self.world, split="train")

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": self.opt.state_dict(),
                "loader": self.loader.state_dict(), "rng": _rng_state(),
                "detector": self.routing.detector.state_dict() if self.routing else None,
                "gate_load": {n: b.clone() for n, b in self.model.named_buffers() if n.endswith(".load")},
                "train_config": dataclasses.asdict(self.tc)}

    def save(self) -> Path:
        """Atomic checkpoint: official-layout weights + trainer state in a temp dir, renamed into place."""
        from ..checkpoint import save_state
        final = self.out / f"step_{self.step:07d}"
        tmp = self.out / f".tmp_step_{self.step:07d}"
        sd = self._full_state_dict()
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            save_state(sd, tmp, self.cfg.to_dict())
            torch.save(self.state_dict(), tmp / "trainer_state.pt")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            (self.out / "latest").write_text(final.name)
        if self.dist:
            torch.distributed.barrier()
        return final

    def _full_state_dict(self) -> dict:
        if not self.dist:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def resume(self, ckpt: str | Path | None = None) -> bool:
        """Load the given checkpoint directory, or the latest one under out_dir. False if there is none."""
        from ..checkpoint import load_state_into
        if ckpt is None:
            latest = self.out / "latest"
            if not latest.exists():
                return False
            ckpt = self.out / latest.read_text().strip()
        ckpt = Path(ckpt)
        if not (ckpt / "trainer_state.pt").exists():
            raise TrainError(f"{ckpt} is not a training checkpoint (no trainer_state.pt)")
        if self.dist:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            tmp = Transformer(self.cfg)
            load_state_into(tmp, ckpt, dtype=torch.float32, progress=False)
            set_model_state_dict(self.model, tmp.state_dict(), options=StateDictOptions(full_state_dict=True))
        else:
            load_state_into(self.model, ckpt, dtype=next(self.model.parameters()).dtype, device=self.device,
                            progress=False)
        st = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        self.step, self.tokens_seen = st["step"], st["tokens_seen"]
        self.opt.load_state_dict(st["optimizer"])
        self.loader.load_state_dict(st["loader"])
        _set_rng_state(st["rng"])
        if self.routing and st["detector"] is not None:
            self.routing.detector.load_state_dict(st["detector"])
        bufs = dict(self.model.named_buffers())
        for n, v in st["gate_load"].items():
            bufs[n].copy_(v)
        return True

    # ------------------------------------------------------------------------------------------ loop
    @torch.no_grad()
    def evaluate(self) -> float:
        from .data import TokenLoader
        self.model.eval()
        val = TokenLoader(self.shard_dir, self.tc.batch, self.tc.seq, seed=1234, rank=self.rank, world=self.world,
                          split="val")
        losses = []
        for _ in range(self.tc.eval_batches):
            x, y = next(val)
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
                losses.append(float(compute_loss(self.model, x, y, 0.0, 0.0).lm))
        self.model.train()
        return sum(losses) / len(losses)

    def train_step(self) -> dict:
        tc = self.tc
        seq = seq_len_at(self.step, [tuple(s) for s in tc.seq_schedule], tc.seq)
        if seq != self.loader.seq:
            self.loader.set_seq(seq)
        lr = lr_at(self.step, tc.steps, tc.lr, tc.warmup, tc.schedule, tc.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.opt.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "balance": 0.0}
        for _ in range(tc.grad_accum):
            x, y = next(self.loader)
            x, y = x.to(self.device), y.to(self.device)
            with torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
                parts = compute_loss(self.model, x, y, tc.mtp_weight, tc.balance_weight)
            (parts.total / tc.grad_accum).backward()
            totals["loss"] += float(parts.total) / tc.grad_accum
            totals["lm"] += float(parts.lm) / tc.grad_accum
            totals["mtp"] += float(parts.mtp or 0.0) / tc.grad_accum
            totals["balance"] += float(parts.balance or 0.0) / tc.grad_accum
            self.tokens_seen += x.numel() * self.world
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        viol = update_gate_biases(self.model, tc.bias_update_speed)
        event = None
        if self.routing:
            self.routing.snapshot()
            event = self.routing.observe(self.step, totals["lm"])
        self.step += 1
        return {"step": self.step, **totals, "lr": lr, "grad_norm": float(gnorm), "seq": seq,
                "max_violation": viol, "anticipatory": event, "tokens": self.tokens_seen}

    def fit(self, on_log=None) -> list[dict]:
        tc = self.tc
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "log.jsonl"
        history = []
        bar = None
        if tc.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step")
        t0, tok0 = time.time(), self.tokens_seen
        with open(log_path, "a") as log:
            while self.step < tc.steps:
                rec = self.train_step()
                if not math.isfinite(rec["loss"]):
                    raise TrainError(f"loss became {rec['loss']} at step {rec['step']}; lower the learning rate")
                rec["tok_per_s"] = (self.tokens_seen - tok0) / max(time.time() - t0, 1e-9)
                if tc.eval_every and self.step % tc.eval_every == 0:
                    rec["val_loss"] = self.evaluate()
                history.append(rec)
                if self.rank == 0:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if bar:
                        bar.update(1)
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}")
                    if rec["anticipatory"] and bar:
                        bar.write(f"step {rec['step']}: anticipatory routing {rec['anticipatory']}")
                if on_log:
                    on_log(rec)
                if tc.save_every and self.step % tc.save_every == 0:
                    self.save()
        if bar:
            bar.close()
        return history
