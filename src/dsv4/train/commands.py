"""`dsv4 train`: the V4 recipe from the command line, on one CPU/GPU or under torchrun (FSDP2)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

EXAMPLES = """\
examples:
  dsv4 train --preset tiny --steps 200                       # CPU, embedded corpus (Python's stdlib source)
  dsv4 train --config runs.toml --data corpus/ --out runs/a  # your files: .txt .md .py .rst .jsonl .parquet
  dsv4 train --preset tiny --residual plain --optimizer adamw --out runs/ablate   # ablations
  torchrun --nproc-per-node 8 -m dsv4 train --preset small --batch 64 --out runs/s # FSDP2 over 8 GPUs

A config file (.toml or .json) holds TrainConfig fields (see docs/training.md), e.g.
  model = "small"
  steps = 2000
  batch = 32
  seq = 512
  seq_schedule = [[0, 128], [500, 512]]
  [ablation]
  residual = "hc"
Flags override the file; --set KEY=VALUE sets any field (VALUE parsed as JSON when it can be).
By default a run resumes from OUT/latest when it exists (--no-resume starts over, --resume-from DIR picks one)."""


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1): one process group from the env vars, NCCL on GPUs, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        if torch.cuda.is_available():
            local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=local)
        else:
            dist.init_process_group("gloo")
    return True


def _overrides(args) -> dict:
    from .trainer import TrainError
    ov = {"model": args.model or args.preset, "out_dir": args.out, "steps": args.steps, "batch": args.batch,
          "seq": args.seq, "lr": args.lr, "device": args.device, "dtype": args.dtype, "optimizer": args.optimizer,
          "seed": args.seed, "grad_accum": args.grad_accum, "warmup": args.warmup, "eval_every": args.eval_every,
          "save_every": args.save_every, "tokenizer": args.tokenizer, "data": args.data or None,
          "compile": args.compile, "cuda_graph": args.cuda_graph}
    if args.no_progress:
        ov["progress"] = False
    ablation = {k: v for k, v in (("residual", args.residual), ("attention", args.attention),
                                  ("hc_mult", args.hc_mult)) if v is not None}
    for item in args.set or []:
        key, sep, val = item.partition("=")
        if not sep:
            raise TrainError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            ov[key.strip()] = json.loads(val)
        except json.JSONDecodeError:
            ov[key.strip()] = val
    if ablation:
        ov["ablation"] = {**(ov.get("ablation") or {}), **ablation}
    return {k: v for k, v in ov.items() if v is not None}


def cmd_train(args) -> int:
    from ..config import param_counts
    from ..model.mhc import set_fusion
    from .trainer import TrainConfig, Trainer
    if args.fusion:
        try:
            switches = set_fusion(args.fusion)
        except ValueError as e:
            print(f"dsv4 train: --fusion: {e}", file=sys.stderr)
            return 2
    dist = _init_distributed()
    try:
        ov = _overrides(args)
        if args.config:
            tc = TrainConfig.from_file(args.config, **ov)
            if "ablation" in ov:                           # merge the flags into the file's ablation table
                file_ab = TrainConfig.from_file(args.config).ablation
                tc.ablation = {**file_ab, **ov["ablation"]}
        else:
            tc = TrainConfig.from_dict(ov)
        trainer = Trainer(tc)
        main = trainer.rank == 0
        resumed = False
        if args.resume_from:
            resumed = trainer.resume(args.resume_from)
        elif args.resume:
            resumed = trainer.resume()
        if main:
            pc = param_counts(trainer.cfg)
            print(f"dsv4 train: model {tc.model} ({pc['total'] / 1e6:.2f}M parameters, {pc['active'] / 1e6:.2f}M "
                  f"active), {trainer.world} process(es) on {trainer.device}, optimizer {tc.optimizer}, "
                  f"{trainer.loader.n_tokens:,} training tokens in {trainer.shard_dir}")
            print(f"  {'resumed at step ' + str(trainer.step) if resumed else 'starting at step 0'}; "
                  f"{tc.steps} steps of {tc.batch}×{tc.grad_accum} sequences; logs in {trainer.out / 'log.jsonl'}")
            if tc.compile:
                print("  blocks compiled with torch.compile (the first steps include the compile)"
                      if trainer.device.type == "cuda" else "  --compile applies to CUDA only: ignored on the CPU")
            if args.fusion:
                print(f"  mHC switches: {', '.join(k + '=' + str(int(v)) for k, v in switches.items())}")
            if tc.cuda_graph:
                print("  each micro-step replayed from a CUDA graph (per sequence length, after 2 eager warm-up steps)"
                      if trainer.device.type == "cuda" else "  --cuda-graph applies to CUDA only: ignored on the CPU")
        try:
            hist = trainer.fit()
        except KeyboardInterrupt:
            if not dist and trainer.step > 0:
                print(f"\ninterrupted: saving {trainer.save()}", file=sys.stderr)
            raise
        if main:
            if hist:
                last = hist[-1]
                val = f", val loss {last['val_loss']:.4f}" if "val_loss" in last else ""
                print(f"done: step {last['step']}, loss {last['loss']:.4f} (lm {last['lm']:.4f}){val}")
            else:
                print(f"nothing to do: already at step {trainer.step} of {tc.steps}")
            ckpt = trainer.latest_checkpoint()
            if ckpt is not None:
                hint = "" if trainer.tokenizer_name == "bytes" else f"  (dsv4 generate --ckpt {ckpt} --prompt ...)"
                print(f"checkpoint: {ckpt}{hint}")
        return 0
    finally:
        if dist:
            torch.distributed.destroy_process_group()


def register(sub) -> None:
    s = sub.add_parser("train", help="train a DeepSeek-V4 model (Muon, MTP, bias balancing, FSDP2 under torchrun)",
                       description="Train with the V4 recipe: Muon + AdamW, next-token + MTP + sequence-balance "
                                   "losses, the CSA indexers' KL loss against the main attention, aux-loss-free "
                                   "bias balancing, anticipatory routing on loss spikes, progressive sequence "
                                   "length, bit-exact resumable checkpoints.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", help="TOML or JSON file of training settings")
    s.add_argument("--preset", help="model preset: tiny, tiny-official, small, flash, pro (default tiny)")
    s.add_argument("--model", help="model config.json / checkpoint directory instead of a preset")
    s.add_argument("--data", nargs="+", metavar="PATH", help="files or folders (.txt .md .py .rst .jsonl .parquet); "
                                                             "default: the embedded corpus")
    s.add_argument("--tokenizer", help="auto (default: bytes if the vocabulary < 129280), v4, bytes, or a path")
    s.add_argument("--out", help="run directory: checkpoints, log.jsonl, token shards (default runs/train)")
    s.add_argument("--steps", type=int)
    s.add_argument("--batch", type=int, help="global sequences per micro-step (split across processes)")
    s.add_argument("--seq", type=int, help="sequence length (see seq_schedule for progressive length)")
    s.add_argument("--lr", type=float, help="peak learning rate (Muon and AdamW share it)")
    s.add_argument("--warmup", type=int)
    s.add_argument("--grad-accum", type=int)
    s.add_argument("--optimizer", choices=["muon", "adamw"])
    s.add_argument("--residual", choices=["mhc", "hc", "plain"], help="ablation: residual connection kind")
    s.add_argument("--attention", choices=["hybrid", "dense"], help="ablation: attention kind")
    s.add_argument("--hc-mult", type=int, help="ablation: number of residual streams")
    s.add_argument("--eval-every", type=int)
    s.add_argument("--save-every", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 …")
    s.add_argument("--dtype", choices=["auto", "fp32", "bf16"])
    s.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/latest if it exists (default: yes)")
    s.add_argument("--resume-from", metavar="DIR", help="continue from this step_XXXXXXX directory")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="any training setting, e.g. --set "
                                                                       "mtp_weight=0.1 (repeatable)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    s.add_argument("--compile", action="store_true", default=None,
                   help="CUDA: torch.compile every block (a one-off compile of a few minutes, then about twice the "
                        "tokens/s at small batches; ignored on the CPU)")
    s.add_argument("--cuda-graph", action="store_true", default=None,
                   help="CUDA, one process: capture each micro-step (forward + backward) in a CUDA graph and "
                        "replay it, so the CPU no longer paces the GPU's thousands of small kernels; one capture per sequence "
                        "length after 2 eager steps; needs bf16 (the default on a GPU); ignored on the CPU")
    s.add_argument("--fusion", metavar="NAME=0|1,…", default="",
                   help="mHC fast-path switches (dsv4.model.mhc.Fusion), e.g. pre_kernel=0,expand_kernel=0 to turn off "
                        "the Triton kernels for the whole mHC pre and expand steps (CUDA, on by default under "
                        "autograd; equal results; H200 A/B: +5.6%% tok/s at b2x4096 with --compile --cuda-graph), "
                        "or mix_kernel=1 (off by default: no gain in training)")
    s.set_defaults(fn=cmd_train)
