"""Tokenizer (dsv4.tokenizer) and chat format (dsv4.chat): real V4 tokenizer.json, CPU only, a few seconds.

The expected prompts come from two places:
* hand derivations from the rules of DeepSeek's reference encoder `encoding/encoding_dsv4.py` (each test names
  the rule it checks);
* three of the reference's own test cases (inputs and expected outputs, which are data), at the end of this file.
"""
from __future__ import annotations

import json
import random

import pytest

from dsv4.chat import encode_chat, encode_messages, parse_completion
from dsv4.tokenizer import BOS_TOKEN, EOS_TOKEN, V4Tokenizer, bundled_tokenizer_file, load_tokenizer

# ids of the V4 special tokens (tokenizer.json "added_tokens")
BOS, EOS, USER, ASSISTANT, THINK, END_THINK, DSML_ID, REMINDER = 0, 1, 128803, 128804, 128821, 128822, 128825, 128828
# BPE ids of the plain texts used below (pinned so a wrong merge table or pre-tokenizer shows up)
SYSTEM_IDS = [3476, 477, 260, 11502, 22896, 16]     # "You are a helpful assistant."
HI = [23166]                                         # "Hi"
Q_IDS = [20, 13, 20, 33]                             # "2+2?"
THANKS = [17003]                                     # "Thanks"
FOUR = [22]                                          # "4"

MIXED_TEXTS = [
    "héllo wörld",
    "日本語のテキストと中文",
    "emoji 😀🎉👍🏽 and 🇯🇵, family 👨‍👩‍👧",
    "Ελληνικά русский עברית العربية",
    "tab\tnewline\n\r\nend  ",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 ∮ E⋅da = Q",
]


@pytest.fixture(scope="module")
def tok() -> V4Tokenizer:
    return load_tokenizer()


# ============================================================================================ tokenizer
def test_bundled_tokenizer_is_v4(tok):
    assert bundled_tokenizer_file() is not None and tok.path == bundled_tokenizer_file().resolve()
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size == len(tok) == 129280            # V4 config vocab_size
    assert tok.decode([tok.bos_id]) == BOS_TOKEN and tok.decode([tok.eos_id]) == EOS_TOKEN
    for text, i in [("<｜User｜>", USER), ("<｜Assistant｜>", ASSISTANT), ("<think>", THINK), ("</think>", END_THINK),
                    ("｜DSML｜", DSML_ID), ("<｜latest_reminder｜>", REMINDER)]:
        assert tok.token_to_id(text) == i
        assert tok.encode(text) == [i]                      # added tokens are recognised inside text
        assert tok.id_to_token(i) == text
    assert load_tokenizer() is tok                          # cached per file


def test_encode_bos_only_on_request(tok):
    assert tok.encode("Hi") == HI
    assert tok.encode("Hi", add_bos=True) == [BOS] + HI
    assert tok.encode("") == [] and tok.encode("", add_bos=True) == [BOS]
    assert tok.encode(BOS_TOKEN + "Hi" + EOS_TOKEN) == [BOS] + HI + [EOS]
    assert tok.encode_batch(["Hi", "2+2?"], add_bos=True) == [[BOS] + HI, [BOS] + Q_IDS]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_round_trip_mixed_unicode(tok, text):
    ids = tok.encode(text)
    assert ids and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, add_bos=True)) == BOS_TOKEN + text
    assert tok.decode(tok.encode(text, add_bos=True), skip_special=True) == text


def test_decode_skip_special_keeps_role_markers(tok):
    ids = tok.encode(BOS_TOKEN + "<｜User｜>Hi<｜Assistant｜></think>4" + EOS_TOKEN)
    assert ids == [BOS, USER] + HI + [ASSISTANT, END_THINK] + FOUR + [EOS]
    # BOS/EOS are flagged special in tokenizer.json, the role and think markers are not
    assert tok.decode(ids, skip_special=True) == "<｜User｜>Hi<｜Assistant｜></think>4"
    assert BOS in tok.special_ids and EOS in tok.special_ids and USER not in tok.special_ids


