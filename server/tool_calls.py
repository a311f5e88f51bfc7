"""Tool calls: the grammar that holds a model to its own tool-call format, and the parsers that
turn its output into OpenAI `tool_calls`, whole or piece by piece as it streams.

Three formats (vLLM's parser names):
- `hermes` (Qwen2.5/3, Hermes, SmolLM3, the SmolLM2 template shipped here):
  `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, one pair of tags per call.
- `llama3_json` (Llama 3.1-3.3): `{"name": "f", "parameters": {...}}`, calls joined by `; `,
  optionally after `<|python_tag|>`.
- `mistral`: `[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]`, and the newer
  `[TOOL_CALLS]f[ARGS]{...}`.

A parser reads the whole text so far each time and says what is settled: the content outside
calls, and each call's name and arguments (the model's own JSON text, as far as it has come).
A stream sends the difference from what it sent before. Nothing is settled that later text could
change (a partial `<tool_c` is held back, and so is trailing whitespace before a possible call),
so the pieces a stream sends add up to exactly what the whole answer would hold.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

PARSERS = ("hermes", "llama3_json", "mistral")


@dataclass
class Call:
    name: str
    arguments: str  # the model's JSON text of the arguments, as far as it has come
    complete: bool = False


@dataclass
class Parsed:
    """What is settled of an output: its text outside calls, in order, and its calls."""

    parts: list[str | Call] = field(default_factory=list)
    more: bool = False  # text after the last part is not settled yet

    def add(self, part: str | Call) -> None:
        if isinstance(part, str) and self.parts and isinstance(self.parts[-1], str):
            self.parts[-1] += part
        else:
            self.parts.append(part)

    @property
    def calls(self) -> list[Call]:
        return [p for p in self.parts if isinstance(p, Call)]

    @property
    def content(self) -> str:
        """Text around calls loses the whitespace that separates it from them; the last text keeps
        its trailing whitespace only once the output is complete (a call may still follow)."""
        out = []
        for i, part in enumerate(self.parts):
            if isinstance(part, Call):
                continue
            if i > 0:
                part = part.lstrip()
            if i + 1 < len(self.parts) or self.more:
                part = part.rstrip()
            out.append(part)
        return "".join(out)


# --- JSON, read as far as it has come --------------------------------------------------------
_SCALAR = re.compile(r'-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null')
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')
_SPACE = re.compile(r"\s*")


def _value_end(text: str, start: int, memo: dict | None = None) -> int | None:
    """The end of the JSON value that begins at text[start], or None while it is unfinished.
    `memo` keeps how far each value was read, for a text that only grows (a stream): each call
    then reads only what is new, not the whole value again."""
    if text[start] not in '{["':
        m = _SCALAR.match(text, start)
        return m.end() if m and m.end() < len(text) else None  # a number may go on
    read_to, depth, in_string, escaped = (memo or {}).get(start, (start, 0, False, False))
    if depth < 0:
        return read_to  # read to its end before
    for pos in range(read_to, len(text)):
        ch = text[pos]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    return _remember(memo, start, pos + 1)
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return _remember(memo, start, pos + 1)
    if memo is not None:
        memo[start] = (len(text), depth, in_string, escaped)
    return None


def _remember(memo: dict | None, start: int, end: int) -> int:
    if memo is not None:
        memo[start] = (end, -1, False, False)
    return end


def _skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()


_PENDING = "pending"  # not yet known whether this is a call
_NOT_A_CALL = "not a call"


def _call_at(text: str, start: int, final: bool, memo: dict | None) -> tuple[Call, int | None] | str:
    """The call whose JSON object begins at text[start] ('{'), and where the object ends (None
    while unfinished); or _PENDING, or _NOT_A_CALL. The usual key order (name, then the
    arguments) streams as it comes; any other order is read once the object is complete."""
    head = _HEAD.match(text, start)
    end = _value_end(text, start, memo)
    if head:
        name = json.loads(f'"{head.group(1)}"')
        args_end = _value_end(text, head.end(), memo)
        if args_end is None:
            return Call(name, text[head.end():]), None
        return Call(name, text[head.end():args_end], complete=True), end
    if end is None:
        return _NOT_A_CALL if final else _PENDING
    try:
        obj = json.loads(text[start:end])
    except ValueError:
        return _NOT_A_CALL
    args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or args is None:
        return _NOT_A_CALL
    return Call(obj["name"], json.dumps(args, ensure_ascii=False), complete=True), end


def held(text: str, marker: str) -> int:
    """How many trailing characters of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _content_until(text: str, pos: int, marker: str, final: bool, out: Parsed) -> int | None:
    """Add the text from pos up to the next `marker` as content; its index, or None if none."""
    i = text.find(marker, pos)
    if i >= 0:
        out.add(text[pos:i])
        return i
    rest = text[pos:]
    if not final:
        rest = rest[:len(rest) - held(rest, marker)]
        out.more = True
    out.add(rest)
    return None


