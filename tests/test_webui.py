"""The chat page in a real browser (Debian's headless Chromium driven by Playwright): streaming,
Stop that aborts the generation on the server, in-process mode, and readable errors.
Screenshots go to artifacts/."""
from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                 reason="needs Debian's chromium (apt-get install chromium; .ci/run does it)")]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def model_server(default_model):
    from conftest import RunningServer
    from quantserve.config import EngineConfig

    server = RunningServer(default_model, EngineConfig(session_len=4096, cache_max_tokens=16384,
                                                       enable_prefix_caching=True),
                           model_name="SmolLM2-135M-Instruct")
    yield server
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """The chat page, as a person uses it."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.goto(url)
        self.page.wait_for_selector("#qs-input textarea", timeout=60_000)

    def ask(self, text: str) -> None:
        self.page.fill("#qs-input textarea", text)
        self.page.press("#qs-input textarea", "Enter")

    def set_number(self, elem_id: str, value: float) -> None:
        """Type a value into a slider's number box (the settings accordion opens first)."""
        box = self.page.locator(f"#{elem_id} input[type=number]")
        if not box.is_visible():
            self.page.click("text=settings")
        box.fill(str(value))
        box.press("Enter")

    def greedy(self) -> None:
        self.set_number("qs-temperature", 0)

    def reply(self) -> str:
        bots = self.page.locator("#qs-chat .bot.message")
        return bots.last.inner_text() if bots.count() else ""

    def wait_reply(self, condition, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(text := self.reply()):
                return text
            time.sleep(0.2)
        raise AssertionError(f"the reply never satisfied the condition; it is {self.reply()!r}")

    def info(self, contains: str) -> str:
        self.page.wait_for_function("t => document.querySelector('#qs-info').innerText.includes(t)", arg=contains,
                                    timeout=30_000)
        return self.page.inner_text("#qs-info")

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def aborted(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r"^quantserve:requests_aborted_total\{[^}]*\} (\S+)$", text, re.M).group(1))


def running(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.M).group(1))


def launch_ui(url: str, api_key: str | None = None):
    from quantserve.serve.webui import Backend, build_ui

    ui = build_ui(Backend(url, api_key))
    port = free_port()
    ui.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return ui, f"http://127.0.0.1:{port}/"


def test_streams_a_reply_and_stop_aborts_it(browser, model_server):
    ui, page_url = launch_ui(model_server.url)
    try:
        page = Page(browser, page_url)
        info = page.info("weights")
        assert "SmolLM2-135M-Instruct" in info and "KV cache" in info and "GB" in info
        before = aborted(model_server.url)
        page.ask("Write a very long story about a dragon who learns to cook.")
        first = page.wait_reply(lambda t: len(t) > 20)
        grown = page.wait_reply(lambda t: len(t) > len(first) + 20)        # it streams
        assert grown.startswith(first[:10])
        page.page.click("#qs-stop")
        deadline = time.monotonic() + 10
        while aborted(model_server.url) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert aborted(model_server.url) == before + 1 and running(model_server.url) == 0
        stopped = page.reply()
        time.sleep(1.5)
        assert page.reply() == stopped and len(stopped) < 4000          # nothing more arrives
        assert "first token" in page.page.inner_text("#qs-stats")
        page.screenshot("webui-client-mode.png")
    finally:
        ui.close()


def test_a_full_reply_shows_its_speed_and_new_chat_clears(browser, model_server):
    ui, page_url = launch_ui(model_server.url)
    try:
        page = Page(browser, page_url)
        page.set_number("qs-max-tokens", 32)
        page.greedy()
        page.ask("What is the capital of France?")
        page.wait_reply(lambda t: "Paris" in t)
        page.ask("And of Italy?")                                   # the second turn sees the first
        page.wait_reply(lambda t: "Rome" in t)
        assert page.page.locator("#qs-chat .bot.message").count() == 2
        assert "tokens/s" in page.page.inner_text("#qs-stats")
        page.page.click("#qs-clear")
        page.page.wait_for_function("() => !document.querySelector('#qs-chat .bot.message')", timeout=10_000)
    finally:
        ui.close()


def test_enter_during_a_reply_takes_the_next_turn_when_it_ends(browser, model_server):
    ui, page_url = launch_ui(model_server.url)
    try:
        page = Page(browser, page_url)
        page.set_number("qs-max-tokens", 160)
        page.greedy()
        page.ask("Write a very long story about a dragon who learns to cook.")
        page.wait_reply(lambda t: len(t) > 20)                      # it streams
        page.ask("What is the capital of Italy?")
        page.wait_reply(lambda t: "Rome" in t)
        bots = page.page.locator("#qs-chat .bot.message")
        assert bots.count() == 2 and len(bots.first.inner_text()) > 200     # the story ran to its end
    finally:
        ui.close()


def test_in_process_mode_serves_page_and_api_together(browser, default_model):
    from conftest import RunningServer
    from quantserve.config import EngineConfig

    server = RunningServer(default_model, EngineConfig(session_len=2048, cache_max_tokens=4096), with_ui=True,
                           model_name="SmolLM2-135M-Instruct")
    try:
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "SmolLM2-135M-Instruct"
        page = Page(browser, server.url + "/")
        assert "float16" in page.info("weights")
        page.greedy()
        page.ask("What is the capital of France?")
        page.wait_reply(lambda t: "Paris" in t)
        page.screenshot("webui-in-process.png")
    finally:
        server.close()


def test_errors_are_readable(browser, tiny_server_model):
    from conftest import RunningServer

    dead = f"http://127.0.0.1:{free_port()}"
    ui, page_url = launch_ui(dead)
    try:
        page = Page(browser, page_url)
        assert "Cannot reach the server" in page.info("Cannot reach")
        page.ask("hello?")
        assert "cannot reach the server" in page.wait_reply(lambda t: "⚠️" in t)
    finally:
        ui.close()

    server = RunningServer(tiny_server_model, api_keys=["right"])
    try:
        ui, page_url = launch_ui(server.url + "/not/the/api", api_key="right")
        page = Page(browser, page_url)
        page.info("not a quantserve api_server")
        page.ask("hello?")
        assert "is this the address of an api_server" in page.wait_reply(lambda t: "⚠️" in t)
        ui.close()

        ui, page_url = launch_ui(server.url, api_key="wrong")
        page = Page(browser, page_url)
        page.info("API key")
        page.ask("hello?")
        assert "refused the API key" in page.wait_reply(lambda t: "⚠️" in t)
        ui.close()

        ui, page_url = launch_ui(server.url, api_key="right")
        page = Page(browser, page_url)
        page.ask("word " * 3000)                                  # longer than the 2048-token context
        reply = page.wait_reply(lambda t: "⚠️" in t)
        assert "maximum context length is 2048" in reply and "Traceback" not in reply
        page.screenshot("webui-error.png")
        ui.close()
    finally:
        server.close()


def test_two_people_chat_at_the_same_time(browser, model_server):
    ui, page_url = launch_ui(model_server.url)
    try:
        pages = [Page(browser, page_url) for _ in range(2)]
        for page in pages:
            page.ask("Write a long story about a lighthouse keeper.")
        first = pages[0].wait_reply(lambda t: len(t) > 30, timeout=30)
        pages[1].wait_reply(lambda t: len(t) > 30, timeout=8)        # it does not wait for the first story ...
        pages[0].wait_reply(lambda t: len(t) > len(first), timeout=8)   # ... which is still streaming
        for page in pages:
            page.page.click("#qs-stop")
    finally:
        ui.close()
