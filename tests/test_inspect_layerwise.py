"""Layer-by-layer inspection (dsv4.inspect.layerwise, `dsv4 inspect --layerwise`): the report equals the fully
loaded model's, and only one block's weights exist at any time."""
import json
import math

import pytest
import torch

import dsv4
import dsv4.inspect as I
from dsv4.checkpoint import CheckpointReader, load_state_into
from dsv4.inspect.analyze import to_json_ready
from dsv4.inspect.layerwise import LayerwiseModel, inspect_layerwise, memory_plan, skeleton
from dsv4.inspect.prompts import Prompt
from dsv4.inspect.report import finalize
from dsv4.train.data import ByteTokenizer

from conftest import random_tiny

PROMPTS = [Prompt("a", "The capital of France is Paris."), Prompt("b", "def f(x):\n    return x * 2\n")]
MODES = ["chat", "thinking"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _json(rep: dict) -> dict:
    """What report.json holds, without the fields that name the run (meta, creation time)."""
    data = json.loads(json.dumps(to_json_ready(finalize(rep))))
    data.pop("meta"), data.pop("created")
    return data


def _assert_close(a, b, path="report"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("preset_name,fmt", [("tiny", "plain"), ("tiny-official", "official")])
def test_layerwise_report_equals_full_model(tmp_path, preset_name, fmt):
    ckpt = tmp_path / "ckpt"
    dsv4.save(random_tiny(7, preset_name), ckpt, fmt=fmt)
    full = dsv4.load(ckpt, progress=False)
    ref = I.inspect_model(full, ByteTokenizer(), PROMPTS, MODES, max_tokens=60)
    n_layers = full.cfg.num_hidden_layers
    del full

    with LayerwiseModel(ckpt) as lw:
        assert lw.model.numerics == ("official" if fmt == "official" else "plain")
        m = lw.model
        # resident: embedding, norm, head, hyper-head; every block and the MTP blocks on meta
        assert not m.embed.weight.is_meta and not m.head.weight.is_meta and not m.hc_head_fn.is_meta
        assert lw.loaded_layers() == [] and all(p.is_meta for p in m.mtp.parameters())
        seen = []                                            # (layer, loaded layers) at every block call

        def watch(i):
            def hook(module, args, out):
                seen.append((i, lw.loaded_layers()))
                assert not any(t.is_meta for t in module.state_dict().values())
            return hook
        handles = [blk.register_forward_hook(watch(i)) for i, blk in enumerate(m.layers)]
        read = []
        orig_read = lw.reader.read
        lw.reader.read = lambda name: read.append(name) or orig_read(name)
        rep = inspect_layerwise(lw, ByteTokenizer(), PROMPTS, MODES, max_tokens=60)
        for h in handles:
            h.remove()
        assert lw.loaded_layers() == []                     # every block freed again
    runs = len(PROMPTS) * len(MODES)
    assert seen == [(i, [i]) for i in range(n_layers) for _ in range(runs)]   # layer-major, one block at a time
    layer_names = [n for n in read if n.startswith("layers.")]
    assert len(layer_names) == len(set(layer_names))                          # each block tensor read once
    assert not any(n.startswith(("mtp.", "embed", "head", "norm", "hc_head")) for n in read)
    assert rep["meta"]["layerwise"] is True and len(rep["runs"]) == runs
    _assert_close(_json(rep), _json(ref))


def test_memory_plan_and_flash_layer_size():
    cfg = dsv4.preset("tiny")
    m = random_tiny(1)
    plan = memory_plan(m, torch.float32)
    sd = m.state_dict()
    assert plan["total"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert plan["layers"][2] == sum(t.numel() * t.element_size() for n, t in sd.items() if n.startswith("layers.2."))
    assert len(plan["layers"]) == cfg.num_hidden_layers
    flash = memory_plan(skeleton(dsv4.preset("flash")), torch.bfloat16)
    experts = 256 * 3 * 4096 * 2048 * 2                                        # routed experts of one layer, bf16
    assert experts < flash["max_layer"] < 1.1 * experts
    assert 500e9 < flash["total"] < 600e9


def test_load_state_into_prefix_and_reader_unload(tmp_path):
    src = random_tiny(3)
    dsv4.save(src, tmp_path / "ck")
    m = skeleton(src.cfg)
    load_state_into(m, tmp_path / "ck", progress=False, prefix="layers.1.")
    assert all(not p.is_meta for p in m.layers[1].parameters())
    assert all(p.is_meta for p in m.layers[0].parameters()) and m.embed.weight.is_meta
    assert torch.equal(m.layers[1].attn.wq_a.weight, src.layers[1].attn.wq_a.weight)
    with CheckpointReader(m, tmp_path / "ck") as ck:
        names = ck.names(("layers.1.", "layers.2."))
        assert names and all(n.startswith(("layers.1.", "layers.2.")) for n in names)
        assert ck.nbytes(ck.names("layers.2.")) == memory_plan(src, torch.float32)["layers"][2]
        ck.unload(m, ck.names("layers.1."))
    assert all(p.is_meta for p in m.layers[1].parameters())


def test_cli_layerwise_explicit_and_automatic(tmp_path, capsys, monkeypatch):
    from dsv4.cli import main
    from dsv4.inspect import layerwise
    dsv4.save(random_tiny(5), tmp_path / "ckpt")
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps([{"name": "only", "text": "A short prompt."}]))
    args = ["inspect", "--ckpt", str(tmp_path / "ckpt"), "--prompts", str(pf), "--modes", "raw,chat",
            "--what", "blocks,gates,logit_lens", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "full"), "--no-layerwise"]) == 0
    assert main(args + ["--out", str(tmp_path / "lw"), "--layerwise"]) == 0
    assert "layer by layer" in capsys.readouterr().err
    full, lw = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("full", "lw"))
    assert lw["meta"]["layerwise"] is True and "layerwise" not in full["meta"]
    for d in (full, lw):
        d.pop("meta"), d.pop("created")
    _assert_close(lw, full)
    # automatic: a checkpoint larger than 90% of the free memory runs layer by layer, with a note saying so
    monkeypatch.setattr(layerwise, "free_memory", lambda device: 10_000)
    assert main(args + ["--out", str(tmp_path / "auto")]) == 0
    err = capsys.readouterr().err
    assert "running layer by layer" in err and "--no-layerwise" in err and "may not fit" in err
    assert json.loads((tmp_path / "auto" / "report.json").read_text())["meta"]["layerwise"] is True
    monkeypatch.setattr(layerwise, "free_memory", lambda device: 10**12)
    assert main(args + ["--out", str(tmp_path / "auto2")]) == 0
    assert "layerwise" not in json.loads((tmp_path / "auto2" / "report.json").read_text())["meta"]
    assert main(["inspect", "--preset", "tiny", "--layerwise", "--out", str(tmp_path / "x")]) == 2