# --- the formats ------------------------------------------------------------------------------
class ToolFormat:
    name = ""
    trigger = ""  # in "auto", the text that opens a call
    separator = ""  # between calls, where several are made

    def parse(self, text: str, final: bool, memo: dict | None = None) -> Parsed:
        """What of `text` is settled (all of it when `final`). `memo`: reading state kept between
        calls on a text that only grows."""
        raise NotImplementedError

    def tag(self, function: dict) -> dict:
        """xgrammar's structural-tag format of one call of `function` (begin, schema, end)."""
        raise NotImplementedError

    def grammar(self, functions: list[dict], choice: str, parallel: bool) -> dict:
        """The structural tag for tool_choice `choice`: "auto" (text, and any call the model
        starts is held to a declared function and its schema), "required" (calls only, at least
        one), or one function named (that one call)."""
        tags = [self.tag(f) for f in functions]
        if choice == "auto":
            fmt = {"type": "triggered_tags", "triggers": [self.trigger], "tags": tags,
                   "stop_after_first": not parallel}
        else:
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": self.separator,
                   "at_least_one": True, "stop_after_first": not parallel or choice != "required"}
        return {"type": "structural_tag", "format": fmt}

    @staticmethod
    def new_id() -> str:
        return "call_" + secrets.token_hex(12)


def _schema_tag(begin: str, function: dict, end: str) -> dict:
    schema = function.get("parameters") or {"type": "object", "properties": {}}
    # one space at most between JSON tokens: free whitespace lets a small model pad an answer for ever
    content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
    return {"type": "tag", "begin": begin, "content": content, "end": end}


class Hermes(ToolFormat):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    trigger, separator = OPEN, "\n"

    def tag(self, function: dict) -> dict:
        return _schema_tag(f'{self.OPEN}\n{{"name": {json.dumps(function["name"])}, "arguments": ', function,
                           f"}}\n{self.CLOSE}")

    def parse(self, text: str, final: bool, memo: dict | None = None) -> Parsed:
        out, pos = Parsed(), 0
        while (i := _content_until(text, pos, self.OPEN, final, out)) is not None:
            body = i + len(self.OPEN)
            j = text.find(self.CLOSE, body)
            closed = j >= 0
            region = text[body:j] if closed else text[body:]
            if not closed and not final:
                region = region[:len(region) - held(region, self.CLOSE)]
            k = _skip_space(region, 0)
            if k < len(region) and region[k] == "{":
                # offsets in `region` count from its start: each call's region reads with its own memo
                found = _call_at(region, k, final or closed, None if memo is None else memo.setdefault(body, {}))
            else:
                found = _PENDING if k == len(region) and not (final or closed) else _NOT_A_CALL
            if isinstance(found, tuple):
                out.add(found[0])
            elif found == _NOT_A_CALL and (closed or final):
                out.add(text[i:j + len(self.CLOSE)] if closed else text[i:])
            if not closed or found == _PENDING:
                out.more = out.more or not final
                return out
            pos = j + len(self.CLOSE)
        return out


class Llama3Json(ToolFormat):
    name = "llama3_json"
    PYTHON_TAG = "<|python_tag|>"
    trigger, separator = '{"name": ', "; "
    _START = re.compile(r'\{\s*"name"\s*:')

    def tag(self, function: dict) -> dict:
        return _schema_tag(f'{{"name": {json.dumps(function["name"])}, "parameters": ', function, "}")

    def _next_start(self, text: str, pos: int, final: bool, out: Parsed) -> int | None:
        """Content up to the next `{"name":` (the python tag dropped); the call's index or None."""
        m = self._START.search(text, pos)
        stop = m.start() if m else len(text)
        if not m and not final:  # a `{` near the end may open a call: hold it back
            brace = text.rfind("{", pos)
            if brace >= 0 and '{"name":'.startswith(re.sub(r"\s", "", text[brace:])):
                stop = brace
            out.more = True
        piece = text[pos:stop].replace(self.PYTHON_TAG, "")
        if not m and not final:
            piece = piece[:len(piece) - held(piece, self.PYTHON_TAG)]
        out.add(piece)
        return m.start() if m else None

    def parse(self, text: str, final: bool, memo: dict | None = None) -> Parsed:
        out, pos = Parsed(), 0
        while (i := self._next_start(text, pos, final, out)) is not None:
            found = _call_at(text, i, final, memo)
            if found == _PENDING:
                out.more = True
                return out
            if found == _NOT_A_CALL:  # a JSON object that is not a call is content
                end = _value_end(text, i, memo)
                out.add(text[i:end] if end is not None else text[i:])
                if end is None:
                    return out
                pos = end
                continue
            call, end = found
            out.add(call)
            if end is None:
                out.more = not final
                return out
            pos = _skip_space(text, end)
            if text.startswith(";", pos):  # the separator between calls
                pos += 1
        return out


