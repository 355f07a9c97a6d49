"""`dsv4 demo`: the whole tool in a few minutes on any machine, no download.

    1. describe the model (dsv4 info)          3. load the checkpoint back and generate a sample
    2. train it with the V4 recipe              4. dissect it (dsv4 inspect -> report.html)
       on the embedded corpus

On a CPU the 'tiny' preset trains on UTF-8 bytes of Python's own standard library; with a GPU the 'small' preset
(the real V4 tokenizer's vocabulary) trains instead. Everything lands in --out (default runs/demo); running the
demo again reuses a finished training run unless --fresh is given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

# per device kind: model preset and the training run (progressive sequence length as in the V4 recipe)
PLANS = {
    "cpu": {"model": "tiny", "steps": 450, "batch": 8, "seq": 256, "lr": 3e-3, "warmup": 30,
            "seq_schedule": [[0, 64], [200, 128], [350, 256]], "eval_every": 75, "save_every": 150},
    "cuda": {"model": "small", "steps": 400, "batch": 16, "seq": 512, "lr": 3e-3, "warmup": 40,
             "seq_schedule": [[0, 128], [150, 256], [300, 512]], "eval_every": 100, "save_every": 200},
}
SAMPLE_PROMPT = "def "


def _rule(title: str) -> None:
    print(f"\n── {title} " + "─" * max(0, 76 - len(title)), flush=True)


def _loss_curve(log_file: Path) -> list[dict]:
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "step" in r]


def _print_curve(rows: list[dict], points: int = 7) -> None:
    picks = sorted({rows[round(i * (len(rows) - 1) / (points - 1))]["step"] for i in range(points)})
    by_step = {r["step"]: r for r in rows}
    print(f"  {'step':>6} {'seq':>5} {'lm loss':>9} {'val loss':>9} {'tok/s':>8}")
    for s in picks:
        r = by_step[s]
        val = f"{r['val_loss']:9.4f}" if "val_loss" in r else " " * 9
        print(f"  {s:>6} {r.get('seq', ''):>5} {r['lm']:9.4f} {val} {r.get('tok_per_s', 0):8.0f}")


def cli_main(argv: list[str]) -> None:
    """One dsv4 command as a step of the demo; its failure (already reported on stderr) stops the demo."""
    from .cli import main
    code = main(argv)
    if code:
        raise ValueError(f"the step `dsv4 {' '.join(argv)}` failed (exit {code})")


def cmd_demo(args) -> int:
    from .train.trainer import TrainConfig, Trainer
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    plan = dict(PLANS["cuda" if device.startswith("cuda") else "cpu"])
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        scale = args.steps / plan["steps"]          # keep the schedule's phases at the same fractions
        plan["seq_schedule"] = [[int(s * scale), n] for s, n in plan["seq_schedule"]]
        plan["steps"] = args.steps
    out = Path(args.out)
    train_dir = out / "train"
    if args.fresh and train_dir.exists():
        shutil.rmtree(train_dir)
    t0 = time.perf_counter()
    print(f"dsv4 demo: {plan['model']} preset on {device}; everything goes to {out}/")

    _rule(f"1/4  the model (dsv4 info {plan['model']})")
    cli_main(["info", plan["model"]])

    _rule(f"2/4  training with the V4 recipe ({plan['steps']} steps, embedded corpus)")
    print("  Muon (hybrid Newton-Schulz) + AdamW, next-token + MTP loss, aux-loss-free bias balancing, sequence "
          "balance loss,\n  the CSA indexers' KL loss, anticipatory routing on loss spikes, progressive sequence length "
          + " → ".join(str(n) for _, n in plan["seq_schedule"]))
    tc = TrainConfig.from_dict({**plan, "out_dir": str(train_dir), "device": device, "progress": not args.quiet})
    trainer = Trainer(tc)
    resumed = trainer.resume()
    if resumed and trainer.step >= tc.steps:
        print(f"  reusing the finished run in {train_dir} (--fresh to train again)")
    trainer.fit()
    ckpt = trainer.latest_checkpoint()
    rows = _loss_curve(trainer.out / "log.jsonl")
    if rows:
        _print_curve(rows)
        first, last = rows[0], rows[-1]
        val = next((r["val_loss"] for r in reversed(rows) if "val_loss" in r), None)
        print(f"  next-token loss {first['lm']:.3f} → {last['lm']:.3f} nats/token"
              + (f" (validation {val:.3f})" if val is not None else ""))
    print(f"  checkpoint (official tensor layout): {ckpt}")
    del trainer

    _rule("3/4  generating from the checkpoint (compressed KV cache, sampled at temperature 0.8)")
    import dsv4
    from .inference.commands import _stream
    from .tokenizer import tokenizer_for_checkpoint
    model = dsv4.load(ckpt, device=device, progress=False)
    tok = tokenizer_for_checkpoint(ckpt, model.cfg.vocab_size)
    print(f"  prompt {SAMPLE_PROMPT!r}, continued by the model:\n")
    print(SAMPLE_PROMPT, end="", flush=True)
    sample = argparse.Namespace(max_new_tokens=args.sample_tokens, temperature=0.8, top_p=0.95, seed=0)
    _stream(model, tok, tok.encode(SAMPLE_PROMPT, add_bos=True), sample)
    del model

    report = out / "inspect"
    if not args.skip_inspect:
        _rule("4/4  dissecting it (dsv4 inspect: sinks, hc-copy CKA, effective rank, experts, attention mass)")
        cli_main(["inspect", "--ckpt", str(ckpt), "--out", str(report), "--max-tokens", "256", "--device", device]
                 + (["--quiet"] if args.quiet else []))

    _rule(f"done in {time.perf_counter() - t0:.0f} s")
    print(f"  training log     {train_dir / 'log.jsonl'}  (TensorBoard: tensorboard --logdir {train_dir})")
    print(f"  checkpoint       {ckpt}")
    if not args.skip_inspect:
        print(f"  inspect report   {report / 'report.html'}  (data: {report / 'report.json'})")
    print(f"  next             dsv4 generate --ckpt {ckpt} --prompt 'import '\n"
          f"                   dsv4 train --preset {plan['model']} --steps 2000 --out runs/longer")
    return 0


def register(sub) -> None:
    s = sub.add_parser("demo", help="train a small V4 on the embedded corpus, sample from it, dissect it",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--out", default="runs/demo", help="where the run, checkpoint and report go (default runs/demo)")
    s.add_argument("--steps", type=int, default=None, help="training steps (default 450 on CPU, 400 on GPU)")
    s.add_argument("--device", default="auto", help="cpu, cuda … (default: cuda if available)")
    s.add_argument("--sample-tokens", type=int, default=200, help="tokens to generate (default 200)")
    s.add_argument("--fresh", action="store_true", help="train from scratch even if OUT holds a finished run")
    s.add_argument("--skip-inspect", action="store_true", help="stop after the sample")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_demo)
