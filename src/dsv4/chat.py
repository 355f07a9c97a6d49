"""The DeepSeek-V4 chat format: messages -> prompt text -> ids, and a generated reply -> reasoning / content / tools.

Written to reproduce, character for character, the reference encoder DeepSeek publishes with the V4 weights
(`encoding/encoding_dsv4.py`, release version). docs/chat_format.md describes the format. In short:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{reply}<｜end▁of▁sentence｜><｜User｜>...

* The system text follows BOS with no marker. `<｜Assistant｜>` plus a thinking marker is written at the end of
  the user turn, so the prompt for the next reply ends `<｜Assistant｜></think>` (chat) or `<｜Assistant｜><think>`
  (thinking); the reply itself is `[{reasoning}</think>]{content}[tool calls]<｜end▁of▁sentence｜>`.
* Thinking mode keeps reasoning only for the turns after the last user message: earlier assistant turns are
  rendered as in chat mode (`</think>` then content). When any message declares tools nothing is dropped.
* Tool results (role "tool") are folded into a user turn as `<tool_result>...</tool_result>` blocks; tool calls
  are written in DeepSeek's DSML markup.

Extras carried over from the reference: roles "developer" and "latest_reminder", per-message "task" (quick
instruction tokens such as <｜action｜>), "wo_eos" on an assistant message, "response_format" on system/developer.
"""
from __future__ import annotations

import json
import re
from typing import Any

from .tokenizer import BOS_TOKEN, EOS_TOKEN

USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
LATEST_REMINDER_TOKEN = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
TASK_TOKENS = {name: f"<｜{name}｜>" for name in ("action", "query", "authority", "domain", "title", "read_url")}
ROLES = ("system", "user", "assistant", "developer", "latest_reminder", "tool")

# Markup of tool calls (DSML). The reply puts the block after the content, separated by a blank line.
_CALLS_OPEN = f"<{DSML}tool_calls>"
_CALLS_CLOSE = f"</{DSML}tool_calls>"
_CALLS_START = "\n\n" + _CALLS_OPEN
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM_CLOSE = f"</{DSML}parameter>"