class Mistral(ToolFormat):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    ARGS = "[ARGS]"
    trigger, separator = MARKER, ", "
    _NAME = re.compile(r"([A-Za-z0-9_.-]+)\[ARGS\]")

    def tag(self, function: dict) -> dict:
        return _schema_tag(f'{{"name": {json.dumps(function["name"])}, "arguments": ', function, "}")

    def grammar(self, functions: list[dict], choice: str, parallel: bool) -> dict:
        """One JSON array of calls after the marker (several markers, each with one call, in "auto")."""
        if choice != "auto":
            inner = super().grammar(functions, choice, parallel)["format"]
            return {"type": "structural_tag", "format": {"type": "sequence", "elements": [
                {"type": "const_string", "value": self.MARKER + "["}, inner, {"type": "const_string", "value": "]"}]}}
        tags = [{**self.tag(f), "begin": self.MARKER + "[" + self.tag(f)["begin"], "end": "}]"} for f in functions]
        return {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": [self.MARKER],
                                                     "tags": tags, "stop_after_first": not parallel}}

    @staticmethod
    def new_id() -> str:  # Mistral's templates take exactly nine letters and digits
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))

    def parse(self, text: str, final: bool, memo: dict | None = None) -> Parsed:
        out, pos = Parsed(), 0
        while (i := _content_until(text, pos, self.MARKER, final, out)) is not None:
            pos = _skip_space(text, i + len(self.MARKER))
            if pos == len(text):
                out.more = not final
                return out
            read = self._array if text[pos] == "[" else self._named
            end = read(text, pos, final, out, memo)
            if end is None:
                out.more = out.more or not final
                return out
            pos = end
        return out

    def _array(self, text: str, pos: int, final: bool, out: Parsed, memo: dict | None) -> int | None:
        """`[{call}, {call}]` from text[pos]; the index after it, or None while unfinished."""
        pos += 1
        while True:
            pos = _skip_space(text, pos)
            if pos == len(text):
                return None
            if text[pos] == "]":
                return pos + 1
            if text[pos] == ",":
                pos += 1
                continue
            if text[pos] != "{":
                return pos  # not the format: the rest is content
            found = _call_at(text, pos, final, memo)
            if not isinstance(found, tuple):
                if found == _NOT_A_CALL:
                    out.add(text[pos:])
                return None
            out.add(found[0])
            if found[1] is None:
                return None
            pos = found[1]

    def _named(self, text: str, pos: int, final: bool, out: Parsed, memo: dict | None) -> int | None:
        """`name[ARGS]{...}` from text[pos]."""
        m = self._NAME.match(text, pos)
        if m is None:
            if final or not re.fullmatch(r"[A-Za-z0-9_.-]*(\[A?R?G?S?)?", text[pos:]):
                return pos  # not the format: the rest is content
            return None
        start = _skip_space(text, m.end())
        if start == len(text):
            return None
        end = _value_end(text, start, memo)
        out.add(Call(m.group(1), text[start:end] if end is not None else text[start:], complete=end is not None))
        return end


FORMATS: dict[str, ToolFormat] = {f.name: f for f in (Hermes(), Llama3Json(), Mistral())}


def detect(chat_template: str | None) -> str | None:
    """The format a chat template shows its model, where only one fits."""
    if not chat_template:
        return None
    found = [name for name, marker in (("hermes", "<tool_call>"), ("mistral", "[TOOL_CALLS]"),
                                       ("llama3_json", "<|python_tag|>")) if marker in chat_template]
    return found[0] if len(found) == 1 else None


class ToolCallStream:
    """One choice's output read as it grows: each feed gives what is new to send, as the content
    delta and OpenAI `delta.tool_calls` entries (id, type and name once, then argument pieces)."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.text = ""
        self.sent_content = 0
        self.ids: list[str] = []
        self.sent_args: list[int] = []
        self.parsed = Parsed()
        self.memo: dict = {}

    def feed(self, piece: str, final: bool) -> tuple[str, list[dict]]:
        self.text += piece
        self.parsed = parsed = self.fmt.parse(self.text, final, self.memo)
        content = parsed.content
        new_content, self.sent_content = content[self.sent_content:], len(content)
        deltas = []
        for index, call in enumerate(parsed.calls):
            if index == len(self.ids):
                self.ids.append(self.fmt.new_id())
                self.sent_args.append(len(call.arguments))
                deltas.append({"index": index, "id": self.ids[index], "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > self.sent_args[index]:
                deltas.append({"index": index, "function": {"arguments": call.arguments[self.sent_args[index]:]}})
                self.sent_args[index] = len(call.arguments)
        return new_content, deltas

    def tool_calls(self) -> list[dict]:
        """Every call as the whole answer's `message.tool_calls` holds them."""
        return [{"id": self.ids[i], "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for i, c in enumerate(self.parsed.calls)]


def finish_reason(reason: str | None, stream: ToolCallStream) -> str | None:
    """A complete answer that made calls ends with "tool_calls" (a cut one keeps "length")."""
    return "tool_calls" if reason == "stop" and stream.ids else reason
