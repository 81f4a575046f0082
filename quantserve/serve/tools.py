"""Function calling: each model family's tool-call text format, parsed into OpenAI tool calls.

- hermes (Qwen2.5, and the default): <tool_call>{"name": …, "arguments": {…}}</tool_call>
- internlm2 (InternLM2 / 2.5): <|action_start|><|plugin|>{"name": …, "parameters": {…}}<|action_end|>
- llama3: a bare JSON object {"name": …, "parameters": {…}} (after <|python_tag|> or at the start),
  several separated by ';'

Streaming: text before a call streams as content; from the first marker on it is held until the
end and then sent as tool-call deltas. Forced calls (tool_choice required / named) are generated
under a JSON-schema grammar instead, and parsed by `parse_forced`.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass


@dataclass
class ParsedCall:
    name: str
    arguments: str          # a JSON object, as text

    def to_openai(self) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


def _call_from_json(obj) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        args = _loads(args)
    if not isinstance(args, dict):         # OpenAI's contract: arguments are a JSON object
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _loads(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _json_values(text: str, separators: str = "") -> list | None:
    """Consecutive JSON values in `text`, with whitespace and `separators` between them; None if
    anything else is there. Strings inside the values may hold any character (';', tags)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] in separators):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def _calls_after(marker: str, text: str, end_markers: tuple[str, ...]) -> list[ParsedCall]:
    """Each `marker` opens one JSON object (a call), optionally closed by one of `end_markers`;
    only whitespace may sit between calls. Any deviation: no calls (the text stays content)."""
    calls, decoder, i = [], json.JSONDecoder(), 0
    while (i := _skip_space(text, i)) < len(text):
        if not text.startswith(marker, i):
            return []
        try:
            obj, i = decoder.raw_decode(text, _skip_space(text, i + len(marker)))
        except json.JSONDecodeError:
            return []
        call = _call_from_json(obj)
        if call is None:
            return []
        calls.append(call)
        i = _skip_space(text, i)
        i += next((len(m) for m in end_markers if text.startswith(m, i)), 0)
    return calls


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()
    keeps_special_tokens = False     # the markers are special tokens: decode without skipping them

    def find_start(self, text: str) -> int | None:
        hits = [i for m in self.markers if (i := text.find(m)) >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """How many trailing characters might be the start of a marker."""
        for n in range(max((len(m) for m in self.markers), default=1) - 1, 0, -1):
            if any(m.startswith(text[-n:]) for m in self.markers):
                return n
        return 0

    def split(self, text: str) -> tuple[str, list[ParsedCall]]:
        """Full output -> (content, calls). Text that looks like a call but does not parse stays content."""
        start = self.find_start(text)
        if start is None:
            return text, []
        calls = self.parse_calls(text[start:])
        return (text[:start].rstrip(), calls) if calls else (text, [])

    def parse_calls(self, text: str) -> list[ParsedCall]:
        raise NotImplementedError


class HermesParser(ToolParser):
    name = "hermes"
    markers = ("<tool_call>",)

    def parse_calls(self, text: str) -> list[ParsedCall]:
        return _calls_after("<tool_call>", text, ("</tool_call>",))


class InternLM2Parser(ToolParser):
    name = "internlm2"
    markers = ("<|action_start|>",)
    keeps_special_tokens = True

    def parse_calls(self, text: str) -> list[ParsedCall]:
        return _calls_after("<|action_start|><|plugin|>", re.sub(r"<\|action_start\|>\s*<\|plugin\|>",
                                                                  "<|action_start|><|plugin|>", text),
                            ("<|action_end|>", "<|im_end|>"))


class Llama3Parser(ToolParser):
    name = "llama3"
    markers = ("<|python_tag|>", "{")
    keeps_special_tokens = True

    def find_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if stripped.startswith(self.markers):
            return len(text) - len(stripped)
        return None

    def holdback(self, text: str) -> int:
        stripped = text.lstrip()
        return len(text) if not stripped or "<|python_tag|>".startswith(stripped) else 0

    def parse_calls(self, text: str) -> list[ParsedCall]:
        values = _json_values(re.sub(r"<\|(python_tag|eom_id|eot_id)\|>", "", text), separators=";")
        calls = [_call_from_json(v) for v in values or []]
        return calls if calls and all(calls) else []


PARSERS = {p.name: p for p in (HermesParser, InternLM2Parser, Llama3Parser)}
PARSERS["qwen"] = PARSERS["qwen2_5"] = HermesParser
PARSERS["internlm"] = InternLM2Parser


def parser_for(template: str, name: str | None = None) -> ToolParser:
    """--tool-call-parser, else the format the chat template speaks; hermes when it shows none."""
    if name is not None:
        return PARSERS[name]()
    if "<|action_start|>" in template or "<|plugin|>" in template:
        return InternLM2Parser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3Parser()
    return HermesParser()


def parse_forced(text: str) -> list[ParsedCall]:
    """Output generated under guided.tool_calls_schema: a JSON list of {name, arguments}."""
    items = _loads(text)
    if not isinstance(items, list):
        return []
    calls = [_call_from_json(i) for i in items]
    return calls if all(calls) else []


def template_supports_tools(template: str) -> bool:
    return "tools" in template


def tools_system_prompt(tools: list[dict]) -> str:
    """For chat templates that ignore `tools`: describe them in the hermes format."""
    listing = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    return ("You can call functions. Their signatures, as JSON schema, are inside <tools></tools>:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call one, reply with a JSON object with the function's name and arguments inside "
            '<tool_call></tool_call> tags, for example:\n<tool_call>\n{"name": "fn", "arguments": {"x": 1}}\n</tool_call>')


class ToolStream:
    """Incremental split of one choice's text into content deltas and, at the end, tool calls."""

    def __init__(self, parser: ToolParser):
        self.parser = parser
        self.text = ""
        self.sent = 0
        self.in_call = False

    def add(self, delta: str) -> str:
        """New text -> the content that is safe to stream now."""
        self.text += delta
        if self.in_call:
            return ""
        start = self.parser.find_start(self.text)
        if start is not None:
            self.in_call = True
            end = start
        else:
            end = len(self.text) - self.parser.holdback(self.text)
        out = self.text[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def finish(self) -> tuple[str, list[ParsedCall]]:
        """End of output -> (remaining content, tool calls)."""
        content, calls = self.parser.split(self.text)
        if calls:
            return content[self.sent:], calls
        return self.text[self.sent:], []
