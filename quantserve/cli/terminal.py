"""The terminal conversation loop shared by `quantserve chat` and `quantserve serve api_client`.

Enter sends a turn, `end` clears the history, `exit` (or Ctrl-D) quits, Ctrl-C at the prompt
gives a fresh prompt. Piped stdin: one user turn per line.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


def chat_loop(reply: Callable[[list[dict]], str | None], system: str | None, interactive: bool) -> None:
    """`reply(history)` streams one answer and returns its text, or None if it was refused."""
    history = [{"role": "system", "content": system}] if system else []
    base = len(history)
    while (line := read_line(interactive)) is not None:
        text = line.strip()
        if text == "exit":
            break
        if text == "end":
            del history[base:]
            print("(history cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        answer = reply(list(history))
        if answer is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": answer})


def read_line(interactive: bool) -> str | None:
    try:
        return input("\nuser> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        return None
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return ""
