"""`dsv4` command line: info, kv, generate, chat, train, inspect, demo."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config, param_counts


def _fmt_count(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def cmd_info(args) -> int:
    from .inference.kv import human, kv_report
    cfg = load_config(args.config)
    pc = param_counts(cfg)
    print(f"DeepSeek-V4 config: {args.config}")
    print(f"  parameters: total {_fmt_count(pc['total'])} ({pc['total']:,}), active per token "
          f"{_fmt_count(pc['active'])} ({pc['active']:,}), MTP {_fmt_count(pc['mtp'])}")
    print(f"  hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers} (+{cfg.num_nextn_predict_layers} MTP), "
          f"heads {cfg.num_attention_heads} x {cfg.head_dim} (rope {cfg.qk_rope_head_dim}), hc_mult {cfg.hc_mult}")
    print(f"  experts {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared, "
          f"hash-routed layers {cfg.num_hash_layers}")
    sched = "".join({"sliding": "S", "csa": "C", "hca": "H"}[cfg.layer_kind(i)] for i in range(cfg.num_hidden_layers))
    print(f"  layer schedule (S sliding-{cfg.sliding_window}, C CSA m=4 top-{cfg.index_topk}, H HCA): {sched}")
    per_tok = sum(cfg.kv_bytes_per_token(i) for i in range(cfg.num_hidden_layers))
    print(f"  KV cache: {per_tok:.1f} bytes/token (bf16, compressed part) + "
          f"{human(kv_report(cfg, cfg.sliding_window)['total_bytes'])} of sliding windows per sequence")
    print(f"  numerics default: {'official (FP8/FP4 checkpoint)' if cfg.quantized else 'plain'}")
    return 0


def cmd_kv(args) -> int:
    from .inference.kv import human, kv_report, mla_v32_bytes
    cfg = load_config(args.config)
    rep = kv_report(cfg, args.context, args.bytes_per_value)
    print(f"KV cache for one sequence of {args.context:,} tokens ({args.bytes_per_value:g} bytes/value):")
    print(f"  {'layer type':<10} {'layers':>6} {'per layer':>12} {'total':>12}")
    for kind, e in rep["by_kind"].items():
        print(f"  {kind:<10} {e['layers']:>6} {human(e['bytes_per_layer']):>12} {human(e['bytes']):>12}")
    print(f"  {'total':<10} {'':>6} {'':>12} {human(rep['total_bytes']):>12}")
    mla = mla_v32_bytes(cfg, args.context, bytes_per_value=args.bytes_per_value)
    print(f"V3.2-style MLA cache at the same depth (512 latent + 64 rope + 128 indexer values per token per layer): "
          f"{human(mla)} -> V4 needs {100 * rep['total_bytes'] / mla:.1f}% of it")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 in plain PyTorch: run it, train it, dissect it.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="parameter counts, layer schedule and KV bytes of a config",
                       description="CONFIG is a config.json, a checkpoint directory or a preset name "
                                   "(flash, pro, tiny, tiny-official, small).")
    s.add_argument("config")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("kv", help="KV-cache bytes per layer type at a context length, from the formula")
    s.add_argument("config", help="config.json, checkpoint directory or preset name")
    s.add_argument("--context", type=int, default=1048576, help="tokens in the sequence (default 1M)")
    s.add_argument("--bytes-per-value", type=float, default=2.0, help="2 for bf16 (default), 1 for FP8 storage")
    s.set_defaults(fn=cmd_kv)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


def _extra_commands() -> list:
    from .demo import register as demo_cmd
    from .inference.commands import register as inference_cmds
    from .inspect.commands import register as inspect_cmds
    from .train.commands import register as train_cmds
    return [demo_cmd, inference_cmds, train_cmds, inspect_cmds]


_EXTRA_COMMANDS = _extra_commands()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dsv4 {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
