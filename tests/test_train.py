"""The training loop (dsv4.train): bit-exact resume, learning on the embedded corpus, MTP loss, bias balancing,
anticipatory routing, progressive length, FSDP2 on gloo == one process, config errors."""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from dsv4.model import MoE
from dsv4.train.recipe import AnticipatoryRouting, SpikeDetector, compute_loss, update_gate_biases
from dsv4.train.trainer import TrainConfig, TrainError, Trainer, _device
from conftest import leave_gloo_worker, random_tiny


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Byte-level shards of ~0.4 MB of the embedded corpus, built once and shared (data_dir)."""
    d = tmp_path_factory.mktemp("shards") / "data"
    Trainer(_tc(d.parent / "build", d))                  # builds them
    return d


def _tc(out, data_dir, **kw) -> TrainConfig:
    base = dict(model="tiny", out_dir=str(out), data_dir=str(data_dir), data_limit_mb=0.4, val_fraction=0.05,
                steps=6, batch=2, seq=32, warmup=2, lr=1e-2, eval_every=0, save_every=0, progress=False,
                tensorboard=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _params(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- resume
def test_bit_exact_resume(tmp_path, shards):
    # spike_k = -1000 with warmup 2: every loss counts as a spike, so anticipatory routing switches on
    # at step 3 (the checkpoint), off at 5, on at 6: its state crosses the checkpoint
    kw = dict(steps=6, save_every=3, spike_k=-1e3, spike_warmup=2, anticipatory_delta=1, anticipatory_duration=2)
    a = Trainer(_tc(tmp_path / "a", shards, **kw))
    straight = a.fit()
    assert (tmp_path / "a" / "latest").read_text().strip() == "step_0000006"
    assert [r["anticipatory"] for r in straight] == [None, None, "on", None, "off", "on"]

    b = Trainer(_tc(tmp_path / "b", shards, **kw))
    assert b.resume(tmp_path / "a" / "step_0000003")
    assert b.step == 3
    resumed = b.fit()
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for ra, rb in zip(straight[3:], resumed):
        for k in ("loss", "lm", "mtp", "balance", "indexer", "grad_norm", "anticipatory", "max_violation"):
            assert ra[k] == rb[k], (ra["step"], k, ra[k], rb[k])
    pa, pb = _params(a.model), _params(b.model)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)

    # resume() with no argument finds `latest`; the log keeps one record per step
    c = Trainer(_tc(tmp_path / "a", shards, **kw))
    assert c.resume() and c.step == 6
    assert Trainer(_tc(tmp_path / "empty", shards)).resume() is False
    with pytest.raises(TrainError, match="not a training checkpoint"):
        c.resume(tmp_path / "a" / "data")


def test_checkpoint_loads_as_a_model(tmp_path, shards):
    import dsv4
    t = Trainer(_tc(tmp_path, shards, steps=1, save_every=1))
    t.fit()
    m = dsv4.load(tmp_path / "step_0000001", progress=False)
    ids = torch.randint(0, 258, (1, 12))
    t.model.eval()
    assert torch.equal(m(ids), t.model(ids))


# ---------------------------------------------------------------------------------------- learning
def test_loss_drops_on_embedded_corpus(tmp_path, shards):
    t = Trainer(_tc(tmp_path, shards, steps=30, batch=4, seq=32, warmup=5, eval_every=30, eval_batches=2))
    hist = t.fit()
    first = sum(r["lm"] for r in hist[:3]) / 3
    last = sum(r["lm"] for r in hist[-5:]) / 5
    assert first > 5.5                                   # ≈ ln(vocab 512) at the start
    assert last < first - 1.5, (first, last)             # a clear drop in 30 steps
    assert hist[-1]["val_loss"] < first - 1.0
    for r in hist:                                       # the logged total is the recipe's sum
        assert r["mtp"] > 0 and r["balance"] > 0 and r["indexer"] > 0
        assert abs(r["loss"] - (r["lm"] + 0.3 * r["mtp"] + 1e-4 * r["balance"] + r["indexer"])) < 1e-4
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 30


def test_mtp_loss_reaches_the_mtp_block():
    model = random_tiny().train()
    ids = torch.randint(0, 512, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    parts = compute_loss(model, x, y, mtp_weight=0.3, balance_weight=1e-4)
    assert parts.mtp is not None and parts.mtp > 0
    assert torch.allclose(parts.total, parts.lm + 0.3 * parts.mtp + 1e-4 * parts.balance + parts.indexer)
    parts.total.backward()
    assert model.mtp[0].e_proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    compute_loss(model, x, y, mtp_weight=0.0).total.backward()
    assert model.mtp[0].e_proj.weight.grad is None         # weight 0: the MTP block is not trained


def test_cpu_steps_run_deterministic_kernels(tmp_path, shards, monkeypatch):
    """On the CPU each training step runs with PyTorch's deterministic kernels (with 2 threads two runs of batch
    8 × 256 had differed in the last bits from step 2 on), and the process setting is restored after it."""
    t = Trainer(_tc(tmp_path, shards, steps=2, seq=16, grad_accum=2))
    seen, real = [], t._micro_step
    monkeypatch.setattr(t, "_micro_step", lambda x, y: (seen.append(torch.are_deterministic_algorithms_enabled()),
                                                        real(x, y))[1])
    before = torch.are_deterministic_algorithms_enabled()
    t.train_step()
    assert seen == [True, True] and torch.are_deterministic_algorithms_enabled() == before


def test_balance_losses_live_only_inside_compute_loss():
    """A training forward outside the recipe keeps no balance loss (its autograd graph would stay alive through
    the MoE layers: in a CUDA-graph capture that broke the backward); compute_loss's balance part is the mean of
    the layers' sequence-wise losses, reaches the gates' weights, and leaves nothing behind."""
    model = random_tiny(2).train()
    moes = [m for m in model.modules() if isinstance(m, MoE) and not m.gate.hash]
    ids = torch.randint(0, model.cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:]
    model(x)
    assert moes and all(m.aux_loss is None for m in moes)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(mod.aux_loss.detach())) for m in moes]
    parts = compute_loss(model, x, y, mtp_weight=0.3, balance_weight=1e-2)
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(moes) and torch.allclose(parts.balance.detach(), torch.stack(seen).mean())
    assert all(m.aux_loss is None and not m.collect_balance for m in moes)
    parts.balance.backward()
    assert all(m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0 for m in moes)
    assert compute_loss(model, x, y, balance_weight=0.0).balance is None


@pytest.mark.parametrize("chunk", [7, 4096])            # ragged chunks, and one chunk for everything
def test_chunked_loss_equals_loss_of_full_logits(monkeypatch, chunk):
    """The training losses (head + cross-entropy in checkpointed chunks) equal cross-entropy over the full
    logits, LM and MTP, values and every gradient (fp32)."""
    import torch.nn.functional as F
    from dsv4.model import Transformer
    monkeypatch.setattr(Transformer, "loss_chunk", chunk)
    model = random_tiny(3).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    x, y = ids[:, :-1], ids[:, 1:]
    parts = compute_loss(model, x, y, mtp_weight=0.3, balance_weight=0.0, indexer_weight=0.0)
    parts.total.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits, h = model(x, return_hidden=True)
    lm = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    mtp = F.cross_entropy(model.mtp_forward(h[:, :-1], y[:, :-1]).flatten(0, 1), y[:, 1:].flatten())
    (lm + 0.3 * mtp).backward()
    assert abs(float(parts.lm.detach() - lm.detach())) < 1e-6 * float(lm.detach())
    assert abs(float(parts.mtp.detach() - mtp.detach())) < 1e-6 * float(mtp.detach())
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and "head.weight" in got and "mtp.0.e_proj.weight" in got
    for n, g in want.items():
        assert float((got[n] - g).norm()) <= 1e-5 * float(g.norm()) + 1e-9, n


# ---------------------------------------------------------------------------------------- balancing
def test_gate_bias_moves_toward_under_loaded_experts():
    model = random_tiny().train()
    moe = model.layers[1].ffn
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[0] = 5.0                           # expert 0 gets every token
    ids = torch.randint(0, 512, (2, 32))
    model(ids)
    load = moe.load.clone()
    assert load[0] == load.max() and load.sum() > 0
    before = moe.gate.bias.detach().clone()
    update_gate_biases(model, speed=0.01)
    delta = moe.gate.bias.detach() - before
    mean = load.mean()
    assert torch.allclose(delta[load > mean], torch.tensor(-0.01), atol=1e-6)
    assert torch.allclose(delta[load < mean], torch.tensor(0.01), atol=1e-6)
    assert moe.load.sum() == 0                            # the accumulator restarts
    # repeated updates pull tokens away from expert 0 and even out the load
    with torch.no_grad():
        moe.gate.bias.zero_()
        moe.gate.bias[0] = 2.0
    share, viol = [], []
    for _ in range(10):
        model(ids)
        share.append(float(moe.load[0] / moe.load.sum()))
        viol.append(float(moe.load.max() / moe.load.mean() - 1))
        update_gate_biases(model, speed=0.2)
    assert share[0] == 0.5 and max(share[-4:]) < 0.2      # top-2: expert 0 first held half of all picks
    assert sum(viol[-4:]) / 4 < viol[0] / 2


# ---------------------------------------------------------------------------------------- anticipatory routing
def test_anticipatory_routing_on_spike_and_back():
    model = random_tiny().train()
    ar = AnticipatoryRouting(model, delta=2, duration=3, detector=SpikeDetector(window=10, k=3.0, warmup=4))
    gate = ar.gates[0]
    saved = []
    events = []
    for step in range(12):
        with torch.no_grad():
            gate.weight.add_(0.05 * torch.randn_like(gate.weight))   # stands in for the optimizer step
        ar.snapshot()
        saved.append(gate.weight.detach().clone())
        loss = 10.0 if step == 6 else 1.0 + 0.01 * (step % 2)
        events.append(ar.observe(step, loss))
        if step == 6:
            assert torch.equal(gate.route_params[0], saved[step - 2])       # parameters of 2 steps back
        if step in (7, 8):                                                  # the lag slides with the steps
            assert torch.equal(gate.route_params[0], saved[step - 2])
            # selection uses the old parameters, the weights the current ones
            x = torch.randn(5, model.cfg.hidden_size)
            _, idx = gate(x, None)
            old = (gate.scores_with(x, saved[step - 2]) + gate.route_params[1].float()).topk(gate.topk).indices
            assert torch.equal(idx, old)
    assert events[6] == "on" and events[9] == "off"
    assert all(e is None for i, e in enumerate(events) if i not in (6, 9))
    assert gate.route_params is None and not ar.active


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_training_follows_eager_training(tmp_path, shards):
    """`dsv4 train --cuda-graph`: after 2 eager warm-up steps per sequence length each step replays one captured
    graph (one capture per length: 2 here, the schedule switches at step 4), with gradient accumulation, and the
    losses follow eager training's (bf16 autocast, equal up to the atomics' summation order)."""
    kw = dict(device="cuda", steps=8, seq=16, seq_schedule=[[0, 16], [4, 32]], grad_accum=2, anticipatory=False)
    losses = {}
    for graph in (False, True):
        t = Trainer(_tc(tmp_path / str(graph), shards, cuda_graph=graph, **kw))
        losses[graph] = [t.train_step()["loss"] for _ in range(8)]
        if graph:
            assert t.graphed is not None and t.graphed.captures == 2
    assert losses[True][-1] < losses[True][0] - 0.5              # it learns
    for a, b in zip(losses[False], losses[True]):
        assert abs(a - b) <= 2e-2 * abs(a), (losses[False], losses[True])


# ---------------------------------------------------------------------------------------- schedules / config
def test_device_names_get_the_process_gpu_index(monkeypatch):
    """`--device cuda` names no index; torch.cuda.set_device refuses such a device (seen on an H100: ValueError
    "Expected a torch.device with a specified index"), so it gets this process's GPU, as 'auto' does."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert _device(TrainConfig(device="cuda")) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert _device(TrainConfig(device="cuda")) == torch.device("cuda", 3)
    assert _device(TrainConfig(device="cuda:1")) == torch.device("cuda", 1)
    assert _device(TrainConfig(device="cpu")) == torch.device("cpu")


