"""A thinking model's reasoning, split from its answer as it streams (`--reasoning-parser`).

Qwen3, QwQ and the DeepSeek-R1 distills write `<think> … </think>` before the answer. Either the
model writes the opening tag itself, or its chat template already put it at the end of the prompt
(DeepSeek-R1's templates, Qwen3 with thinking forced), in which case the reply starts inside the
reasoning and only `</think>` comes. Qwen3 with `enable_thinking: false` gets an empty think block in
the prompt, so its reply is all answer. A tag may arrive split across deltas: the few characters
that could still be the start of a tag are held back until the next delta or the end.
"""
from __future__ import annotations

from dataclasses import dataclass

# every parser name (config.REASONING_PARSERS) uses the same tags
START, END = "<think>", "</think>"


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


def starts_inside(prompt_text: str) -> bool:
    """The prompt's end opened a think block and did not close it (the template's generation
    prompt, or an assistant message being continued): the reply begins as reasoning."""
    return prompt_text.rfind(START) > prompt_text.rfind(END)


class ReasoningStream:
    def __init__(self, inside: bool):
        self.state = "reasoning" if inside else "opening"       # opening: may yet start with <think>
        self.held = ""
        self.fresh = True                                        # strip the newline after a tag, once

    def add(self, text: str) -> Split:
        out = Split()
        self.held += text
        while self.held:
            before = (self.state, len(self.held))
            getattr(self, f"_{self.state}")(out)
            if (self.state, len(self.held)) == before:           # waiting for more text
                break
        return out

    def finish(self) -> Split:
        """What is still held: unfinished reasoning stays reasoning, anything else is answer."""
        out = Split()
        if self.state == "reasoning":
            out.reasoning = self.held
        else:
            out.content = self.held
        self.held = ""
        return out

    def _opening(self, out: Split) -> None:
        lead = self.held.lstrip()
        if lead.startswith(START):
            self.held, self.state = lead[len(START):], "reasoning"
        elif not START.startswith(lead):                         # not a tag: all answer
            self.state, self.fresh = "content", False

    def _reasoning(self, out: Split) -> None:
        if self.fresh:
            if self.held == "\n" * len(self.held) and len(self.held) < 2:
                return
            self.held, self.fresh = self.held.removeprefix("\n"), False
        end = self.held.find(END)
        if end >= 0:
            out.reasoning += self.held[:end]
            self.held, self.state, self.fresh = self.held[end + len(END):], "content", True
            return
        keep = partial_tag(self.held, END)
        out.reasoning += self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]

    def _content(self, out: Split) -> None:
        if self.fresh:                                           # the blank lines after </think>
            stripped = self.held.lstrip("\n")
            if not stripped:
                return
            self.held, self.fresh = stripped, False
        out.content += self.held
        self.held = ""


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
