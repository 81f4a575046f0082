"""`quantserve serve api_client URL`: chat with a running server from the terminal, streamed.

Same keys as `quantserve chat`: Enter sends, `end` clears the history, `exit` or Ctrl-D quits,
Ctrl-C stops the current reply. Piped stdin: one user turn per line, replies only.
"""
from __future__ import annotations

import sys

from quantserve.cli.terminal import chat_loop


def run_client(url: str, api_key: str | None, model: str | None, system: str | None,
               temperature: float | None, max_tokens: int | None) -> int:
    import openai

    base = url.rstrip("/")
    client = openai.OpenAI(base_url=base if base.endswith("/v1") else base + "/v1", api_key=api_key or "none",
                           max_retries=0)
    try:
        model = model or client.models.list().data[0].id
    except openai.APIError as e:
        print(f"quantserve serve api_client: error: {url}: {describe(e)}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"connected to {url}, model '{model}'. Enter sends; 'end' clears the history; 'exit' quits.",
              file=sys.stderr)
    chat_loop(lambda history: stream_reply(client, model, history, temperature, max_tokens), system, interactive)
    return 0


def stream_reply(client, model: str, history: list[dict], temperature, max_tokens) -> str | None:
    import openai

    parts: list[str] = []
    try:
        stream = client.chat.completions.create(model=model, messages=history, stream=True,
                                                temperature=temperature, max_tokens=max_tokens)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                sys.stdout.write(parts[-1])
                sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    except openai.APIError as e:
        print(f"error: {describe(e)}", file=sys.stderr)
        return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)


def describe(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(error)