def test_progressive_sequence_length(tmp_path, shards):
    t = Trainer(_tc(tmp_path, shards, steps=3, seq=16, seq_schedule=[[0, 16], [2, 32]], mtp_weight=0.0))
    hist = [t.train_step() for _ in range(3)]
    assert [r["seq"] for r in hist] == [16, 16, 32] and t.loader.seq == 32
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}] + hist, hist)]
    assert tokens == [2 * 16, 2 * 16, 2 * 32]                # the batches really had that length


def test_logged_throughput_leaves_slow_first_steps_behind(tmp_path, shards, monkeypatch):
    """tok_per_s is over the last 10 steps: a first step that took 100 s (a compile, a graph capture) no longer
    weighs on it after that, where a rate since the start would stay low for the whole run."""
    from dsv4.train import trainer as tr
    clock = [0.0]
    monkeypatch.setattr(tr.time, "perf_counter", lambda: clock[0])
    t = Trainer(_tc(tmp_path, shards, steps=12))
    real = t.train_step

    def step():
        rec = real()
        clock[0] += 100.0 if rec["step"] == 1 else 1.0
        return rec
    t.train_step = step
    hist = t.fit()
    per_step = 2 * 32
    assert hist[0]["tok_per_s"] == pytest.approx(per_step / 100)
    assert hist[9]["tok_per_s"] == pytest.approx(10 * per_step / 109)      # steps 1-10
    assert hist[-1]["tok_per_s"] == pytest.approx(per_step)                 # steps 3-12, one second each