def test_stream_decoder_matches_one_shot_decode(tok):
    text = "".join(MIXED_TEXTS)
    ids = tok.encode(text)
    # the text must really contain characters split across tokens, or this test proves nothing
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = tok.stream_decoder()
    pieces = [stream.put(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)           # never emits half a character
    assert stream.ids == ids
    # the emoji's 4 bytes come in 2 tokens: the first gives nothing, the second the whole character
    emoji = tok.encode(" 😀")
    assert len(emoji) == 2
    stream.reset()
    assert [stream.put(emoji[0]), stream.put(emoji[1])] == ["", " 😀"]


def test_stream_decoder_random_chunks_and_flush(tok):
    ids = tok.encode("".join(MIXED_TEXTS)) + [EOS]
    rng = random.Random(0)
    for _ in range(20):
        stream = tok.stream_decoder()
        out, pos = [], 0
        while pos < len(ids):
            n = rng.randint(1, 4)
            out.append(stream.put(ids[pos:pos + n]))
            pos += n
        out.append(stream.flush())
        assert "".join(out) == tok.decode(ids)
    # skip_special drops EOS in the stream as decode does
    stream = tok.stream_decoder(skip_special=True)
    assert "".join([stream.put(i) for i in ids] + [stream.flush()]) == tok.decode(ids, skip_special=True)
    # an unfinished character is held back, and flush() gives what decode() gives for it
    stream = tok.stream_decoder()
    first = tok.encode(" 😀")[0]
    assert stream.put(first) == ""
    assert stream.flush() == tok.decode([first]) == " \ufffd"
    assert stream.flush() == ""


def test_checkpoint_directory_tokenizer_is_preferred(tok, tmp_path):
    data = json.loads(tok.path.read_text(encoding="utf-8"))
    # mark the checkpoint's copy: rename the placeholder token 128000 so we can tell which file was loaded
    entry = next(t for t in data["added_tokens"] if t["id"] == 128000)
    entry["content"] = "<｜checkpoint▁marker｜>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    ck = load_tokenizer(tmp_path)
    assert ck.path == (tmp_path / "tokenizer.json").resolve()
    assert ck.token_to_id("<｜checkpoint▁marker｜>") == 128000
    assert load_tokenizer(tmp_path / "tokenizer.json") is ck    # the file itself works too
    with pytest.raises(KeyError):
        tok.token_to_id("<｜checkpoint▁marker｜>")            # the bundled one was not touched
    assert ck.encode("Hi", add_bos=True) == [BOS] + HI


def test_tokenizer_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)                             # a directory without tokenizer.json
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        V4Tokenizer(tmp_path)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([0, 129280])
    with pytest.raises(ValueError):
        tok.decode([-1])
    with pytest.raises(KeyError):
        tok.token_to_id("<｜no▁such▁token｜>")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


# ============================================================================================ chat: rendering
def test_chat_mode_single_turn_ids(tok):
    # Rules: BOS first; the system text follows BOS with no marker; a user turn is <｜User｜>{text}; the
    # generation prompt after the last user turn is <｜Assistant｜></think> in chat (non-thinking) mode.
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs) == BOS_TOKEN + "You are a helpful assistant.<｜User｜>Hi<｜Assistant｜></think>"
    assert encode_chat(tok, msgs) == [BOS] + SYSTEM_IDS + [USER] + HI + [ASSISTANT, END_THINK]


def test_thinking_mode_single_turn_ids(tok):
    # Rule: in thinking mode the generation prompt opens the reasoning block: <｜Assistant｜><think>.
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs, thinking=True) == (
        BOS_TOKEN + "You are a helpful assistant.<｜User｜>Hi<｜Assistant｜><think>")
    assert encode_chat(tok, msgs, thinking=True) == [BOS] + SYSTEM_IDS + [USER] + HI + [ASSISTANT, THINK]


HISTORY = [{"role": "user", "content": "2+2?"},
           {"role": "assistant", "reasoning_content": "Add.", "content": "4"},
           {"role": "user", "content": "Thanks"}]


