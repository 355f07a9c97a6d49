"""`dsv4 generate` and `dsv4 chat`: streaming text with the real tokenizer and the V4 chat format."""
from __future__ import annotations

import sys
from pathlib import Path

import torch


def _load(args):
    import dsv4
    from ..tokenizer import tokenizer_for_checkpoint
    ckpt = Path(args.ckpt)
    if not (ckpt / "config.json").exists():
        raise FileNotFoundError(f"{ckpt} is not a dsv4/DeepSeek-V4 checkpoint directory (no config.json)")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype if args.dtype != "auto" else
                                                             ("bf16" if device == "cuda" else "fp32")]
    model = dsv4.load(ckpt, device=device, dtype=dtype, numerics=args.numerics, progress=True)
    tok = tokenizer_for_checkpoint(ckpt, model.cfg.vocab_size)
    if args.compile:
        from .generate import StaticDecoder
        if device == "cpu":
            print("dsv4: --compile applies to the CUDA-graphed decode step; ignored on the CPU", file=sys.stderr)
        StaticDecoder.compile_step = True
    return model, tok


def _chat_ids(tok, messages: list[dict], thinking: bool) -> list[int]:
    """The V4 chat encoding; a byte-level model (tiny, from `dsv4 train`) gets the same template as bytes."""
    from ..chat import encode_chat, encode_messages
    from ..tokenizer import BOS_TOKEN
    if hasattr(tok, "token_to_id"):
        return encode_chat(tok, messages, thinking=thinking)
    return tok.encode(encode_messages(messages, thinking=thinking).removeprefix(BOS_TOKEN), add_bos=True)


def _stream(model, tok, ids: list[int], args) -> list[int]:
    from .generate import generate_stream
    limit = model.cfg.max_position_embeddings
    if len(ids) >= limit:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model accepts at most {limit}")
    n = min(args.max_new_tokens, limit - len(ids))
    dec = tok.stream_decoder(skip_special=True)
    out: list[int] = []
    for step in generate_stream(model, [ids], n, args.temperature, args.top_p, [tok.eos_id], args.seed):
        t = step[0]
        if t is None:
            continue
        out.append(t)
        if t != tok.eos_id:
            sys.stdout.write(dec.put(t))
            sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    return out


def cmd_generate(args) -> int:
    if not args.prompt.strip():
        raise ValueError("empty prompt: pass some text with --prompt")
    model, tok = _load(args)
    if args.chat or args.thinking:
        ids = _chat_ids(tok, [{"role": "user", "content": args.prompt}], args.thinking)
    else:
        ids = tok.encode(args.prompt, add_bos=True)
    if args.speculative:
        _speculative(model, tok, ids, args)
    else:
        _stream(model, tok, ids, args)
    return 0


def _speculative(model, tok, ids: list[int], args) -> None:
    """Greedy decoding with MTP self-speculation; prints the text, then the draft acceptance on stderr."""
    import time
    from .generate import generate_speculative
    if args.temperature > 0:
        raise ValueError("--speculative decodes greedily: drop --temperature (or set it to 0)")
    limit = model.cfg.max_position_embeddings
    if len(ids) + 2 >= limit:
        raise ValueError(f"the prompt has {len(ids)} tokens; this model accepts at most {limit}")
    t = time.perf_counter()
    out, stats = generate_speculative(model, ids, min(args.max_new_tokens, limit - len(ids) - 2), [tok.eos_id])
    s = time.perf_counter() - t
    print(tok.decode(out, skip_special=True))
    print(f"MTP speculation: {stats.accepted}/{stats.drafted} drafts accepted ({stats.acceptance:.1%}), "
          f"{len(out)} tokens in {s:.2f} s", file=sys.stderr)


def cmd_chat(args) -> int:
    from ..chat import parse_completion
    model, tok = _load(args)
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("dsv4 chat — empty line or Ctrl-D to quit, /reset to clear the history")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = _chat_ids(tok, history, args.thinking)
        sys.stdout.write("dsv4> ")
        out = _stream(model, tok, ids, args)
        reply = parse_completion(tok.decode(out), thinking=args.thinking)
        history.append({"role": "assistant", "content": reply["content"],
                        "reasoning_content": reply.get("reasoning_content") or ""})


def _common(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--thinking", action="store_true", help="V4 thinking mode (implies --chat)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--numerics", default=None, choices=["plain", "official"],
                   help="default: official for FP8/FP4 checkpoints, plain otherwise")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: torch.compile the decode step before capturing it as a CUDA graph (about 2.5x "
                        "faster per token at batch 1 on the benchmark model, after a one-off compile of about a "
                        "minute)")


def register(sub) -> None:
    s = sub.add_parser("generate", help="stream a continuation of a prompt",
                       description="Prefill the prompt, then decode over the compressed KV cache, streaming text.")
    _common(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the V4 chat format")
    s.add_argument("--speculative", action="store_true",
                   help="greedy decoding with MTP self-speculation (same text as greedy; prints the acceptance rate)")
    s.set_defaults(fn=cmd_generate)
    s = sub.add_parser("chat", help="interactive chat with history (V4 chat format)")
    _common(s)
    s.add_argument("--system", default="", help="system prompt")
    s.set_defaults(fn=cmd_chat)