# Prompt text the model was trained with (data, reproduced verbatim from the reference output): the tools section
# appended to a system/developer message that declares tools, and the response-format section.
_TOOLS_PROMPT_HEAD = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    "\"<｜DSML｜tool_calls>\" block like the following:\n\n"
    "<｜DSML｜tool_calls>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME\">\n"
    "<｜DSML｜parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</｜DSML｜parameter>\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "<｜DSML｜invoke name=\"$TOOL_NAME2\">\n"
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    "String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, "
    "booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n"
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside "
    "<think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
)
_TOOLS_PROMPT_TAIL = (
    "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)
_RESPONSE_FORMAT_PROMPT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cannot serialise {type(value).__name__} to JSON: {exc}") from exc


# ============================================================================================ validation
def _function_of(entry: Any, what: str) -> dict:
    """A tool or tool call in OpenAI form ({"type": "function", "function": {...}}) or bare ({"name": ...})."""
    if isinstance(entry, dict) and isinstance(entry.get("function"), dict):
        entry = entry["function"]
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ValueError(f"{what} must be a dict with a 'function' (or 'name') entry, got {entry!r}")
    return entry


def _validate(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with a 'role', got {type(m).__name__}: {m!r}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        where = f"message {i} ({role})"
        content = m.get("content")
        if role == "tool":
            if content is not None and not isinstance(content, (str, list)):
                raise ValueError(f"{where}: 'content' must be a str or a list of content blocks")
            if isinstance(content, list) and not all(isinstance(b, dict) for b in content):
                raise ValueError(f"{where}: content blocks must be dicts")
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"{where}: 'content' must be a str, got {type(content).__name__}")
        if role == "developer" and not content:
            raise ValueError(f"{where}: a developer message needs non-empty 'content'")
        if role == "latest_reminder" and content is None:
            raise ValueError(f"{where}: a latest_reminder message needs 'content'")
        for key, allowed in (("reasoning_content", ("assistant",)), ("tool_calls", ("assistant",)),
                             ("tools", ("system", "developer")), ("response_format", ("system", "developer"))):
            if m.get(key) is not None and role not in allowed:
                raise ValueError(f"{where}: '{key}' is only allowed on {' / '.join(allowed)} messages")
        if m.get("reasoning_content") is not None and not isinstance(m["reasoning_content"], str):
            raise ValueError(f"{where}: 'reasoning_content' must be a str")
        if m.get("tools") is not None:
            if not isinstance(m["tools"], list):
                raise ValueError(f"{where}: 'tools' must be a list")
            for t in m["tools"]:
                _function_of(t, f"{where}: each tool")
        if m.get("tool_calls") is not None:
            if not isinstance(m["tool_calls"], list):
                raise ValueError(f"{where}: 'tool_calls' must be a list")
            for c in m["tool_calls"]:
                if not isinstance(_function_of(c, f"{where}: each tool call").get("arguments"), str):
                    raise ValueError(f"{where}: tool-call 'arguments' must be a JSON string")
        task = m.get("task")
        if task is not None and task not in TASK_TOKENS:
            raise ValueError(f"{where}: unknown task {task!r}; expected one of {', '.join(TASK_TOKENS)}")


# ============================================================================================ preprocessing
def _tool_result_text(content: str | list | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n\n".join(b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                       for b in content)


def _fold_user_turns(messages: list[dict]) -> list[dict]:
    """Tool results and user text become "parts" of user turns. As in the reference, a tool result joins the
    user turn just before it, and so does a user message that follows a user turn without a task (so two user
    messages in a row become one turn, their texts separated by a blank line)."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role not in ("user", "tool"):
            out.append(dict(m))
            continue
        if role == "tool":
            part = {"kind": "tool_result", "id": m.get("tool_call_id") or "",
                    "text": _tool_result_text(m.get("content"))}
        else:
            part = {"kind": "text", "text": m.get("content") or ""}
        prev = out[-1] if out else None
        joinable = prev is not None and prev["role"] == "user" and (role == "tool" or prev.get("task") is None)
        if joinable:
            prev["parts"].append(part)
        else:
            turn = {"role": "user", "parts": [part]}
            if role == "user":
                turn.update({k: m[k] for k in ("task", "wo_eos") if k in m})
            out.append(turn)
    return out


def _order_tool_results(messages: list[dict]) -> None:
    """Within a user turn, tool results follow the order of the calls in the latest assistant turn that made
    calls (matched by id; unknown ids sort as position 0, stably). Text parts keep their slots."""
    order: dict[str, int] = {}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            order = {}
            for pos, call in enumerate(m["tool_calls"]):
                cid = call.get("id") or (call.get("function") or {}).get("id") or ""
                if cid:
                    order[cid] = pos
        elif m["role"] == "user":
            slots = [j for j, p in enumerate(m["parts"]) if p["kind"] == "tool_result"]
            if len(slots) > 1 and order:
                ranked = sorted((m["parts"][j] for j in slots), key=lambda p: order.get(p["id"], 0))
                for j, p in zip(slots, ranked):
                    m["parts"][j] = p


def _last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _without_old_reasoning(messages: list[dict]) -> list[dict]:
    """Thinking mode history pruning: before the last user/developer message, assistant turns lose their
    reasoning and developer messages are removed altogether."""
    cut = _last_user_index(messages)
    kept = []
    for i, m in enumerate(messages):
        if i < cut and m["role"] == "developer":
            continue
        if i < cut and m["role"] == "assistant":
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
        kept.append(m)
    return kept


# ============================================================================================ rendering
def _tools_section(tools: list) -> str:
    schemas = "\n".join(_json(_function_of(t, "tool")) for t in tools)
    return _TOOLS_PROMPT_HEAD + schemas + _TOOLS_PROMPT_TAIL


def _extras(m: dict) -> str:
    """Tools and response-format sections of a system / developer message."""
    text = ""
    if m.get("tools"):
        text += "\n\n" + _tools_section(m["tools"])
    if m.get("response_format"):
        text += "\n\n" + _RESPONSE_FORMAT_PROMPT + _json(m["response_format"])
    return text


def _dsml_call(call: dict) -> str:
    fn = _function_of(call, "tool call")
    try:
        args = json.loads(fn["arguments"])
    except json.JSONDecodeError:
        args = {"arguments": fn["arguments"]}   # the reference passes unparsable arguments through as one string
    if not isinstance(args, dict):
        raise ValueError(f"tool call {fn['name']!r}: arguments must encode a JSON object, got {fn['arguments']!r}")
    params = []
    for key, value in args.items():
        is_str = isinstance(value, str)
        params.append(f'<{DSML}parameter name="{key}" string="{"true" if is_str else "false"}">'
                      f'{value if is_str else _json(value)}{_PARAM_CLOSE}')
    return f'<{DSML}invoke name="{fn["name"]}">\n' + "\n".join(params) + "\n" + _INVOKE_CLOSE


def _body(i: int, msgs: list[dict], thinking: bool, keep_reasoning_before: int) -> str:
    m = msgs[i]
    role = m["role"]
    if role == "system":
        return (m.get("content") or "") + _extras(m)
    if role == "developer":
        return USER_TOKEN + m["content"] + _extras(m)
    if role == "user":
        return USER_TOKEN + "\n\n".join(
            p["text"] if p["kind"] == "text" else f"<tool_result>{p['text']}</tool_result>" for p in m["parts"])
    if role == "latest_reminder":
        return LATEST_REMINDER_TOKEN + m["content"]
    # assistant
    reasoning = ""
    after_task = i > 0 and msgs[i - 1].get("task") is not None
    if thinking and not after_task and i > keep_reasoning_before:
        reasoning = (m.get("reasoning_content") or "") + THINK_END
    calls = ""
    if m.get("tool_calls"):
        calls = _CALLS_START + "\n" + "\n".join(_dsml_call(c) for c in m["tool_calls"]) + "\n" + _CALLS_CLOSE
    return reasoning + (m.get("content") or "") + calls + ("" if m.get("wo_eos") else EOS_TOKEN)


def _tail(i: int, msgs: list[dict], thinking: bool, open_think_from: int) -> str:
    """What follows message i when the next message is the model's (assistant) or there is no next message:
    the assistant marker with <think> / </think> after a user turn, or a task token."""
    m = msgs[i]
    task = m.get("task")
    if task is not None:
        if task != "action":
            return TASK_TOKENS[task]
        return ASSISTANT_TOKEN + (THINK_START if thinking else THINK_END) + TASK_TOKENS[task]
    if m["role"] in ("user", "developer"):
        return ASSISTANT_TOKEN + (THINK_START if thinking and i >= open_think_from else THINK_END)
    return ""


def encode_messages(messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True, *,
                    drop_thinking: bool = True, add_bos: bool = True) -> str:
    """The prompt text for `messages` (dicts with "role" in system / user / assistant / tool / developer /
    latest_reminder and "content"; assistant turns may carry "reasoning_content" and "tool_calls", system /
    developer turns "tools", all OpenAI style).

    thinking: thinking mode (the reply opens with reasoning) instead of chat mode.
    add_generation_prompt: when the conversation ends with a user turn, end the text with the assistant marker
        and <think> / </think>, ready for generation (the reference always does this).
    drop_thinking: in thinking mode, render assistant turns before the last user message without their
        reasoning (the reference default). Ignored, as in the reference, when any message declares tools.
    add_bos: start with <｜begin▁of▁sentence｜>.
    """
    if not isinstance(thinking, bool):
        raise ValueError(f"thinking must be True or False, got {thinking!r}")
    _validate(messages)
    msgs = _fold_user_turns(list(messages))
    _order_tool_results(msgs)
    drop = drop_thinking and not any(m.get("tools") for m in msgs)
    if thinking and drop:
        msgs = _without_old_reasoning(msgs)
    last_user = _last_user_index(msgs)
    # Reasoning is kept for assistant turns after `keep_reasoning_before`, and <think> opens the reply after
    # user turns from `open_think_from` on; without dropping both are "everything".
    keep_reasoning_before = last_user if drop else -1
    open_think_from = last_user if drop else -1

    pieces = [BOS_TOKEN] if add_bos else []
    for i, m in enumerate(msgs):
        pieces.append(_body(i, msgs, thinking, keep_reasoning_before))
        is_last = i == len(msgs) - 1
        next_is_model = not is_last and msgs[i + 1]["role"] in ("assistant", "latest_reminder")
        if next_is_model or (is_last and add_generation_prompt):
            pieces.append(_tail(i, msgs, thinking, open_think_from))
    return "".join(pieces)


def encode_chat(tokenizer, messages: list[dict], thinking: bool = False, add_generation_prompt: bool = True,
                **options) -> list[int]:
    """Token ids of encode_messages(...) (the BOS is part of the text, so it is not added again)."""
    return tokenizer.encode(encode_messages(messages, thinking, add_generation_prompt, **options))


# ============================================================================================ parsing
_INVOKE_HEAD = re.compile(f'<{DSML}invoke name="([^"\\n]*)">\\n')
_PARAM = re.compile(f'<{DSML}parameter name="([^"\\n]*)" string="(true|false)">(.*?){_PARAM_CLOSE}\\n', re.DOTALL)


def _parse_calls(text: str, pos: int) -> tuple[list[dict], int]:
    """Parse the DSML block whose opening tag ends at `pos`; returns OpenAI-style calls and the position after
    the closing tag. ValueError on anything off the format."""
    def fail(why: str):
        raise ValueError(f"malformed tool-call block ({why}) near {text[pos:pos + 60]!r}")

    if not text.startswith("\n", pos):
        fail("expected a newline after the opening tag")
    pos += 1
    calls = []
    while not text.startswith(_CALLS_CLOSE, pos):
        head = _INVOKE_HEAD.match(text, pos)
        if head is None:
            fail("expected an invoke tag or the closing tag")
        pos = head.end()
        args: dict[str, tuple[str, bool]] = {}
        if text.startswith("\n" + _INVOKE_CLOSE, pos):      # a call without parameters
            pos += 1
        while not text.startswith(_INVOKE_CLOSE, pos):
            p = _PARAM.match(text, pos)
            if p is None:
                fail("expected a parameter tag or the end of the invoke")
            if p.group(1) in args:
                fail(f"parameter {p.group(1)!r} given twice")
            args[p.group(1)] = (p.group(3), p.group(2) == "true")
            pos = p.end()
        pos += len(_INVOKE_CLOSE)
        if not text.startswith("\n", pos):
            fail("expected a newline after the invoke")
        pos += 1
        # JSON text of the arguments: strings are quoted, other values were written as JSON already.
        arguments = "{" + ", ".join(f"{_json(k)}: {_json(v) if is_str else v}" for k, (v, is_str) in args.items()) \
            + "}"
        calls.append({"type": "function", "function": {"name": head.group(1), "arguments": arguments}})
    return calls, pos + len(_CALLS_CLOSE)


def parse_completion(text: str, thinking: bool | None = None) -> dict:
    """Split a generated reply (the text after the prompt, up to and including <｜end▁of▁sentence｜>) into
    {"role": "assistant", "reasoning_content", "content", "tool_calls", "finished"}.

    thinking: True for a thinking-mode reply ("{reasoning}</think>{content}..."), False for chat mode, None to
    decide by the presence of </think>. A leading <think> is tolerated. A reply cut short (no EOS) parses with
    finished=False; a tool-call block must be complete. ValueError on text after EOS, malformed tool calls, a
    thinking reply that ends without </think>, or stray special tokens in the content."""
    if not isinstance(text, str):
        raise ValueError(f"parse_completion expects str, got {type(text).__name__}")
    rest = text[len(THINK_START):] if text.startswith(THINK_START) else text
    reasoning = ""
    end_think = rest.find(THINK_END)
    calls_at = rest.find(_CALLS_START)
    if thinking is None:
        thinking = end_think != -1 and (calls_at == -1 or end_think < calls_at)
    if thinking:
        if end_think == -1 or (calls_at != -1 and calls_at < end_think):
            if EOS_TOKEN in rest or calls_at != -1:
                raise ValueError("thinking-mode reply has no </think> before its content or tool calls")
            return {"role": "assistant", "reasoning_content": rest, "content": "", "tool_calls": [],
                    "finished": False}
        reasoning, rest = rest[:end_think], rest[end_think + len(THINK_END):]

    eos_at = rest.find(EOS_TOKEN)
    calls_at = rest.find(_CALLS_START)
    tool_calls: list[dict] = []
    if calls_at != -1 and (eos_at == -1 or calls_at < eos_at):
        content = rest[:calls_at]
        if _CALLS_CLOSE not in rest[calls_at:]:
            raise ValueError("tool-call block is not closed")
        tool_calls, pos = _parse_calls(rest, calls_at + len(_CALLS_START))
        tail = rest[pos:]
        if tail and not tail.startswith(EOS_TOKEN):
            raise ValueError(f"unexpected text after the tool calls: {tail[:60]!r}")
        finished = bool(tail)
        after = tail[len(EOS_TOKEN):]
    elif eos_at != -1:
        content, finished, after = rest[:eos_at], True, rest[eos_at + len(EOS_TOKEN):]
    else:
        content, finished, after = rest, False, ""
    if after:
        raise ValueError(f"unexpected text after <｜end▁of▁sentence｜>: {after[:60]!r}")
    for marker in (BOS_TOKEN, EOS_TOKEN, THINK_START, THINK_END, DSML):
        if marker in content or marker in reasoning:
            raise ValueError(f"special token {marker!r} inside the reply's text")
    return {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": tool_calls,
            "finished": finished}


__all__ = ["ASSISTANT_TOKEN", "LATEST_REMINDER_TOKEN", "ROLES", "TASK_TOKENS", "THINK_END", "THINK_START",
           "USER_TOKEN", "encode_chat", "encode_messages", "parse_completion"]
