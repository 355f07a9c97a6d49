"""Dissection of DeepSeek-V4 models: hooks that reduce every layer's activations to statistics as the forward
pass runs (`capture`), metric functions (`metrics`), the report (report.json + report.html) and `dsv4 inspect`.

    import dsv4, dsv4.inspect
    model = dsv4.build("tiny")
    with dsv4.inspect.capture(model, what=["blocks", "gates"]) as cap:
        cap.run(ids, label="factual", mode="chat")
    rep = dsv4.inspect.inspect_model(model, tokenizer)        # built-in prompts, chat + thinking
    dsv4.inspect.write_report(rep, "inspect-out")

docs/inspect.md documents every metric and the report schema.
"""
from . import metrics
from .analyze import SCHEMA, build_report
from .capture import ALL, Capture, CaptureError, capture
from .prompts import BUILTIN, MODES, Prompt, encode_prompt, load_prompts
from .report import write_report
from .runner import inspect_model

__all__ = ["ALL", "BUILTIN", "MODES", "SCHEMA", "Capture", "CaptureError", "Prompt", "build_report", "capture",
           "encode_prompt", "inspect_model", "load_prompts", "metrics", "write_report"]