def test_thinking_mode_drops_reasoning_of_earlier_turns(tok):
    # Rules: an assistant turn is [{reasoning}</think>]{content}<｜end▁of▁sentence｜>; in thinking mode the
    # reasoning of turns before the last user message is dropped, and the user turn before such an assistant
    # turn ends <｜Assistant｜></think> (as in chat mode); only the last user turn gets <think>.
    text = encode_messages(HISTORY, thinking=True)
    assert text == BOS_TOKEN + "<｜User｜>2+2?<｜Assistant｜></think>4" + EOS_TOKEN + "<｜User｜>Thanks<｜Assistant｜><think>"
    assert "Add." not in text
    assert encode_chat(tok, HISTORY, thinking=True) == (
        [BOS, USER] + Q_IDS + [ASSISTANT, END_THINK] + FOUR + [EOS, USER] + THANKS + [ASSISTANT, THINK])


def test_chat_mode_ignores_reasoning(tok):
    # Rule: in chat mode assistant turns never carry reasoning; every user turn ends <｜Assistant｜></think>.
    assert encode_chat(tok, HISTORY, thinking=False) == (
        [BOS, USER] + Q_IDS + [ASSISTANT, END_THINK] + FOUR + [EOS, USER] + THANKS + [ASSISTANT, END_THINK])


