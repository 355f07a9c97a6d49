"""Why the compiled-blocks training rows without a CUDA graph are bound by the host CPU in some runs (stops 24
and 26: b1 ~22K tok/s, 0.13-0.19 s per step) and not in another (stop 25: 72.9K, 0.056 s), with no graph compiled
inside the timed steps. Stop 25 guessed that bench_gpu.py's eager rows, run first in the same process, slow
what follows; this script's first run (stop 26, 'fresh' only) found the compiled b1 step host-bound at 0.128 s
without any eager rows before it.

    python benchmarks/host_slowdown_diag.py --out DIR [--variants fresh,after_eager] [--batches 1,2] [--cprofile]

Two subprocesses on the bench config, bf16 (as bench_gpu.py): 'fresh' compiles the blocks straight away,
'after_eager' first runs bench_gpu's eager training rows (fused head loss, full logits, +MTP; b1 and b2). Each
then times the compile (first compiled step) and compiled b1 / b2 steps (wall and host CPU seconds per step)
three ways: as they are, with Python's garbage collector off, and after gc.freeze(). It also records how many
objects the collector tracks, to test the guess that a larger heap makes every collection dearer (stop 27,
'fresh' at b1: 0.089 / 0.097 / 0.106 s per step with the collector on / off / frozen, all host CPU: not the
collector). --cprofile then runs 3 steps per batch size under cProfile, to say which host work it is.
Each variant prints JSON lines; all go to DIR/host_slowdown.json."""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def gc_collections() -> int:
    """Collections Python's garbage collector has run in this process, all generations."""
    return sum(s["collections"] for s in gc.get_stats())


def host_profile(step, path: Path, steps: int = 3) -> None:
    """`steps` calls of step under cProfile: the functions with the most host time of their own, and by
    cumulative time (which Python frames — dynamo's guards and wrappers, the eager code between compiled
    graphs, Triton's launchers — the step's host CPU goes to) -> path (text)."""
    import cProfile
    import io
    import pstats

    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    sync()
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    buf.write(f"{steps} steps under cProfile (its own overhead included)\n\n## by own time\n")
    st.sort_stats("tottime").print_stats(40)
    buf.write("\n## by cumulative time\n")
    st.sort_stats("cumulative").print_stats(60)
    path.write_text(buf.getvalue())


def one(variant: str, batches=(1, 2), out: Path | None = None) -> None:
    sys.path.insert(0, str(HERE))
    import torch

    import bench_gpu as bg
    from dsv4.compiling import compile_blocks
    from dsv4.config import load_config
    from dsv4.model import Transformer

    bg.log = lambda **kw: emit(variant=variant, **kw)          # bench_train's rows as this script's lines
    cfg = load_config(HERE / "bench_small.json")
    model = bg.build(cfg)
    Transformer.head_fp32 = False
    peak = bg.matmul_peak()
    if variant == "after_eager":
        bg.bench_train(cfg, model, peak, "eager", mtp=False, chunked_loss=True)
        bg.bench_train(cfg, model, peak, "eager, full logits", mtp=False)
        bg.bench_train(cfg, model, peak, "eager, fused head loss", mtp=True, chunked_loss=True)
    emit(variant=variant, what="heap_before_compile", gc_objects=len(gc.get_objects()), gc_counts=gc.get_count())

    ids = torch.randint(0, cfg.vocab_size, (1, 4096), device="cuda")
    compile_blocks(model)
    t = time.time()
    bg.loss_and_grads(model, ids)
    emit(variant=variant, what="compile", s=time.time() - t, gc_objects=len(gc.get_objects()))

    loss_of = bg.make_loss(model, mtp=False, chunked_loss=True)
    model.train()
    for mode in ("gc on", "gc off", "gc frozen"):
        if mode == "gc off":
            gc.disable()
        elif mode == "gc frozen":
            gc.enable()
            gc.collect()
            gc.freeze()
        for b in batches:
            x = torch.randint(0, cfg.vocab_size, (b, 4097), device="cuda")

            def step():
                loss_of(x[:, :-1], x[:, 1:])[0].backward()
                model.zero_grad(set_to_none=True)
            step()
            step()
            collections0 = gc_collections()
            cpu0, graphs0 = time.process_time(), bg.dynamo_graphs()
            wall = bg.timed(step, 5)
            emit(variant=variant, what="compiled_step", gc=mode, batch=b, s=wall, tok_s=b * 4096 / wall,
                 cpu_s_per_step=(time.process_time() - cpu0) / 5, gc_collections=gc_collections() - collections0,
                 graphs_compiled=bg.dynamo_graphs() - graphs0)
            if out is not None and mode == "gc on":
                host_profile(step, out / f"{variant}_b{b}_cprofile.txt")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for host_slowdown.json")
    ap.add_argument("--variant", choices=("fresh", "after_eager"), help="run one variant in this process")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per variant's subprocess")
    ap.add_argument("--variants", default="fresh,after_eager", help="which variants, comma-separated")
    ap.add_argument("--batches", default="1,2", help="batch sizes of the compiled steps (each new one compiles anew)")
    ap.add_argument("--cprofile", action="store_true",
                    help="also 3 compiled steps per batch size under cProfile (collector on): DIR/<variant>_b<b>_cprofile.txt")
    args = ap.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    if args.variant:
        one(args.variant, batches, Path(args.out) if args.cprofile else None)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants.split(","):
        try:
            p = subprocess.run([sys.executable, __file__, "--out", str(out), "--variant", variant,
                                "--batches", args.batches] + (["--cprofile"] if args.cprofile else []),
                               capture_output=True, text=True, timeout=args.timeout)
            text, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:              # its output so far (bytes, even with text=True)
            text, err = (b.decode() if isinstance(b, bytes) else b or "" for b in (e.stdout, e.stderr))
            rc = "timeout"
        (out / f"{variant}.err").write_text(err[-20000:])
        for line in text.splitlines():
            if line.startswith("{"):
                rows.append(json.loads(line))
                print(line, flush=True)
        rows.append({"variant": variant, "what": "exit", "rc": rc})
        (out / "host_slowdown.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