def test_train_config_errors(tmp_path):
    with pytest.raises(TrainError, match="stepz"):
        TrainConfig.from_dict({"stepz": 3})
    f = tmp_path / "c.toml"
    f.write_text('steps = 5\nlearning_rate = 0.1\n[ablation]\nresidual = "plain"\n')
    with pytest.raises(TrainError, match=r"c.toml.*learning_rate"):
        TrainConfig.from_file(f)
    f.write_text('steps = 5\noptimizer = "sgd"\n')
    with pytest.raises(TrainError, match="optimizer"):
        TrainConfig.from_file(f)
    f.write_text('steps = 5\nbatch = 2\n[ablation]\nresidual = "plain"\nattention = "dense"\n')
    tc = TrainConfig.from_file(f, batch=3, seq=None)
    assert tc.steps == 5 and tc.batch == 3 and tc.seq == 128 and tc.ablation["residual"] == "plain"
    with pytest.raises(TrainError, match="'steps' must be int"):
        TrainConfig.from_dict({"steps": "10"})
    with pytest.raises(TrainError, match="'indexer_weight' is a loss weight"):
        TrainConfig.from_dict({"indexer_weight": -1.0})
    assert TrainConfig.from_dict({"indexer_weight": 0}).indexer_weight == 0


def test_ablations_build_and_step(tmp_path, shards):
    t = Trainer(_tc(tmp_path, shards, steps=1, batch=2, seq=16, optimizer="adamw",
                    ablation={"residual": "plain", "attention": "dense"}))
    assert t.model.n_streams == 1 and all(g["kind"] != "muon" for g in t.opt.param_groups)
    assert all(blk.attn.ratio == 0 for blk in t.model.layers)
    r = t.train_step()
    assert r["loss"] > 0
    with pytest.raises(TrainError, match="ablation"):
        Trainer(_tc(tmp_path, shards, ablation={"residul": "plain"}))


