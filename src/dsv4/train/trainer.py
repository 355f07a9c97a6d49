"""`dsv4 train`: one loop for one CPU and for many GPUs (torchrun + FSDP2), with the V4 recipe.

Batches: `batch` is the GLOBAL number of sequences per micro-step; each of the `world` processes takes
batch / world of them (disjoint windows, see data.py), so one process and many see the same data per step.

Checkpoints: out_dir/step_XXXXXXX/ holds the model in the official layout (config.json + safetensors, so
`dsv4.load` / `dsv4 generate` read it directly), trainer_state.pt (step, balancing, anticipatory routing,
spike detector, config) and rank_R.pt per process (optimizer shards, loader position, RNG states). The
directory is written under a temporary name and renamed into place; `latest` then names it. Resume is
bit-exact and needs the same number of processes (the optimizer state is sharded the same way).

FSDP2: every main block is its own `fully_shard` unit; the root unit holds the embedding, head, final norm,
hc head and the MTP block (the MTP block's projections run outside its own forward in
`Transformer.mtp_forward`, so it must stay unsharded for the whole root forward). With several processes on
one host the checkpoint directory is shared; across hosts out_dir must be on a shared filesystem.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..compiling import compile_blocks
from ..config import ModelConfig, load_config
from ..model import Transformer, init_weights
from .graphed import GraphError, GraphedStep
from .recipe import (AnticipatoryRouting, SpikeDetector, compute_loss, dense_expert_grads, lr_at, seq_len_at,
                     update_gate_biases)

# what a step logs of its loss, in the order `_micro_loss` returns them after the backward's start
LOSS_PARTS = ("loss", "lm", "mtp", "balance", "indexer")


class TrainError(ValueError):
    """Bad training settings or files (the message names which)."""


@dataclass
class TrainConfig:
    model: str = "tiny"                     # preset name or config.json path
    out_dir: str = "runs/train"
    data: list[str] = field(default_factory=list)   # files/folders (.txt .md .py .rst .jsonl .parquet); [] = embedded corpus
    data_dir: str = ""                      # where token shards go ("" = out_dir/data); rebuilt when the data change
    data_limit_mb: float = 4.0              # embedded corpus size cap
    tokenizer: str = "auto"                 # auto | v4 | bytes | path to tokenizer.json (auto: bytes if vocab < 129280)
    val_fraction: float = 0.02              # share of documents held out for validation
    steps: int = 200
    batch: int = 8                          # global sequences per micro-step (split over processes)
    seq: int = 128
    seq_schedule: list = field(default_factory=list)  # [[from_step, seq_len], …] progressive length
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    schedule: str = "cosine"                # cosine | wsd | constant
    weight_decay: float = 0.1
    grad_clip: float = 1.0                  # 0 = off
    optimizer: str = "muon"                 # muon (Muon + AdamW, the V4 recipe) | adamw (ablation)
    mtp_weight: float = 0.3
    balance_weight: float = 1e-4
    indexer_weight: float = 1.0             # CSA indexers' KL loss against the main attention (0: they stay frozen)
    bias_update_speed: float = 1e-3
    anticipatory: bool = True
    anticipatory_delta: int = 10
    anticipatory_duration: int = 20
    spike_k: float = 4.0
    spike_window: int = 50
    spike_warmup: int = 20
    eval_every: int = 50                    # 0 = never
    eval_batches: int = 4
    save_every: int = 100                   # 0 = never (a checkpoint is also written at the last step)
    keep_checkpoints: int = 3               # newest step_* directories kept (0 = all)
    log_every: int = 10                     # progress-bar refresh of the loss; every step goes to log.jsonl
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"                     # auto = bf16 autocast on GPU, fp32 on CPU | fp32 | bf16
    ablation: dict = field(default_factory=dict)   # ModelConfig overrides: residual, attention, hc_mult, …
    progress: bool = True
    tensorboard: bool = True                # also write TensorBoard events when torch.utils.tensorboard works
    compile: bool = False                   # CUDA: torch.compile every block (fewer, fused kernels; ~2x tok/s at batch 1)
    cuda_graph: bool = False                # CUDA, one process: micro-steps replayed from a CUDA graph (graphed.py)

    _CHOICES = {"schedule": ("cosine", "wsd", "constant"), "optimizer": ("muon", "adamw"),
                "dtype": ("auto", "fp32", "bf16")}

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """A .toml or .json file of TrainConfig fields; `overrides` (not None) win."""
        p = Path(path)
        if not p.is_file():
            raise TrainError(f"training config {p} does not exist")
        try:
            if p.suffix == ".toml":
                import tomllib
                d = tomllib.loads(p.read_text())
            else:
                d = json.loads(p.read_text())
        except Exception as e:   # tomllib / json errors
            raise TrainError(f"{p}: cannot parse ({e})") from None
        try:
            return cls.from_dict({**d, **{k: v for k, v in overrides.items() if v is not None}})
        except TrainError as e:
            raise TrainError(f"{p}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d).validate()

    def validate(self) -> "TrainConfig":
        types = {f.name: f.type for f in dataclasses.fields(self)}
        for name, typ in types.items():
            v = getattr(self, name)
            want = {"int": int, "float": (int, float), "str": str, "bool": bool, "dict": dict}.get(typ)
            if typ.startswith("list"):
                want = list
            if want and (not isinstance(v, want) or (want is int and isinstance(v, bool))):
                raise TrainError(f"training setting '{name}' must be {typ}, got {v!r}")
        for name, allowed in self._CHOICES.items():
            if getattr(self, name) not in allowed:
                raise TrainError(f"training setting '{name}' = {getattr(self, name)!r}; choose from {allowed}")
        for name in ("steps", "batch", "seq", "grad_accum"):
            if getattr(self, name) < 1:
                raise TrainError(f"training setting '{name}' must be ≥ 1, got {getattr(self, name)}")
        for name in ("mtp_weight", "balance_weight", "indexer_weight"):
            if getattr(self, name) < 0:
                raise TrainError(f"training setting '{name}' is a loss weight and must be ≥ 0 (0 = that loss off), "
                                 f"got {getattr(self, name)}")
        for item in self.seq_schedule:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, int) for x in item)):
                raise TrainError(f"seq_schedule entries are [from_step, seq_len] pairs of ints, got {item!r}")
        if isinstance(self.data, str):
            self.data = [self.data]
        return self


def _device(tc: TrainConfig) -> torch.device:
    """'auto' -> this process's GPU (LOCAL_RANK under torchrun) or the CPU; 'cuda' without an index gets the same
    index (torch.cuda.set_device needs one)."""
    dev = torch.device("cuda" if tc.device == "auto" and torch.cuda.is_available() else
                       "cpu" if tc.device == "auto" else tc.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def _reproducible(method):
    """On the CPU, the call runs with PyTorch's deterministic kernels: some CPU kernels PyTorch marks
    nondeterministic (index_put with accumulate, the backward of the gathers) sum in an order that depends on the
    threads, so two runs — or a run and its resumption — drifted apart in the last bits (seen with 2 threads at
    batch 8 × 256; identical with 1 thread or with these kernels). GPUs keep their kernels (the attention
    backward adds with atomics anyway)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if self.device.type != "cpu":
            return method(self, *args, **kwargs)
        prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
    return run


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


