"""Checkpoint I/O: plain and official (FP8 / FP4) round trips, the format math on hand-made examples,
sharding / index / name variants, and one clear CheckpointError per kind of broken checkpoint."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv4
from dsv4.checkpoint import INDEX_FILE, CheckpointError, load_state_into, save_state
from dsv4.config import preset
from dsv4.model import Transformer
from dsv4.weight_formats import (FormatError, dequant_fp4, dequant_fp8_blocks, official_storage, pack_fp4,
                                 quant_fp4, quant_fp8_blocks, round_to_storage, unpack_fp4)

from conftest import random_tiny

IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
E8M0 = torch.float8_e8m0fnu


def shards(path):
    return sorted(p.name for p in path.glob("*.safetensors"))


def rewrite(file, fn):
    """Rewrite one safetensors file with fn(dict) -> dict."""
    save_file(fn(load_file(file)), str(file), metadata={"format": "pt"})


def meta_model(cfg):
    with torch.device("meta"):
        return Transformer(cfg)


# ============================================================================================ format math
def test_fp8_block_dequant_two_blocks_by_hand():
    q = torch.ones(2, 256).to(torch.float8_e4m3fn)                 # one row of blocks, two column blocks
    q[1, 0] = -3.0
    s = torch.tensor([[0.5, 4.0]]).to(E8M0)
    w = dequant_fp8_blocks(q, s)
    assert torch.equal(w[0, :128], torch.full((128,), 0.5)) and torch.equal(w[0, 128:], torch.full((128,), 4.0))
    assert w[1, 0] == -1.5


def test_fp8_partial_edge_blocks_and_scale_shape_check():
    q = torch.ones(130, 129).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0], [8.0, 0.25]]).to(E8M0)           # [ceil(130/128), ceil(129/128)]
    w = dequant_fp8_blocks(q, s)
    assert (w[:128, :128] == 1).all() and (w[:128, 128] == 2).all()
    assert (w[128:, :128] == 8).all() and (w[128:, 128] == 0.25).all()
    with pytest.raises(FormatError, match="scale shape"):
        dequant_fp8_blocks(q, torch.ones(1, 2).to(E8M0))


def test_fp8_quant_picks_smallest_power_of_two_scale():
    w = torch.zeros(128, 256)
    w[0, 0], w[5, 7] = 896.0, 3.0                  # block 0: amax 896 -> scale 2, stored 448 and 1.5
    w[0, 128] = 1.0                                # block 1: amax 1 -> scale 2^ceil(log2(1/448)) = 2^-8
    q, s = quant_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == E8M0 and s.shape == (1, 2)
    assert s.float().tolist() == [[2.0, 2.0 ** -8]]
    assert q[0, 0].float() == 448 and q[5, 7].float() == 1.5 and q[0, 128].float() == 256
    assert torch.equal(dequant_fp8_blocks(q, s), w)


def test_fp4_nibble_order_by_hand():
    # byte 0x21: low nibble 1 (0.5) comes first, high nibble 2 (1.0) second; 0xF9: low 9 (-0.5), high 15 (-6)
    packed = torch.tensor([[0x21, 0xF9 - 256]], dtype=torch.int8)
    assert unpack_fp4(packed).tolist() == [[0.5, 1.0, -0.5, -6.0]]
    assert torch.equal(pack_fp4(torch.tensor([[0.5, 1.0, -0.5, -6.0]])), packed)
    # all 16 codes, in code order
    grid = [0.0, .5, 1, 1.5, 2, 3, 4, 6]                            # -0.0 has its own code (8)
    v = torch.tensor([grid + [-g for g in grid]])
    assert pack_fp4(v).view(torch.uint8).tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]
    with pytest.raises(FormatError, match="grid"):
        pack_fp4(torch.tensor([[0.7, 1.0]]))


def test_fp4_scales_per_32_values():
    v = torch.ones(2, 64)
    packed = pack_fp4(v)                                           # [2, 32] int8
    s = torch.tensor([[2.0, 0.5], [1.0, 8.0]]).to(E8M0)            # [out, in/32]
    w = dequant_fp4(packed, s)
    assert packed.dtype == torch.int8 and packed.shape == (2, 32)
    assert (w[0, :32] == 2).all() and (w[0, 32:] == 0.5).all() and (w[1, 32:] == 8).all()
    q2, s2 = quant_fp4(w)                          # the quantiser picks the smallest scale: every value -> 4.0
    assert s2.float().tolist() == [[0.5, 0.125], [0.25, 2.0]]
    assert (q2.view(torch.uint8) == 0x66).all() and torch.equal(dequant_fp4(q2, s2), w)


def test_quantisers_are_idempotent_on_random_weights():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 160, generator=g) * torch.logspace(-3, 2, 160)
    for storage in ("fp8", "fp4"):
        once = round_to_storage(w, storage)
        assert not torch.equal(once, w)                            # it really rounds
        assert torch.equal(round_to_storage(once, storage), once)  # and representable values come back exactly
    # FP4: scale <= 2·amax/6 per 32 values, grid steps <= 2 -> error <= amax/3 of the block
    err = (round_to_storage(w, "fp4") - w).abs().unflatten(-1, (-1, 32)).amax(-1)
    assert (err <= w.abs().unflatten(-1, (-1, 32)).amax(-1) / 3).all()


def test_official_storage_follows_the_official_model():
    assert official_storage("layers.3.ffn.experts.7.w2.weight") == "fp4"
    assert official_storage("layers.3.ffn.experts.7.w2.weight", expert_dtype=None) == "fp8"
    for n in ("layers.0.attn.wq_a.weight", "layers.0.attn.wq_b.weight", "layers.0.attn.wkv.weight",
              "layers.0.attn.wo_a.weight", "layers.0.attn.wo_b.weight", "layers.1.attn.indexer.wq_b.weight",
              "layers.0.ffn.shared_experts.w1.weight", "mtp.0.e_proj.weight", "mtp.0.h_proj.weight"):
        assert official_storage(n) == "fp8", n
    for n in ("layers.1.attn.compressor.wkv.weight", "layers.1.attn.indexer.compressor.wgate.weight",
              "layers.1.attn.indexer.weights_proj.weight", "embed.weight", "head.weight", "layers.2.ffn.gate.weight"):
        assert official_storage(n) == "bf16", n
    for n in ("layers.0.hc_attn_fn", "hc_head_scale", "layers.0.attn.attn_sink", "layers.1.attn.compressor.ape",
              "layers.1.ffn.gate.bias", "layers.0.attn.q_norm.weight", "norm.weight", "mtp.0.enorm.weight"):
        assert official_storage(n) == "fp32", n


# ============================================================================================ plain round trip
def test_plain_round_trip_is_bit_identical(tmp_path):
    m = random_tiny(2)
    dsv4.save(m, tmp_path / "ck")
    assert shards(tmp_path / "ck") == ["model-00001-of-00001.safetensors"]
    index = json.loads((tmp_path / "ck" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(m.state_dict())
    assert not any(k.endswith(("inv_freq", ".load")) for k in index["weight_map"])     # non-persistent buffers
    m2 = dsv4.load(tmp_path / "ck", progress=False)
    assert m2.numerics == "plain"
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    assert torch.equal(m(IDS), m2(IDS))
    for n, p in m2.named_parameters():                             # nothing left on meta; requires_grad kept
        assert p.device.type == "cpu" and p.dtype == torch.float32, n
        assert p.requires_grad == (not n.endswith("gate.bias")), n
    assert not any(b.is_meta for b in m2.buffers())


def test_load_into_meta_model_gives_requested_dtype(tmp_path):
    m = random_tiny(2)
    save_state(m.state_dict(), tmp_path / "ck", m.cfg.to_dict())
    m2 = meta_model(m.cfg)
    load_state_into(m2, tmp_path / "ck", dtype=torch.bfloat16, progress=False)
    for n, t in m2.state_dict().items():
        assert not t.is_meta, n
        assert t.dtype == (torch.int32 if n.endswith("tid2eid") else torch.bfloat16), n
    assert torch.equal(m2.embed.weight, m.embed.weight.bfloat16())


def test_load_into_real_model_keeps_parameter_objects(tmp_path):
    """The trainer resumes into a model whose parameters an optimiser already holds."""
    src, dst = random_tiny(2), random_tiny(5)
    dsv4.save(src, tmp_path / "ck")
    before = {n: id(p) for n, p in dst.named_parameters()}
    load_state_into(dst, tmp_path / "ck", progress=False)
    assert before == {n: id(p) for n, p in dst.named_parameters()}
    assert torch.equal(dst(IDS), src(IDS))


def test_several_shards_without_index_and_model_prefix(tmp_path):
    m = random_tiny(3)
    ck = tmp_path / "ck"
    save_state(m.state_dict(), ck, m.cfg.to_dict(), max_shard_bytes=200_000)
    files = shards(ck)
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    weight_map = json.loads((ck / INDEX_FILE).read_text())["weight_map"]
    assert set(weight_map.values()) == set(files)
    (ck / INDEX_FILE).unlink()
    for f in files:                                               # names as some exports write them
        rewrite(ck / f, lambda d: {"model." + k: v for k, v in d.items()})
    m2 = dsv4.load(ck, progress=False)
    assert torch.equal(m2(IDS), m(IDS))


# ============================================================================================ official format
@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """tiny-official with weights already rounded to what the official format stores, saved in it."""
    m = random_tiny(4, "tiny-official")
    expert_dtype = "fp4"
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(round_to_storage(p, official_storage(n, expert_dtype)))
    ck = tmp_path_factory.mktemp("official") / "ck"
    dsv4.save(m, ck, fmt="official")
    return m, ck


def test_official_files_match_the_hub_layout(official):
    m, ck = official
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    assert cfg["expert_dtype"] == "fp4"
    (file,) = shards(ck)
    with safe_open(str(ck / file), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    D, H, d = 128, 4, 128
    for w, shape, scale in [("layers.1.attn.wq_a", (128, D), (1, 1)), ("layers.1.attn.wq_b", (H * d, 128), (4, 1)),
                            ("layers.1.attn.wo_a", (2 * 64, H * d // 2), (1, 2)),
                            ("layers.1.attn.indexer.wq_b", (16 * 64, 128), (8, 1)),
                            ("mtp.0.e_proj", (D, D), (1, 1)), ("layers.0.ffn.shared_experts.w2", (D, 128), (1, 1))]:
        assert t[w + ".weight"].dtype == torch.float8_e4m3fn and t[w + ".weight"].shape == shape, w
        assert t[w + ".scale"].dtype == E8M0 and t[w + ".scale"].shape == scale, w
    e = "layers.2.ffn.experts.5.w2"                                # [D, inter] -> int8 [D, inter/2], scale [D, inter/32]
    assert t[e + ".weight"].dtype == torch.int8 and t[e + ".weight"].shape == (D, 64)
    assert t[e + ".scale"].dtype == E8M0 and t[e + ".scale"].shape == (D, 4)
    assert torch.equal(dequant_fp4(t[e + ".weight"], t[e + ".scale"]), m.layers[2].ffn.experts[5].w2.weight)
    for n in ("layers.1.attn.indexer.weights_proj.weight", "layers.1.attn.compressor.wkv.weight", "embed.weight",
              "head.weight"):
        assert t[n].dtype == torch.bfloat16 and n[:-6] + "scale" not in t, n
    for n in ("layers.1.attn.attn_sink", "layers.1.hc_ffn_fn", "norm.weight", "layers.1.ffn.gate.bias"):
        assert t[n].dtype == torch.float32, n
    assert t["layers.0.ffn.gate.tid2eid"].dtype == torch.int32


def test_official_round_trip_is_exact_for_representable_weights(official):
    m, ck = official
    m2 = dsv4.load(ck, progress=False)
    assert m2.numerics == "official"                               # numerics=None: from quantization_config
    assert dsv4.load(ck, numerics="plain", progress=False).numerics == "plain"
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    assert torch.equal(m.set_numerics("official")(IDS), m2(IDS))


def test_official_hub_name_variants_load(official, tmp_path):
    """model. prefix and weight_scale_inv (transformers-era names) load to the same weights."""
    m, ck = official
    alt = tmp_path / "alt"
    alt.mkdir()
    (alt / "config.json").write_text((ck / "config.json").read_text())
    d = load_file(ck / shards(ck)[0])
    d = {"model." + (k[:-len("scale")] + "weight_scale_inv" if k.endswith(".scale") else k): v for k, v in d.items()}
    save_file(d, str(alt / "model.safetensors"))
    m2 = dsv4.load(alt, progress=False)
    assert torch.equal(m2.layers[1].attn.wq_b.weight, m.layers[1].attn.wq_b.weight)
    assert torch.equal(m2.layers[1].ffn.experts[0].w1.weight, m.layers[1].ffn.experts[0].w1.weight)
    # convert.py's output: experts re-tagged float4_e2m1fn_x2, wo_a dequantised to bf16, MTP copies of embed / head
    d = load_file(ck / shards(ck)[0])
    for k in [k for k in d if k.endswith("wo_a.weight")]:
        d[k] = dequant_fp8_blocks(d[k], d.pop(k[:-6] + "scale"), dtype=torch.bfloat16)
    d = {k: v.view(torch.float4_e2m1fn_x2) if v.dtype == torch.int8 else v for k, v in d.items()}
    d["mtp.0.emb.tok_emb.weight"], d["mtp.0.head.weight"] = d["embed.weight"].clone(), d["head.weight"].clone()
    (alt / "model.safetensors").unlink()
    save_file(d, str(alt / "model0-mp1.safetensors"))
    m3 = dsv4.load(alt, progress=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k]), k


def test_official_format_needs_official_sizes(tmp_path):
    m = random_tiny(1)                                             # hidden_size 64: no 128-value blocks
    with pytest.raises(CheckpointError, match="hidden_size"):
        dsv4.save(m, tmp_path / "ck", fmt="official")
    assert not (tmp_path / "ck").exists()


# ============================================================================================ atomic save
def test_save_replaces_a_checkpoint_atomically(tmp_path):
    ck = tmp_path / "ck"
    dsv4.save(random_tiny(1), ck)
    m = random_tiny(2)
    dsv4.save(m, ck)
    assert torch.equal(dsv4.load(ck, progress=False).embed.weight, m.embed.weight)
    assert os.listdir(tmp_path) == ["ck"]                          # no temp or old directories left
    bad = dict(m.state_dict())
    bad["embed.weight"] = torch.empty(3, 3, device="meta")        # fails mid-way: old checkpoint untouched
    with pytest.raises(CheckpointError, match="embed.weight"):
        save_state(bad, ck, m.cfg.to_dict())
    assert os.listdir(tmp_path) == ["ck"]
    assert torch.equal(dsv4.load(ck, progress=False).embed.weight, m.embed.weight)


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="refusing"):
        dsv4.save(random_tiny(1), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ============================================================================================ errors
@pytest.fixture
def plain_ck(tmp_path):
    m = random_tiny(1)
    ck = tmp_path / "ck"
    save_state(m.state_dict(), ck, m.cfg.to_dict(), max_shard_bytes=300_000)
    return m, ck


def _load(m, ck):
    load_state_into(meta_model(m.cfg), ck, progress=False)


def _file_of(ck, name):
    return json.loads((ck / INDEX_FILE).read_text())["weight_map"][name]


def test_missing_tensor_is_named(plain_ck):
    m, ck = plain_ck
    f = _file_of(ck, "layers.2.attn.wkv.weight")
    rewrite(ck / f, lambda d: {k: v for k, v in d.items() if k != "layers.2.attn.wkv.weight"})
    (ck / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"1 model tensors are missing.*layers\.2\.attn\.wkv\.weight"):
        _load(m, ck)


def test_index_entry_absent_from_its_file(plain_ck):
    m, ck = plain_ck
    f = _file_of(ck, "layers.2.attn.wkv.weight")
    rewrite(ck / f, lambda d: {k: v for k, v in d.items() if k != "layers.2.attn.wkv.weight"})
    with pytest.raises(CheckpointError, match=rf"layers\.2\.attn\.wkv\.weight.*{f}"):
        _load(m, ck)


def test_unexpected_tensor_is_named_with_its_file(plain_ck):
    m, ck = plain_ck
    (ck / INDEX_FILE).unlink()
    f = shards(ck)[-1]
    rewrite(ck / f, lambda d: {**d, "layers.0.attn.extra_proj.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=rf"not in the model.*layers\.0\.attn\.extra_proj\.weight \(in {f}\)"):
        _load(m, ck)


def test_shape_mismatch_names_tensor_file_and_shapes(plain_ck):
    m, ck = plain_ck
    f = _file_of(ck, "embed.weight")
    with pytest.raises(CheckpointError, match=rf"embed\.weight in file .*{f}.*\(512, 64\).*\(256, 64\)"):
        load_state_into(meta_model(m.cfg.replace(vocab_size=256)), ck, progress=False)


def test_truncated_file(plain_ck):
    m, ck = plain_ck
    f = ck / shards(ck)[1]
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{f.name}.*truncated or corrupt"):
        _load(m, ck)


def test_index_pointing_at_missing_file(plain_ck):
    m, ck = plain_ck
    f = shards(ck)[0]
    (ck / f).unlink()
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE} maps \d+ tensors \(e\.g\. .+\) to file {f}"):
        _load(m, ck)


def test_no_safetensors_at_all(tmp_path):
    m = random_tiny(1)
    (tmp_path / "config.json").write_text(json.dumps(m.cfg.to_dict()))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        _load(m, tmp_path)


def test_illegal_encodings(plain_ck):
    m, ck = plain_ck
    (ck / INDEX_FILE).unlink()
    f = shards(ck)[0]
    d = load_file(ck / f)
    name = next(k for k in d if k.endswith("wq_a.weight"))
    cases = [({name: d[name].to(torch.int32)}, "dtype I32 cannot encode floating tensor"),
             ({name: d[name].to(torch.float8_e4m3fn)}, "no scale tensor"),
             ({name: d[name].to(torch.float8_e4m3fn), name[:-6] + "scale": torch.ones(5, 5).to(E8M0)},
              "does not fit the weight shape"),
             ({name[:-6] + "scale": torch.ones(1, 1).to(E8M0)}, "only FP8 / FP4 weights have scales")]
    for change, msg in cases:
        save_file({**d, **change}, str(ck / f))
        with pytest.raises(CheckpointError, match=rf"{name}.*{msg}|{msg}.*{name}|{name[:-6]}scale.*{msg}"):
            _load(m, ck)
    tid = next(k for k in d if k.endswith("tid2eid"))
    save_file({**d, tid: d[tid].float()}, str(ck / f))
    with pytest.raises(CheckpointError, match=rf"{tid} in file .*{f}.*cannot encode integer"):
        _load(m, ck)


def test_bad_format_name(tmp_path):
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        save_state({}, tmp_path / "x", preset("tiny").to_dict(), fmt="gguf")