# ---------------------------------------------------------------------------------------- FSDP2 on gloo
def _dist_worker(rank, world, init_file, out, data_dir, result):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        kw = dict(steps=3, batch=4, save_every=2, eval_every=3, eval_batches=1)
        t = Trainer(_tc(out, data_dir, **kw))
        assert type(t.model.layers[0].attn.wq_a.weight).__name__ == "DTensor"
        hist = t.fit()
        r = Trainer(_tc(out, data_dir, **kw))                      # resume at step 2 under FSDP2 as well
        r.resume(os.path.join(out, "step_0000002"))
        again = r.fit()
        if rank == 0:
            torch.save({"hist": hist, "again": again}, result)
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_gloo_worker()


def test_fsdp2_two_processes_match_one(tmp_path, shards):
    single = Trainer(_tc(tmp_path / "one", shards, steps=3, batch=4, eval_every=3, eval_batches=1))
    ref = single.fit()
    result = tmp_path / "dist.pt"
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two"), str(shards), str(result)),
             nprocs=2)
    got = torch.load(result, weights_only=False)
    for a, b in zip(ref, got["hist"]):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * a["loss"], (a["step"], a["loss"], b["loss"])
    assert abs(ref[-1]["val_loss"] - got["hist"][-1]["val_loss"]) < 1e-3
    for a, b in zip(got["hist"][2:], got["again"]):                  # FSDP2 resume: same losses
        assert a["loss"] == b["loss"]
    # parameters: the two runs' updates agree to 2 % (AdamW divides by √v, so elements whose gradient is ~0
    # move by ±lr on summation-order noise; updates, not raw values, are the fair comparison)
    from dsv4.checkpoint import load_state_into
    from dsv4.model import Transformer, init_weights
    two = Transformer(single.cfg)
    load_state_into(two, tmp_path / "two" / "step_0000003", progress=False)
    init = init_weights(Transformer(single.cfg), seed=0).state_dict()
    two = two.state_dict()
    for k, v in single.model.state_dict().items():
        if v.is_floating_point() and not torch.equal(v, init[k]):
            assert (two[k] - v).norm() <= 0.02 * (v - init[k]).norm(), k