def _scalar(t) -> float:
    t = t.full_tensor() if type(t).__name__ == "DTensor" else t
    return float(t)


class Throughput:
    """Tokens per second over the last `window` steps, evaluation excluded: a cumulative rate would carry the
    compile and the CUDA-graph warm-up of the first steps for the whole run (on the H100 a `--compile --cuda-graph`
    run logged 1.8K tok/s after 40 steps that ran at 113K)."""

    def __init__(self, window: int = 10):
        self.steps: collections.deque = collections.deque(maxlen=window)      # (tokens, seconds) per step

    def add(self, tokens: int, seconds: float) -> float:
        self.steps.append((tokens, seconds))
        return sum(t for t, _ in self.steps) / max(sum(s for _, s in self.steps), 1e-9)


class Trainer:
    def __init__(self, tc: TrainConfig):
        self.tc = tc.validate()
        self.dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = torch.distributed.get_rank() if self.dist else 0
        self.world = torch.distributed.get_world_size() if self.dist else 1
        if tc.batch % self.world:
            raise TrainError(f"batch {tc.batch} (global) is not divisible by the {self.world} processes")
        self.device = _device(tc)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = Path(tc.out_dir)
        torch.manual_seed(tc.seed)
        random.seed(tc.seed)

        cfg = load_config(tc.model)
        try:
            cfg = cfg.replace(**tc.ablation) if tc.ablation else cfg
        except TypeError as e:
            raise TrainError(f"ablation: {e} (keys must be ModelConfig fields)") from None
        if cfg.quantized:
            cfg = cfg.replace(quantization_config=None, expert_dtype=None)   # training uses plain numerics
        self.cfg: ModelConfig = cfg
        self.model = init_weights(Transformer(cfg), seed=tc.seed).to(self.device)
        self.model.train()
        self._hooks = dense_expert_grads(self.model)
        amp = tc.dtype == "bf16" or (tc.dtype == "auto" and self.device.type == "cuda")
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=amp)
        if self.dist:
            self._shard()
        if tc.compile and self.device.type == "cuda":
            compile_blocks(self.model)

        self.graphed = None
        if tc.cuda_graph and self.device.type == "cuda":
            if self.dist:
                raise TrainError("cuda_graph runs in one process (FSDP2's collectives are not captured): "
                                 "train on one GPU or without --cuda-graph")
            self.graphed = GraphedStep(self.model, self._micro_loss, warmup=2,
                                       check_inputs=lambda x, y: self.model._check_ids(x),
                                       accumulate=tc.grad_accum > 1)    # one micro-step: the graph writes them

        from .optim import build_optimizer
        self.opt = build_optimizer(self.model, lr=tc.lr, weight_decay=tc.weight_decay, muon=tc.optimizer == "muon")
        self.routing = AnticipatoryRouting(
            self.model, tc.anticipatory_delta, tc.anticipatory_duration,
            SpikeDetector(window=tc.spike_window, k=tc.spike_k, warmup=tc.spike_warmup)) if tc.anticipatory else None
        self.step = 0
        self.tokens_seen = 0
        self._build_data()

    # ------------------------------------------------------------------------------------------ setup
    def _shard(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        # explicit mesh on the model's device type: left alone, FSDP2 picks CUDA whenever a GPU exists
        mesh = init_device_mesh(self.device.type, (self.world,))
        for blk in self.model.layers:
            fully_shard(blk, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        register_fsdp_forward_method(self.model, "mtp_forward")

    def _build_data(self) -> None:
        from .data import DataError, TokenLoader, build_shards, default_corpus_files, expand_files, fingerprint, \
            read_meta, tokenizer_for
        tc = self.tc
        shard_dir = Path(tc.data_dir) if tc.data_dir else self.out / "data"
        try:
            if self.rank == 0:
                tok = tokenizer_for(tc.tokenizer, self.cfg.vocab_size)
                files = expand_files(tc.data) if tc.data else default_corpus_files(int(tc.data_limit_mb * 2 ** 20))
                fp = fingerprint(files, tok, tc.val_fraction)
                meta = read_meta(shard_dir) if (shard_dir / "meta.json").exists() else {}
                if meta.get("fingerprint") != fp:
                    build_shards(files, shard_dir, tok, val_fraction=tc.val_fraction, progress=tc.progress)
            if self.dist:
                torch.distributed.barrier()
            meta = read_meta(shard_dir)
            if meta["vocab_size"] > self.cfg.vocab_size:
                raise TrainError(f"shards in {shard_dir} use {meta['vocab_size']} token ids but the model's "
                                 f"vocab_size is {self.cfg.vocab_size}")
            self.shard_dir = shard_dir
            self.tokenizer_name = meta["tokenizer"]
            self.loader = TokenLoader(shard_dir, tc.batch // self.world, tc.seq, seed=tc.seed, rank=self.rank,
                                      world=self.world, split="train")
        except DataError as e:
            raise TrainError(str(e)) from None
        if tc.eval_every:
            self._val_loader(max([tc.seq] + [s for _, s in tc.seq_schedule]))   # fail now, not mid-run

    # ------------------------------------------------------------------------------------------ state
    def _common_state(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "world": self.world,
                "routing": self.routing.state_dict() if self.routing else None,
                "gate_load": {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()
                              if n.endswith(".load")},
                "train_config": dataclasses.asdict(self.tc)}

    def _rank_state(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "loader": self.loader.state_dict(), "rng": _rng_state()}

    def _full_state_dict(self) -> dict:
        if not self.dist:
            return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self) -> Path:
        """Write step_XXXXXXX (see the module docstring) and point `latest` at it."""
        from ..checkpoint import save_state
        final = self.out / f"step_{self.step:07d}"
        tmp = self.out / f".partial_step_{self.step:07d}"
        sd = self._full_state_dict()                       # collective under FSDP2: every rank calls it
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            # the tokenizer the shards were made with, so tools can tell byte-level models apart
            save_state(sd, tmp, {**self.cfg.to_dict(), "dsv4_tokenizer": self.tokenizer_name})
            torch.save(self._common_state(), tmp / "trainer_state.pt")
        self._barrier()
        torch.save(self._rank_state(), tmp / f"rank_{self.rank}.pt")
        self._barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            latest_tmp = self.out / ".latest.tmp"
            latest_tmp.write_text(final.name + "\n")
            os.replace(latest_tmp, self.out / "latest")
            self._prune()
        self._barrier()
        return final

    def _prune(self) -> None:
        keep = self.tc.keep_checkpoints
        steps = sorted(self.out.glob("step_[0-9]*"))
        for old in steps[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)

    def _barrier(self) -> None:
        if self.dist:
            torch.distributed.barrier()

    def latest_checkpoint(self) -> Path | None:
        latest = self.out / "latest"
        if not latest.exists():
            return None
        return self.out / latest.read_text().strip()

    def resume(self, ckpt: str | Path | None = None) -> bool:
        """Load checkpoint directory `ckpt`, or the one `latest` names under out_dir. False if there is none."""
        from ..checkpoint import load_state_into
        if ckpt is None:
            ckpt = self.latest_checkpoint()
            if ckpt is None:
                return False
        ckpt = Path(ckpt)
        if not (ckpt / "trainer_state.pt").exists():
            raise TrainError(f"{ckpt} is not a training checkpoint (no trainer_state.pt)")
        common = torch.load(ckpt / "trainer_state.pt", weights_only=False, map_location="cpu")
        if common["world"] != self.world:
            raise TrainError(f"{ckpt} was written by {common['world']} process(es), this run has {self.world}; "
                             "resume with the same number of processes")
        rank_file = ckpt / f"rank_{self.rank}.pt"
        if not rank_file.exists():
            raise TrainError(f"{ckpt} has no {rank_file.name} (incomplete checkpoint?)")
        if self.dist:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            with torch.device("meta"):
                full = Transformer(self.cfg)
            load_state_into(full, ckpt, dtype=torch.float32, device="cpu", progress=False)
            set_model_state_dict(self.model, full.state_dict(), options=StateDictOptions(full_state_dict=True))
        else:
            load_state_into(self.model, ckpt, dtype=next(self.model.parameters()).dtype, device=self.device,
                            progress=False)
        st = torch.load(rank_file, weights_only=False, map_location="cpu")
        self.step, self.tokens_seen = common["step"], common["tokens_seen"]
        self.opt.load_state_dict(st["optimizer"])
        self.loader.load_state_dict(st["loader"])
        _set_rng_state(st["rng"])
        if self.routing and common["routing"] is not None:
            self.routing.load_state_dict(common["routing"])
        bufs = dict(self.model.named_buffers())
        for n, v in common["gate_load"].items():
            bufs[n].copy_(v)
        return True

    # ------------------------------------------------------------------------------------------ loop
    def _mean(self, x: float) -> float:
        """Mean of a per-process number over all processes."""
        if not self.dist:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t) / self.world

    def _val_loader(self, seq: int):
        """The validation batches (the same ones at every evaluation); the batch shrinks when the held-out
        split is small, an error only if it cannot fill one window per process."""
        from .data import DataError, TokenLoader, read_meta
        n_tokens = read_meta(self.shard_dir)["splits"]["val"]["tokens"]
        per_rank = min(self.tc.batch // self.world, max(0, (n_tokens - 1) // seq) // self.world)
        try:
            return TokenLoader(self.shard_dir, max(1, per_rank), seq, seed=1234, rank=self.rank, world=self.world,
                               split="val")
        except DataError as e:
            raise TrainError(f"validation: {e}; or set eval_every = 0") from None

    @_reproducible
    @torch.no_grad()
    def evaluate(self) -> float:
        val = self._val_loader(self.loader.seq)
        self.model.eval()
        losses = []
        for _ in range(self.tc.eval_batches):
            x, y = next(val)
            with torch.autocast(**self.autocast):
                parts = compute_loss(self.model, x.to(self.device), y.to(self.device), 0.0, 0.0, 0.0)
                losses.append(float(parts.lm))
        self.model.train()
        return self._mean(sum(losses) / len(losses))

    @_reproducible
    def train_step(self) -> dict:
        tc = self.tc
        seq = seq_len_at(self.step, [tuple(s) for s in tc.seq_schedule], tc.seq)
        if seq != self.loader.seq:
            self.loader.set_seq(seq)
        lr = lr_at(self.step, tc.steps, tc.lr, tc.warmup, tc.schedule, tc.min_lr_ratio)
        for group in self.opt.param_groups:
            group["lr"] = lr
        # a CUDA graph that adds into the gradients it holds (grad_accum > 1) needs them zeroed, not dropped
        self.opt.zero_grad(set_to_none=self.graphed is None or not self.graphed.accumulate)
        totals = dict.fromkeys(LOSS_PARTS, 0.0)
        for _ in range(tc.grad_accum):
            x, y = next(self.loader)
            x, y = x.to(self.device), y.to(self.device)
            outs = self._micro_step(x, y)
            for k, v in zip(LOSS_PARTS, outs[1:]):
                totals[k] += float(v) / tc.grad_accum
            self.tokens_seen += x.numel() * self.world
        totals = {k: self._mean(v) for k, v in totals.items()}       # the global batch's numbers
        if tc.grad_clip > 0:
            gnorm = _scalar(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
        else:
            gnorm = math.sqrt(sum(_scalar(p.grad.detach().float().square().sum())
                                  for p in self.model.parameters() if p.grad is not None))
        self.opt.step()
        viol = update_gate_biases(self.model, tc.bias_update_speed)
        event = None
        if self.routing:
            self.routing.snapshot()
            event = self.routing.observe(self.step, totals["lm"])
        self.step += 1
        return {"step": self.step, **totals, "lr": lr, "grad_norm": gnorm, "seq": seq,
                "max_violation": viol, "anticipatory": event, "tokens": self.tokens_seen}

    def _micro_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (total / grad_accum: what the backward starts from, then LOSS_PARTS); absent parts are 0."""
        tc = self.tc
        with torch.autocast(**self.autocast):
            parts = compute_loss(self.model, x, y, tc.mtp_weight, tc.balance_weight, tc.indexer_weight)
        zero = torch.zeros((), device=parts.total.device)
        return (parts.total / tc.grad_accum, parts.total,
                *(zero if v is None else v for v in (parts.lm, parts.mtp, parts.balance, parts.indexer)))

    def _micro_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Forward + backward of one micro-batch (gradients added into .grad) -> `_micro_loss`'s values,
        detached. From a CUDA graph with --cuda-graph, except while anticipatory routing selects experts with
        older gate parameters (new tensors every step; those steps run eagerly)."""
        routing_lag = self.routing is not None and self.routing.active
        if self.graphed is not None and not routing_lag:
            try:
                return self.graphed(x, y)
            except GraphError as e:
                warnings.warn(f"dsv4 train: {e}; going on without the CUDA graph", RuntimeWarning, stacklevel=2)
                self.graphed = None
        outs = self._micro_loss(x, y)
        outs[0].backward()
        return tuple(o.detach() for o in outs)          # no graph kept alive past its backward

    def _open_logs(self):
        """log.jsonl (records after the resumed step are dropped: they are about to be redone) and TensorBoard."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "log.jsonl"
        if path.exists() and self.rank == 0:
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in keep))
        tb = None
        if self.tc.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                tb = SummaryWriter(str(self.out / "tb"))
            except Exception:            # tensorboard not installed: JSONL only
                tb = None
        return open(path, "a") if self.rank == 0 else None, tb

    def fit(self, on_log=None) -> list[dict]:
        """Train until tc.steps; returns this call's per-step records (also in out_dir/log.jsonl)."""
        tc = self.tc
        log, tb = self._open_logs()
        history = []
        bar = None
        if tc.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=tc.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        rate = Throughput()
        try:
            while self.step < tc.steps:
                t0, tok0 = time.perf_counter(), self.tokens_seen
                rec = self.train_step()
                if not math.isfinite(rec["loss"]):
                    raise TrainError(f"loss became {rec['loss']} at step {rec['step']}; lower the learning rate")
                rec["tok_per_s"] = rate.add(self.tokens_seen - tok0, time.perf_counter() - t0)
                last = self.step == tc.steps
                if tc.eval_every and (self.step % tc.eval_every == 0 or last):
                    rec["val_loss"] = self.evaluate()
                history.append(rec)
                if self.rank == 0:
                    log.write(json.dumps(rec) + "\n")
                    log.flush()
                    if tb:
                        for k in (*LOSS_PARTS, "lr", "grad_norm", "max_violation", "tok_per_s", "val_loss"):
                            if k in rec:
                                tb.add_scalar(f"train/{k}", rec[k], rec["step"])
                    if bar:
                        bar.update(1)
                        if self.step % max(1, tc.log_every) == 0 or last or "val_loss" in rec:
                            post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tok_per_s']:.0f}"}
                            if "val_loss" in rec:
                                post["val"] = f"{rec['val_loss']:.3f}"
                            bar.set_postfix(post)
                        if rec["anticipatory"]:
                            bar.write(f"step {rec['step']}: anticipatory routing {rec['anticipatory']}")
                if on_log:
                    on_log(rec)
                if tc.save_every and (self.step % tc.save_every == 0 or last):
                    self.save()
        finally:
            if bar:
                bar.close()
            if log:
                log.close()
            if tb:
                tb.close()
        return history