def test_thinking_mode_keeps_reasoning_when_asked_or_with_tools():
    # Rule: with drop_thinking=False every assistant turn keeps {reasoning}</think> and every user turn opens
    # <think>; declaring tools anywhere has the same effect even with drop_thinking=True.
    kept = (BOS_TOKEN + "<｜User｜>2+2?<｜Assistant｜><think>Add.</think>4" + EOS_TOKEN
            + "<｜User｜>Thanks<｜Assistant｜><think>")
    assert encode_messages(HISTORY, thinking=True, drop_thinking=False) == kept
    tools = [{"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}]
    with_tools = encode_messages([{"role": "system", "content": "S", "tools": tools}] + HISTORY, thinking=True)
    assert with_tools.endswith(kept[len(BOS_TOKEN):])
    assert '\n\n## Tools\n\n' in with_tools and '{"name": "noop", "parameters": {"type": "object"}}' in with_tools


def test_thinking_mode_drops_old_developer_messages():
    # Rule (reference _drop_thinking_messages): in thinking mode with dropping, a developer message before the
    # last user message is removed entirely (chat mode keeps it as a <｜User｜> turn).
    msgs = [{"role": "developer", "content": "d"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": "u"}]
    assert encode_messages(msgs, thinking=False) == (
        BOS_TOKEN + "<｜User｜>d<｜Assistant｜></think>x" + EOS_TOKEN + "<｜User｜>u<｜Assistant｜></think>")
    assert encode_messages(msgs, thinking=True) == BOS_TOKEN + "x" + EOS_TOKEN + "<｜User｜>u<｜Assistant｜><think>"


def test_reply_after_last_user_keeps_reasoning():
    # Rule: an assistant turn after the last user message keeps its reasoning in thinking mode (training layout
    # of a full conversation), and is followed by EOS.
    msgs = HISTORY + [{"role": "assistant", "reasoning_content": "Polite.", "content": "Welcome!"}]
    assert encode_messages(msgs, thinking=True).endswith(
        "<｜User｜>Thanks<｜Assistant｜><think>Polite.</think>Welcome!" + EOS_TOKEN)
    assert encode_messages(msgs, thinking=False).endswith("<｜User｜>Thanks<｜Assistant｜></think>Welcome!" + EOS_TOKEN)


def test_generation_prompt_and_bos_switches():
    assert encode_messages(HISTORY, add_generation_prompt=False) == (
        BOS_TOKEN + "<｜User｜>2+2?<｜Assistant｜></think>4" + EOS_TOKEN + "<｜User｜>Thanks")
    assert encode_messages(HISTORY[:1], add_bos=False) == "<｜User｜>2+2?<｜Assistant｜></think>"
    # wo_eos leaves an assistant turn open (to continue a prefix)
    open_turn = HISTORY[:1] + [{"role": "assistant", "content": "The answer", "wo_eos": True}]
    assert encode_messages(open_turn).endswith("<｜Assistant｜></think>The answer")


def test_user_turns_merge_and_tool_results():
    # Rules (reference merge_tool_messages): a tool result becomes <tool_result>...</tool_result> inside a user
    # turn; consecutive user/tool messages form one user turn joined by a blank line; results are put in the
    # order of the calls of the preceding assistant turn (by id).
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": '{"s": "é"}'}}]
    msgs = [{"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "tool_call_id": "b", "content": "B"},
            {"role": "tool", "tool_call_id": "a", "content": "A"},
            {"role": "user", "content": "and?"}]
    assert encode_messages(msgs) == (
        BOS_TOKEN + "<｜User｜>go<｜Assistant｜></think>"
        "\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="s" string="true">é</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        "</｜DSML｜tool_calls>" + EOS_TOKEN +
        "<｜User｜><tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nand?<｜Assistant｜></think>")
    two_users = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert encode_messages(two_users) == BOS_TOKEN + "<｜User｜>one\n\ntwo<｜Assistant｜></think>"


def test_quick_instruction_task_tokens():
    # Rules: a message with task="action" ends <｜Assistant｜></think><｜action｜> (chat) and the assistant turn
    # after a task message has no reasoning block; other tasks append their token right after the message.
    msgs = [{"role": "user", "content": "q", "task": "action"}, {"role": "assistant", "content": "Search"}]
    assert encode_messages(msgs) == BOS_TOKEN + "<｜User｜>q<｜Assistant｜></think><｜action｜>Search" + EOS_TOKEN
    assert encode_messages(msgs, thinking=True) == (
        BOS_TOKEN + "<｜User｜>q<｜Assistant｜><think><｜action｜>Search" + EOS_TOKEN)
    assert encode_messages([{"role": "user", "content": "q", "task": "query"}]) == BOS_TOKEN + "<｜User｜>q<｜query｜>"


# ============================================================================================ chat: official cases
@pytest.mark.parametrize("case,thinking", [(1, True), (2, True), (3, True)])
def test_official_reference_cases(tok, case, thinking):
    messages, prompt = OFFICIAL_CASES[case]
    assert encode_messages(messages, thinking=thinking) == prompt
    ids = encode_chat(tok, messages, thinking=thinking)
    assert ids[0] == BOS and ids.count(BOS) == 1
    assert ids.count(EOS) == sum(m["role"] == "assistant" for m in messages)
    assert tok.decode(ids) == prompt


def test_official_case_replies_parse_back():
    # The replies inside reference case 1, cut out of the prompt as the reference test does.
    prompt = OFFICIAL_1_PROMPT
    marker = "<｜Assistant｜><think>"
    start = prompt.find(marker) + len(marker)
    first = parse_completion(prompt[start:prompt.find("<｜User｜>", start)], thinking=True)
    assert first["reasoning_content"] == ("The user wants to know the weather in Beijing. "
                                          "I should use the get_weather tool.")
    assert first["content"] == "" and first["finished"]
    assert [c["function"]["name"] for c in first["tool_calls"]] == ["get_weather"]
    assert json.loads(first["tool_calls"][0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    last = parse_completion(prompt[prompt.rfind(marker) + len(marker):])   # thinking auto-detected
    assert last["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in last["content"] and last["tool_calls"] == []


# ============================================================================================ chat: parsing
def test_parse_completion_modes():
    r = parse_completion("Simple.</think>2 + 2 = 4." + EOS_TOKEN, thinking=True)
    assert (r["reasoning_content"], r["content"], r["tool_calls"], r["finished"]) == ("Simple.", "2 + 2 = 4.", [], True)
    assert parse_completion("<think>Simple.</think>4" + EOS_TOKEN)["reasoning_content"] == "Simple."
    r = parse_completion("Hello!" + EOS_TOKEN, thinking=False)
    assert (r["reasoning_content"], r["content"], r["finished"]) == ("", "Hello!", True)
    assert parse_completion("Hello!" + EOS_TOKEN)["reasoning_content"] == ""     # auto: no </think> -> chat
    # cut short by a token limit
    assert parse_completion("Hel", thinking=False) == {
        "role": "assistant", "reasoning_content": "", "content": "Hel", "tool_calls": [], "finished": False}
    r = parse_completion("still thinking", thinking=True)
    assert (r["reasoning_content"], r["content"], r["finished"]) == ("still thinking", "", False)


def test_tool_calls_round_trip():
    calls = [{"type": "function", "function": {"name": "get", "arguments": '{"city": "Paris", "days": 3}'}},
             {"type": "function", "function": {"name": "none", "arguments": "{}"}}]
    msgs = [{"role": "user", "content": "w?"},
            {"role": "assistant", "reasoning_content": "Need data.", "content": "Checking.", "tool_calls": calls}]
    text = encode_messages(msgs, thinking=True)
    reply = text[text.index("<think>") + len("<think>"):]
    r = parse_completion(reply, thinking=True)
    assert (r["reasoning_content"], r["content"], r["finished"]) == ("Need data.", "Checking.", True)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in r["tool_calls"]] == [
        ("get", {"city": "Paris", "days": 3}), ("none", {})]
    # re-encoding the parsed reply gives the same text
    assert encode_messages([msgs[0], r], thinking=True) == text


def test_parse_completion_errors():
    with pytest.raises(ValueError, match="after"):
        parse_completion("ok" + EOS_TOKEN + "more", thinking=False)
    with pytest.raises(ValueError, match="</think>"):
        parse_completion("no close" + EOS_TOKEN, thinking=True)
    with pytest.raises(ValueError, match="special token"):
        parse_completion("a</think>b" + EOS_TOKEN, thinking=False)
    bad_block = "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\nbroken\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    with pytest.raises(ValueError, match="tool-call"):
        parse_completion(bad_block + EOS_TOKEN, thinking=False)
    with pytest.raises(ValueError, match="not closed"):
        parse_completion("x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n", thinking=False)


# ============================================================================================ chat: bad input
@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
    ([{"content": "hi"}], "unknown role None"),
    (["hi"], "message 0 must be a dict"),
    ("hi", "must be a list"),
    ([{"role": "user", "content": ["part"]}], "'content' must be a str"),
    ([{"role": "user", "content": "hi", "reasoning_content": "r"}], "'reasoning_content' is only allowed"),
    ([{"role": "assistant", "reasoning_content": 3}], "'reasoning_content' must be a str"),
    ([{"role": "user", "content": "hi", "tools": []}], "'tools' is only allowed"),
    ([{"role": "developer", "content": ""}], "developer message needs"),
    ([{"role": "user", "content": "hi", "task": "dance"}], "unknown task 'dance'"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}], "JSON string"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1, 2]"}}]}], "JSON object"),
    ([{"role": "system", "tools": [{"type": "function"}]}], "each tool"),
    ([{"role": "tool", "content": 5}], "'content' must be a str or a list"),
])
def test_malformed_messages_raise(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages)


def test_thinking_flag_must_be_bool():
    with pytest.raises(ValueError, match="thinking"):
        encode_messages(HISTORY, thinking="thinking")


# ============================================================================================ reference cases
# Inputs and expected outputs of tests 1-3 of DeepSeek's reference encoder (encoding/tests/test_input_N.json
# and test_output_N.txt next to encoding_dsv4.py; as in its test, case 1's tools are attached to the first
# message). All three in thinking mode. 1: tools on the system message, a tool call and its result, reasoning
# kept in every turn; 2: no tools, reasoning of the first turn dropped; 3: latest_reminder, a developer message
# carrying tools, a tool result without call id, Chinese text.
OFFICIAL_1_MESSAGES = [{'role': 'system',
  'content': 'You are a helpful assistant.',
  'tools': [{'type': 'function',
             'function': {'name': 'get_weather',
                          'description': 'Get the weather for a specific location',
                          'parameters': {'type': 'object',
                                         'properties': {'location': {'type': 'string',
                                                                     'description': 'The city name'},
                                                        'unit': {'type': 'string',
                                                                 'enum': ['celsius', 'fahrenheit'],
                                                                 'description': 'Temperature unit'}},
                                         'required': ['location']}}},
            {'type': 'function',
             'function': {'name': 'search',
                          'description': 'Search the web for information',
                          'parameters': {'type': 'object',
                                         'properties': {'query': {'type': 'string', 'description': 'Search query'},
                                                        'num_results': {'type': 'integer',
                                                                        'description': 'Number of results to '
                                                                                       'return'}},
                                         'required': ['query']}}}]},
 {'role': 'user', 'content': "What's the weather in Beijing?"},
 {'role': 'assistant',
  'reasoning_content': 'The user wants to know the weather in Beijing. I should use the get_weather tool.',
  'tool_calls': [{'id': 'call_001',
                  'type': 'function',
                  'function': {'name': 'get_weather', 'arguments': '{"location": "Beijing", "unit": "celsius"}'}}]},
 {'role': 'tool',
  'tool_call_id': 'call_001',
  'content': '{"temperature": 22, "condition": "sunny", "humidity": 45}'},
 {'role': 'assistant',
  'reasoning_content': 'Got the weather data. Let me format a nice response.',
  'content': 'The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity.'}]

OFFICIAL_1_PROMPT = (
    '<｜begin▁of▁sentence｜>You are a helpful assistant.\n'
    '\n'
    '## Tools\n'
    '\n'
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writin"
    'g a "<｜DSML｜tool_calls>" block like the following:\n'
    '\n'
    '<｜DSML｜tool_calls>\n'
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    '...\n'
    '</｜DSML｜invoke>\n'
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    '...\n'
    '</｜DSML｜invoke>\n'
    '</｜DSML｜tool_calls>\n'
    '\n'
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, b'
    'ooleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n'
    '\n'
    'If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <'
    'think>...</think> BEFORE any tool calls or final response.\n'
    '\n'
    'Otherwise, output directly after </think> with tool calls or final response.\n'
    '\n'
    '### Available Tool Schemas\n'
    '\n'
    '{"name": "get_weather", "description": "Get the weather for a specific location", "parameters": {"ty'
    'pe": "object", "properties": {"location": {"type": "string", "description": "The city name"}, "unit"'
    ': {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}}, "requir'
    'ed": ["location"]}}\n'
    '{"name": "search", "description": "Search the web for information", "parameters": {"type": "object",'
    ' "properties": {"query": {"type": "string", "description": "Search query"}, "num_results": {"type": '
    '"integer", "description": "Number of results to return"}}, "required": ["query"]}}\n'
    '\n'
    'You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n'
    "<｜User｜>What's the weather in Beijing?<｜Assistant｜><think>The user wants to know the weather in Beij"
    'ing. I should use the get_weather tool.</think>\n'
    '\n'
    '<｜DSML｜tool_calls>\n'
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="location" string="true">Beijing</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="unit" string="true">celsius</｜DSML｜parameter>\n'
    '</｜DSML｜invoke>\n'
    '</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>{"temperature": 22, "condition": "sunny",'
    ' "humidity": 45}</tool_result><｜Assistant｜><think>Got the weather data. Let me format a nice respons'
    'e.</think>The weather in Beijing is currently sunny with a temperature of 22°C and 45% humidity.<｜en'
    'd▁of▁sentence｜>'
)

OFFICIAL_2_MESSAGES = [{'role': 'system', 'content': 'You are a helpful assistant.'},
 {'role': 'user', 'content': 'Hello'},
 {'role': 'assistant',
  'reasoning_content': 'The user said hello, I should greet back.',
  'content': 'Hi there! How can I help you?'},
 {'role': 'user', 'content': 'What is the capital of France?'},
 {'role': 'assistant',
  'reasoning_content': 'The user asks about the capital of France. It is Paris.',
  'content': 'The capital of France is Paris.'}]

OFFICIAL_2_PROMPT = (
    '<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello<｜Assistant｜></think>Hi there! How can'
    ' I help you?<｜end▁of▁sentence｜><｜User｜>What is the capital of France?<｜Assistant｜><think>The user as'
    'ks about the capital of France. It is Paris.</think>The capital of France is Paris.<｜end▁of▁sentence'
    '｜>'
)

OFFICIAL_3_MESSAGES = [{'role': 'system', 'content': '该助手为DeepSeek，由深度求索公司创造。'},
 {'role': 'latest_reminder', 'content': '2026-02-21,星期六,广州,App,中文'},
 {'role': 'developer',
  'content': '小柴胡冲剂和布洛芬能一起吃吗？\n\nCITATION FORMAT: 【{cursor_id}†L{start_line_id}(-L{end_line_id})?】',
  'tools': [{'type': 'function',
             'function': {'name': 'search',
                          'description': "Web search. Split multiple queries with '||'.",
                          'parameters': {'type': 'object',
                                         'properties': {'queries': {'type': 'string',
                                                                    'description': 'query1||query2'}},
                                         'required': ['queries'],
                                         'additionalProperties': False,
                                         '$schema': 'http://json-schema.org/draft-07/schema#'}}},
            {'type': 'function',
             'function': {'name': 'open',
                          'description': 'Batch open IDs (format 【{id}†...】) or URLs.',
                          'parameters': {'type': 'object',
                                         'properties': {'open_list': {'type': 'array',
                                                                      'items': {'type': 'object',
                                                                                'properties': {'id': {'description': 'ID '
                                                                                                                     'or '
                                                                                                                     'URL',
                                                                                                      'anyOf': [{'type': 'integer'},
                                                                                                                {'type': 'string'}],
                                                                                                      'default': -1},
                                                                                               'cursor': {'type': 'integer',
                                                                                                          'description': '',
                                                                                                          'default': -1},
                                                                                               'loc': {'type': 'integer',
                                                                                                       'description': 'Start '
                                                                                                                      'line',
                                                                                                       'default': -1},
                                                                                               'num_lines': {'type': 'integer',
                                                                                                             'description': '',
                                                                                                             'default': -1},
                                                                                               'view_source': {'type': 'boolean',
                                                                                                               'description': '',
                                                                                                               'default': False}},
                                                                                'additionalProperties': False},
                                                                      'description': ''}},
                                         'required': ['open_list'],
                                         'additionalProperties': False,
                                         '$schema': 'http://json-schema.org/draft-07/schema#'}}},
            {'type': 'function',
             'function': {'name': 'find',
                          'description': 'Find exact text pattern in pages.',
                          'parameters': {'type': 'object',
                                         'properties': {'find_list': {'type': 'array',
                                                                      'items': {'type': 'object',
                                                                                'properties': {'pattern': {'type': 'string',
                                                                                                           'description': ''},
                                                                                               'cursor': {'type': 'integer',
                                                                                                          'description': '',
                                                                                                          'default': -1}},
                                                                                'required': ['pattern'],
                                                                                'additionalProperties': False},
                                                                      'description': ''}},
                                         'required': ['find_list'],
                                         'additionalProperties': False,
                                         '$schema': 'http://json-schema.org/draft-07/schema#'}}}]},
 {'role': 'assistant',
  'content': '',
  'reasoning_content': '用户想知道小柴胡冲剂和布洛芬能否一起服用。',
  'tool_calls': [{'type': 'function',
                  'function': {'name': 'search', 'arguments': '{"queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"}'}}]},
 {'role': 'tool', 'content': '[0]'},
 {'role': 'assistant', 'content': '请及时就医。', 'reasoning_content': '现在开始组织回答。', 'tool_calls': []}]

OFFICIAL_3_PROMPT = (
    '<｜begin▁of▁sentence｜>该助手为DeepSeek，由深度求索公司创造。<｜latest_reminder｜>2026-02-21,星期六,广州,App,中文<｜User｜>小柴胡冲剂'
    '和布洛芬能一起吃吗？\n'
    '\n'
    'CITATION FORMAT: 【{cursor_id}†L{start_line_id}(-L{end_line_id})?】\n'
    '\n'
    '## Tools\n'
    '\n'
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writin"
    'g a "<｜DSML｜tool_calls>" block like the following:\n'
    '\n'
    '<｜DSML｜tool_calls>\n'
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    '...\n'
    '</｜DSML｜invoke>\n'
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    '...\n'
    '</｜DSML｜invoke>\n'
    '</｜DSML｜tool_calls>\n'
    '\n'
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, b'
    'ooleans, arrays, objects), pass the value in JSON format and set `string="false"`.\n'
    '\n'
    'If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <'
    'think>...</think> BEFORE any tool calls or final response.\n'
    '\n'
    'Otherwise, output directly after </think> with tool calls or final response.\n'
    '\n'
    '### Available Tool Schemas\n'
    '\n'
    '{"name": "search", "description": "Web search. Split multiple queries with \'||\'.", "parameters": {"t'
    'ype": "object", "properties": {"queries": {"type": "string", "description": "query1||query2"}}, "req'
    'uired": ["queries"], "additionalProperties": false, "$schema": "http://json-schema.org/draft-07/sche'
    'ma#"}}\n'
    '{"name": "open", "description": "Batch open IDs (format 【{id}†...】) or URLs.", "parameters": {"type"'
    ': "object", "properties": {"open_list": {"type": "array", "items": {"type": "object", "properties": '
    '{"id": {"description": "ID or URL", "anyOf": [{"type": "integer"}, {"type": "string"}], "default": -'
    '1}, "cursor": {"type": "integer", "description": "", "default": -1}, "loc": {"type": "integer", "des'
    'cription": "Start line", "default": -1}, "num_lines": {"type": "integer", "description": "", "defaul'
    't": -1}, "view_source": {"type": "boolean", "description": "", "default": false}}, "additionalProper'
    'ties": false}, "description": ""}}, "required": ["open_list"], "additionalProperties": false, "$sche'
    'ma": "http://json-schema.org/draft-07/schema#"}}\n'
    '{"name": "find", "description": "Find exact text pattern in pages.", "parameters": {"type": "object"'
    ', "properties": {"find_list": {"type": "array", "items": {"type": "object", "properties": {"pattern"'
    ': {"type": "string", "description": ""}, "cursor": {"type": "integer", "description": "", "default":'
    ' -1}}, "required": ["pattern"], "additionalProperties": false}, "description": ""}}, "required": ["f'
    'ind_list"], "additionalProperties": false, "$schema": "http://json-schema.org/draft-07/schema#"}}\n'
    '\n'
    'You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n'
    '<｜Assistant｜><think>用户想知道小柴胡冲剂和布洛芬能否一起服用。</think>\n'
    '\n'
    '<｜DSML｜tool_calls>\n'
    '<｜DSML｜invoke name="search">\n'
    '<｜DSML｜parameter name="queries" string="true">小柴胡冲剂 布洛芬 相互作用 一起吃</｜DSML｜parameter>\n'
    '</｜DSML｜invoke>\n'
    '</｜DSML｜tool_calls><｜end▁of▁sentence｜><｜User｜><tool_result>[0]</tool_result><｜Assistant｜><think>现在开始'
    '组织回答。</think>请及时就医。<｜end▁of▁sentence｜>'
)

OFFICIAL_CASES = {1: (OFFICIAL_1_MESSAGES, OFFICIAL_1_PROMPT), 2: (OFFICIAL_2_MESSAGES, OFFICIAL_2_PROMPT),
                  3: (OFFICIAL_3_MESSAGES, OFFICIAL_3_PROMPT)}