# ---------------------------------------------------------------------------------------- command line
def test_dsv4_train_command(tmp_path, shards, capsys):
    from dsv4.cli import main
    args = ["train", "--preset", "tiny", "--steps", "2", "--batch", "2", "--seq", "16", "--out", str(tmp_path),
            "--save-every", "2", "--eval-every", "0", "--no-progress", "--residual", "hc",
            "--set", f"data_dir={shards}", "--set", "data_limit_mb=0.4", "--set", "val_fraction=0.05"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "starting at step 0" in out and "done: step 2" in out
    assert (tmp_path / "latest").read_text().strip() == "step_0000002"
    cfg = __import__("json").loads((tmp_path / "step_0000002" / "config.json").read_text())
    assert cfg["residual"] == "hc" and cfg["dsv4_tokenizer"] == "bytes"
    assert main(args[:4] + ["4"] + args[5:]) == 0                     # resumes from latest by default
    assert "resumed at step 2" in capsys.readouterr().out
    assert main(["train", "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_fusion_switches_from_the_command_line(tmp_path, shards, capsys, monkeypatch):
    """--fusion sets mhc.Fusion's switches before training (and says so); a bad item is exit 2 naming the
    switches, with nothing set."""
    from dsv4.cli import main
    from dsv4.model.mhc import Fusion, set_fusion
    for name in ("pre_kernel", "expand_kernel", "mix_kernel"):
        monkeypatch.setattr(Fusion, name, False)                          # restored after the test
    assert main(["train", "--fusion", "pre_kernel=1,expand_kernel=2"]) == 2
    err = capsys.readouterr().err
    assert "expand_kernel=2" in err and "pre_kernel" in err and "mix_kernel" in err
    assert not Fusion.pre_kernel                                          # all or nothing
    with pytest.raises(ValueError, match="prekernel"):
        set_fusion("prekernel=1")
    args = ["train", "--preset", "tiny", "--steps", "1", "--batch", "2", "--seq", "16", "--out", str(tmp_path),
            "--save-every", "0", "--eval-every", "0", "--no-progress", "--fusion", "pre_kernel=1,expand_kernel=1",
            "--set", f"data_dir={shards}", "--set", "data_limit_mb=0.4", "--set", "val_fraction=0.05"]
    assert main(args) == 0
    assert Fusion.pre_kernel and Fusion.expand_kernel and not Fusion.mix_kernel
    assert "mHC switches:" in capsys.readouterr().out
    assert set_fusion("pre_kernel=0")["pre_kernel"] is False


def test_graphed_step_warms_up_and_captures_one_layout(monkeypatch):
    """Compiled blocks guard on strides: a GraphedStep's eager warm-up calls must see the layout its capture
    sees (contiguous clones), also when the caller passes strided views such as ids[:, :-1] of a batch —
    otherwise the capture recompiles, which reads values back (the H100 run of `--compile` with a CUDA graph at
    batch 2 failed so). The CUDA parts are stubbed: this runs anywhere."""
    from dsv4.train.graphed import GraphedStep
    seen = []

    def eager(self, inputs):
        seen.append(("warm-up", [x.stride() for x in inputs]))
        return (torch.zeros(()),)

    def capture(self, key, inputs):
        seen.append(("capture", [x.clone().stride() for x in inputs]))    # _capture runs on clones
        self.graphs[key] = None
    monkeypatch.setattr(GraphedStep, "_eager", eager)
    monkeypatch.setattr(GraphedStep, "_capture", capture)
    monkeypatch.setattr(GraphedStep, "_replay", lambda self, key, inputs: (torch.zeros(()),))
    step = GraphedStep(torch.nn.Linear(2, 2), lambda x, y: (x.sum(),), warmup=2)
    ids = torch.arange(2 * 9).view(2, 9)
    for _ in range(3):
        step(ids[:, :-1], ids[:, 1:])
    assert [what for what, _ in seen] == ["warm-up", "warm-up", "capture"]
    assert all(strides == seen[-1][1] for _, strides in seen), seen
