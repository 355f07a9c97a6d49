"""`dsv4 inspect`: run the built-in (or given) prompts through a checkpoint — or a random preset model — with the
dissection hooks on, and write report.json, report.html and the figures to --out."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def _device_dtype(args):
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype if args.dtype != "auto" else ("bf16" if str(device).startswith("cuda") else "fp32")]
    return device, dtype


def _model_and_tokenizer(args):
    import dsv4
    from ..tokenizer import ByteTokenizer, load_tokenizer, tokenizer_for_checkpoint
    device, dtype = _device_dtype(args)
    if args.ckpt:
        ckpt = Path(args.ckpt)
        if not (ckpt / "config.json").exists():
            raise FileNotFoundError(f"{ckpt} is not a DeepSeek-V4 checkpoint directory (no config.json)")
        model = dsv4.load(ckpt, device=device, dtype=dtype, numerics=args.numerics, progress=True)
        source = {"checkpoint": str(ckpt), "random_weights": False}
    else:
        model = dsv4.build(args.preset, seed=args.seed, device=device, dtype=dtype).eval()
        if args.numerics:
            model.set_numerics(args.numerics)
        source = {"preset": args.preset, "seed": args.seed, "random_weights": True}
    if args.ckpt:
        tok = tokenizer_for_checkpoint(args.ckpt, model.cfg.vocab_size)
    else:
        tok = load_tokenizer() if model.cfg.vocab_size >= 129280 else ByteTokenizer()
    tok_name = "bytes" if isinstance(tok, ByteTokenizer) else "v4"
    if model.cfg.vocab_size < len(tok):
        raise ValueError(f"the model's vocabulary ({model.cfg.vocab_size}) is smaller than the {tok_name} "
                         f"tokenizer's ({len(tok)}); no tokenizer fits it")
    meta = {**source, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "numerics": model.numerics, "tokenizer": tok_name}
    return model, tok, meta


def cmd_inspect(args) -> int:
    from .capture import ALL
    from .prompts import BUILTIN, load_prompts, parse_modes
    from .report import write_report
    from .runner import inspect_model
    if not args.ckpt and not args.preset:
        raise ValueError("give a checkpoint with --ckpt DIR, or --preset NAME for a random model (e.g. tiny)")
    if args.ckpt and args.preset:
        raise ValueError("--ckpt and --preset exclude each other")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    modes = parse_modes(args.modes)
    what = [w.strip() for w in args.what.split(",") if w.strip()] if args.what else list(ALL)
    prompts = load_prompts(args.prompts) if args.prompts else list(BUILTIN)
    t0 = time.time()
    model, tok, meta = _model_and_tokenizer(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif meta["device"] == "cpu" and sum(p.numel() for p in model.parameters()) < 100_000_000:
        torch.set_num_threads(1)     # small models: thread start-up and barriers cost more than they give
    print(f"dsv4 inspect: {len(prompts)} prompts × {len(modes)} modes on {meta['device']} "
          f"({model.cfg.num_hidden_layers} layers)", file=sys.stderr)
    rep = inspect_model(model, tok, prompts, modes, args.max_tokens, what, progress=not args.quiet, meta=meta,
                        gram_tokens=args.gram_tokens, sink_z=args.sink_z)
    paths = write_report(rep, args.out)
    print(f"wrote {paths['json']} and {paths['html']} ({len(paths) - 2} figures) in {time.time() - t0:.1f} s")
    for line in rep["summary_text"]:
        print("  " + line)
    return 0


def register(sub) -> None:
    s = sub.add_parser("inspect", help="dissect a model: sinks, hc-copy CKA, rank, routing, attention mass -> report",
                       description="Hook every block, gate and attention layer while running a prompt set "
                                   "(built-in: 5 short + 2 long prompts, as in the published V4-Flash study) and "
                                   "write report.json, report.html and PNG figures. docs/inspect.md explains "
                                   "every number.")
    src = s.add_argument_group("model (one of)")
    src.add_argument("--ckpt", help="checkpoint directory (config.json + *.safetensors)")
    src.add_argument("--preset", help="random model from a preset instead (tiny, small, ...): try the tool quickly")
    s.add_argument("--out", required=True, help="output directory (created)")
    s.add_argument("--prompts", help=".json / .jsonl ({name, text}) or text file with prompts separated by '---' "
                                     "lines (default: the built-in set)")
    s.add_argument("--modes", default="chat,thinking", help="comma-separated: raw, chat, thinking (default "
                                                            "chat,thinking)")
    s.add_argument("--max-tokens", type=int, default=None, help="shorten longer prompts to this many tokens")
    s.add_argument("--what", default=None, help="comma-separated capture targets (default all: blocks, gates, "
                                                "attention, indexer, mhc, logit_lens)")
    s.add_argument("--gram-tokens", type=int, default=1024,
                   help="positions (evenly spaced) entering CKA / effective rank (default 1024)")
    s.add_argument("--sink-z", type=float, default=6.0, help="robust z-score for secondary sinks (default 6)")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    s.add_argument("--numerics", default=None, choices=["plain", "official"],
                   help="default: official for FP8/FP4 checkpoints, plain otherwise")
    s.add_argument("--seed", type=int, default=0, help="weights seed with --preset")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice; 1 for models under 100M parameters on CPU)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_inspect)
