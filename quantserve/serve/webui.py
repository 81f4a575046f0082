"""`quantserve serve gradio`: a chat page (Gradio) in front of an OpenAI-compatible server.

Client mode talks to a running api_server (URL); in-process mode serves the page and the API
from one process and port (`/` the page, `/v1` the API). Either way the page streams through the
official openai client, so what the page shows is what any client gets: replies stream, Stop
closes the stream (the server aborts the request and frees its KV blocks), errors come back as
one readable line, and each reply shows its time to first token and speed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import openai

WARNING = "\n\n⚠️ "          # starts an error note inside an assistant bubble


@dataclass
class Settings:
    system: str
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: float | None


class Backend:
    """The server the page talks to."""

    def __init__(self, base_url: str, api_key: str | None = None):
        base = base_url.rstrip("/")
        self.root = base.removesuffix("/v1")
        self.api_key = api_key
        self._model: str | None = None
        self.client = openai.AsyncOpenAI(base_url=self.root + "/v1", api_key=api_key or "none", max_retries=0,
                                         timeout=httpx.Timeout(600, connect=5))

    async def info_markdown(self) -> str:
        """The model, its precision and the server's memory table, or why they are not available."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                r = await http.get(self.root + "/info", headers=headers)
        except httpx.HTTPError:
            return f"**Cannot reach the server at {self.root}** — is `quantserve serve api_server` running there?"
        if r.status_code == 404:
            return f"**{self.root} is not a quantserve api_server** (no /info there); chat may still work"
        if r.status_code != 200:
            return f"**{self.root}:** {error_text(r)}"
        i = r.json()
        return (f"**{i['model']}** · weights {i['weights']} · KV cache {i['kv_cache']} · "
                f"{i['kv_cache_tokens']:,} KV tokens · context {i['session_len']:,}\n\n```\n{i['memory']}\n```")

    async def stream(self, messages: list[dict], s: Settings):
        """Yield ("text", delta) as the reply streams, then ("usage", completion_tokens)."""
        extra = {"top_k": s.top_k} if s.top_k > 0 else {}
        stream = await self.client.chat.completions.create(
            model=await self.model_id(), messages=messages, stream=True, stream_options={"include_usage": True},
            temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
            seed=int(s.seed) if s.seed is not None else None, extra_body=extra)
        async with stream:
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield "text", chunk.choices[0].delta.content
                if chunk.usage is not None:
                    yield "usage", chunk.usage.completion_tokens

    async def model_id(self) -> str:
        if self._model is None:
            self._model = (await self.client.models.list()).data[0].id
        return self._model


def error_text(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


def describe_error(e: Exception, root: str) -> str:
    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach the server at {root} — is it running?"
    if isinstance(e, openai.AuthenticationError):
        return "the server refused the API key (start the page with --api-key KEY)"
    if isinstance(e, openai.NotFoundError) and "model" not in str(e.body):
        return f"{root} has no OpenAI API — is this the address of an api_server (http://host:port)?"
    if isinstance(e, openai.APIStatusError):
        body = e.body if isinstance(e.body, dict) else {}
        return f"the server said ({e.status_code}): {body.get('message') or e.message}"
    return f"{type(e).__name__}: {e}"


def speed_line(start: float, first: float | None, end: float, tokens: int) -> str:
    """Time to first token and decode speed (tokens after the first over the time since it)."""
    if first is None:
        return ""
    rate = f" · {(tokens - 1) / (end - first):.1f} tokens/s" if tokens > 1 and end > first else ""
    return f"first token {first - start:.2f} s{rate} · {tokens} tokens"


async def respond(backend: Backend, message: str, history: list[dict], *settings):
    """The chat handler: (history, stats) updates while the reply streams."""
    s = Settings(*settings)
    if not message.strip():
        yield history, ""
        return
    history = history + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    messages = ([{"role": "system", "content": s.system}] if s.system.strip() else []) + conversation(history[:-1])
    start, first, tokens = time.monotonic(), None, 0
    yield history, "…"
    try:
        async for kind, value in backend.stream(messages, s):
            if kind == "usage":
                tokens = value
                continue
            first = first or time.monotonic()
            tokens += 1                 # one chunk per token while streaming; usage gives the exact count
            history[-1]["content"] += value
            yield history, speed_line(start, first, time.monotonic(), tokens)
    except Exception as e:              # shown on the page; the page keeps working
        history[-1]["content"] += f"{WARNING}{describe_error(e, backend.root)}"
    yield history, speed_line(start, first, time.monotonic(), tokens)


def conversation(history: list[dict]) -> list[dict]:
    """The history as the model should see it: error notes cut off, failed turns left out."""
    turns: list[dict] = []
    for m in history:
        content = text_of(m["content"]).split(WARNING)[0]
        if m["role"] == "assistant" and not content:
            if turns and turns[-1]["role"] == "user":
                turns.pop()
            continue
        turns.append({"role": m["role"], "content": content})
    return turns


def text_of(content) -> str:
    """Gradio hands history back with content as a list of parts ({"type": "text", "text": …})."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def build_ui(backend: Backend, title: str = "quantserve"):
    import gradio as gr

    with gr.Blocks(title=title) as ui:
        gr.Markdown(f"## {title}")
        info = gr.Markdown("loading model information…", elem_id="qs-info")
        chat = gr.Chatbot(label="chat", height=460, buttons=["copy"], elem_id="qs-chat")
        stats = gr.Markdown("", elem_id="qs-stats", elem_classes=["qs-stats"])
        with gr.Row():
            box = gr.Textbox(placeholder="Ask something and press Enter", show_label=False, scale=8,
                             elem_id="qs-input")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="qs-send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="qs-stop")
            clear = gr.Button("New chat", scale=1, elem_id="qs-clear")
        with gr.Accordion("settings", open=False):
            system = gr.Textbox(label="system prompt", value="", lines=2)
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature", elem_id="qs-temperature")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p")
                top_k = gr.Slider(0, 200, value=0, step=1, label="top-k (0 = off)")
                max_tokens = gr.Slider(16, 4096, value=512, step=16, label="max new tokens", elem_id="qs-max-tokens")
                seed = gr.Number(value=None, precision=0, label="seed (empty = random)")
        inputs = [box, chat, system, temperature, top_p, top_k, max_tokens, seed]

        async def handler(*args):
            """Empty the input box once, when the turn is taken: what the user types during the
            reply stays there."""
            cleared = False
            async for history, line in respond(backend, *args):
                yield history, (gr.skip() if cleared else ""), line
                cleared = True

        # the server does its own admission control: the page does not queue users behind each other;
        # Enter pressed while a reply streams takes the next turn when it ends, instead of being dropped
        runs = [trigger(handler, inputs, [chat, box, stats], concurrency_limit=None, trigger_mode="always_last")
                for trigger in (box.submit, send.click)]
        stop.click(None, None, None, cancels=runs)
        clear.click(lambda: ([], "", ""), None, [chat, box, stats], cancels=runs)
        ui.load(backend.info_markdown, None, info)
    return ui
