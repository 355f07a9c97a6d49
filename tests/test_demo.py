"""`dsv4 demo` end to end on a shrunken plan, and the byte-level tokenizer path that tiny checkpoints take through
`dsv4 generate` (config.json says "dsv4_tokenizer": "bytes")."""
import json

import pytest
import torch

import dsv4
from dsv4.cli import main
from dsv4.tokenizer import ByteTokenizer, V4Tokenizer, tokenizer_for_checkpoint


@pytest.fixture
def quick_plan(monkeypatch, tmp_path_factory):
    """The CPU plan cut to 6 steps on 0.4 MB of the embedded corpus, sequence length 16 then 32."""
    import dsv4.demo as demo
    plan = {"model": "tiny", "steps": 6, "batch": 2, "seq": 32, "lr": 1e-2, "warmup": 2,
            "seq_schedule": [[0, 16], [3, 32]], "eval_every": 6, "save_every": 6, "data_limit_mb": 0.4,
            "val_fraction": 0.05, "tensorboard": False,
            "data_dir": str(tmp_path_factory.mktemp("demo_shards") / "data")}
    monkeypatch.setitem(demo.PLANS, "cpu", plan)
    return plan


def test_demo_trains_samples_and_writes_the_report(tmp_path, quick_plan, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--quiet", "--sample-tokens", "8"]) == 0
    text = capsys.readouterr().out
    ckpt = out / "train" / "step_0000006"
    assert json.loads((ckpt / "config.json").read_text())["dsv4_tokenizer"] == "bytes"
    rows = [json.loads(line) for line in (out / "train" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["seq"] for r in steps] == [16, 16, 16, 32, 32, 32]            # progressive length
    assert steps[-1]["lm"] < steps[0]["lm"]
    assert f"next-token loss {steps[0]['lm']:.3f} → {steps[-1]['lm']:.3f}" in text
    report = json.loads((out / "inspect" / "report.json").read_text())
    assert report["schema"] == "dsv4.inspect.report/1" and (out / "inspect" / "report.html").exists()
    assert str(out / "inspect" / "report.html") in text
    # a second run reuses the finished training instead of repeating it
    assert main(["demo", "--out", str(out), "--device", "cpu", "--quiet", "--skip-inspect"]) == 0
    assert "reusing the finished run" in capsys.readouterr().out


def test_generate_command_uses_the_checkpoints_byte_tokenizer(tmp_path, capsys):
    model = dsv4.build("tiny", seed=3)
    ckpt = tmp_path / "ckpt"
    dsv4.save(model, ckpt)
    with pytest.warns(UserWarning, match="names no tokenizer"):     # vocab 512, none named: bytes, said aloud
        assert isinstance(tokenizer_for_checkpoint(ckpt, model.cfg.vocab_size), ByteTokenizer)
    with pytest.raises(ValueError, match="fits neither"):
        tokenizer_for_checkpoint(ckpt, 100)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "dsv4_tokenizer": "bytes"}))
    assert isinstance(tokenizer_for_checkpoint(ckpt, 512), ByteTokenizer)

    tok = ByteTokenizer()
    ids = tok.encode("def f(x):", add_bos=True)
    assert ids[0] == 0 and tok.decode(ids) == "def f(x):"
    expected = dsv4.generate(dsv4.load(ckpt, progress=False), ids, max_new_tokens=12)
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "def f(x):", "--max-new-tokens", "12",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert printed == tok.decode(expected) + "\n"


def test_byte_stream_decoder_waits_for_whole_characters():
    tok = ByteTokenizer()
    ids = tok.encode("naïve ☕ ok")
    dec = tok.stream_decoder()
    pieces = [dec.put(i) for i in ids]
    assert "".join(pieces) + dec.flush() == "naïve ☕ ok"
    assert all("\ufffd" not in p for p in pieces)
    assert tok.decode([5 + 2, 300, 1]) == "\x05"           # ids beyond the bytes and EOS carry no text


def test_v4_checkpoint_gets_the_v4_tokenizer(tmp_path):
    cfg = dsv4.preset("tiny").replace(vocab_size=129280)
    ckpt = tmp_path / "v4"
    dsv4.save(dsv4.build(cfg), ckpt)
    assert isinstance(tokenizer_for_checkpoint(ckpt, cfg.vocab_size), V4Tokenizer)


def test_generate_command_speculative_prints_greedy_text_and_acceptance(tmp_path, capsys):
    model = dsv4.build("tiny", seed=4)
    ckpt = tmp_path / "ckpt"
    dsv4.save(model, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "dsv4_tokenizer": "bytes"}))
    tok = ByteTokenizer()
    greedy = dsv4.generate(dsv4.load(ckpt, progress=False), tok.encode("abc", add_bos=True), max_new_tokens=10,
                           stop_ids=[tok.eos_id])
    capsys.readouterr()
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "abc", "--max-new-tokens", "10", "--speculative",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(greedy) + "\n"
    assert "drafts accepted" in out.err
    assert main(["generate", "--ckpt", str(ckpt), "--prompt", "abc", "--speculative", "--temperature", "0.5"]) == 2
