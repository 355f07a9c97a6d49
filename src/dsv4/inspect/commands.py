"""`dsv4 inspect`: run the built-in (or given) prompts through a checkpoint — or a random preset model — with the
dissection hooks on, and write report.json, report.html and the figures to --out."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _device_dtype(args):
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype if args.dtype != "auto" else ("bf16" if str(device).startswith("cuda") else "fp32")]
    return device, dtype


def _model_and_tokenizer(args, layerwise: bool = False):
    """(model, tokenizer, meta); with `layerwise` the model is a LayerwiseModel (blocks read one at a time)."""
    import dsv4
    from .layerwise import LayerwiseModel
    device, dtype = _device_dtype(args)
    if args.ckpt:
        ckpt = Path(args.ckpt)
        if not (ckpt / "config.json").exists():
            raise FileNotFoundError(f"{ckpt} is not a DeepSeek-V4 checkpoint directory (no config.json)")
        if layerwise:
            model = LayerwiseModel(ckpt, device=device, dtype=dtype, numerics=args.numerics)
        else:
            model = dsv4.load(ckpt, device=device, dtype=dtype, numerics=args.numerics, progress=True)
        source = {"checkpoint": str(ckpt), "random_weights": False}
    else:
        model = dsv4.build(args.preset, seed=args.seed, device=device, dtype=dtype).eval()
        if args.numerics:
            model.set_numerics(args.numerics)
        source = {"preset": args.preset, "seed": args.seed, "random_weights": True}
    tok, tok_name = _tokenizer(args, model.cfg)
    numerics = model.model.numerics if layerwise else model.numerics
    meta = {**source, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "numerics": numerics, "tokenizer": tok_name}
    return model, tok, meta


def _tokenizer(args, cfg):
    from ..tokenizer import ByteTokenizer, load_tokenizer, tokenizer_for_checkpoint
    if args.ckpt:
        tok = tokenizer_for_checkpoint(args.ckpt, cfg.vocab_size)
    else:
        tok = load_tokenizer() if cfg.vocab_size >= 129280 else ByteTokenizer()
    tok_name = "bytes" if isinstance(tok, ByteTokenizer) else "v4"
    if cfg.vocab_size < len(tok):
        raise ValueError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than the {tok_name} "
                         f"tokenizer's ({len(tok)}); no tokenizer fits it")
    return tok, tok_name


_FIT = 0.9      # a whole model must fit in this share of the free memory; the rest is for activations


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB"


def _choose_layerwise(args) -> bool:
    """--layerwise / --no-layerwise as given; otherwise layer by layer when the checkpoint, loaded in the run's
    dtype, needs more than 90% of the device's free memory (CUDA: free GPU memory; CPU: available host memory).
    Prints the decision and the memory plan to stderr whenever it runs layer by layer."""
    from ..config import ModelConfig
    from .layerwise import free_memory, memory_plan, skeleton
    if args.layerwise and not args.ckpt:
        raise ValueError("--layerwise reads a checkpoint block by block: give --ckpt DIR")
    if not args.ckpt or args.layerwise is False:
        return False
    device, dtype = _device_dtype(args)
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt} is not a DeepSeek-V4 checkpoint directory (no config.json)")
    plan = memory_plan(skeleton(ModelConfig.from_json(ckpt / "config.json")), dtype)
    free = free_memory(device)
    dt = str(dtype).removeprefix("torch.")
    step = (f"largest layer {_gb(plan['max_layer'])} + {_gb(plan['resident'])} resident (embedding, head) "
            f"+ activations")
    if args.layerwise is None:
        if free is None or plan["total"] <= _FIT * free:
            return False
        print(f"dsv4 inspect: the checkpoint needs {_gb(plan['total'])} as {dt}, {device} has {_gb(free)} free: "
              f"running layer by layer ({step}); --no-layerwise loads it whole", file=sys.stderr)
    else:
        print(f"dsv4 inspect: layer by layer: {step}"
              + (f"; {device} has {_gb(free)} free" if free is not None else ""), file=sys.stderr)
    if free is not None and plan["max_layer"] + plan["resident"] > free:
        print(f"dsv4 inspect: warning: even one layer ({step}) may not fit in the {_gb(free)} free on {device}",
              file=sys.stderr)
    return True


def cmd_inspect(args) -> int:
    from .capture import ALL
    from .prompts import BUILTIN, load_prompts, parse_modes
    from .report import write_report
    from .layerwise import inspect_layerwise
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
    layerwise = _choose_layerwise(args)
    model, tok, meta = _model_and_tokenizer(args, layerwise)
    net = model.model if layerwise else model
    if args.threads:
        torch.set_num_threads(args.threads)
    elif meta["device"] == "cpu" and sum(p.numel() for p in net.parameters()) < 100_000_000:
        torch.set_num_threads(1)     # small models: thread start-up and barriers cost more than they give
    print(f"dsv4 inspect: {len(prompts)} prompts × {len(modes)} modes on {meta['device']} "
          f"({net.cfg.num_hidden_layers} layers{', layer by layer' if layerwise else ''})", file=sys.stderr)
    options = dict(progress=not args.quiet, meta=meta, gram_tokens=args.gram_tokens, sink_z=args.sink_z)
    if layerwise:
        with model:
            rep = inspect_layerwise(model, tok, prompts, modes, args.max_tokens, what, **options)
    else:
        rep = inspect_model(model, tok, prompts, modes, args.max_tokens, what, **options)
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
    s.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=None,
                   help="read the checkpoint one block at a time (peak memory: one layer + embedding/head + "
                        "activations) for models larger than the device; default: automatically when the "
                        "checkpoint in --dtype needs more than 90%% of the free device memory")
    s.add_argument("--seed", type=int, default=0, help="weights seed with --preset")
    s.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice; 1 for models under 100M parameters on CPU)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_inspect)
