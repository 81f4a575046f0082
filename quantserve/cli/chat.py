"""`quantserve chat [MODEL]`: multi-turn chat in the terminal.

Interactive: type a message and press Enter; the reply streams, sampled with the model's
generation_config.json defaults. Ctrl-C stops the current reply, `end` clears the history,
`exit` (or Ctrl-D) quits. When stdin is not a terminal each line is one user turn, only the
replies are printed, one per turn, and they are greedy (reproducible) unless sampling flags
are given.
"""
from __future__ import annotations

import logging
import sys

from quantserve.cli.args import add_engine_args, add_model_arg, add_sampling_args, engine_config, generation_config
from quantserve.cli.terminal import chat_loop


def add_arguments(p) -> None:
    add_model_arg(p)
    add_engine_args(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt for the conversation")
    p.add_argument("--model-name", default=None,
                   help="LMDeploy's model name (internlm-chat-7b, internlm2-chat, qwen, llama2, llama3): picks the "
                        "built-in chat template it names; --chat-template wins over it")


def run(ns) -> int:
    from quantserve.api import Pipeline
    from quantserve.config import GenerationConfig

    logging.basicConfig(level=ns.log_level.upper(), stream=sys.stderr, format="%(message)s")
    pipe = Pipeline(ns.model_path, engine_config(ns), ns.chat_template or _named_template(ns.model_name))
    interactive = sys.stdin.isatty()
    # a person gets the model's sampling defaults; a script gets reproducible (greedy) replies
    defaults = GenerationConfig.from_model(pipe.model_path, do_sample=True, temperature=0.7, top_p=0.9)
    gen = generation_config(ns, defaults if interactive else GenerationConfig())
    if interactive:
        print(f"quantserve chat: {pipe.model_path}\n{pipe.engine.memory_summary()}\n"
              "Enter sends; 'end' clears the history; 'exit' quits; Ctrl-C stops a reply.", file=sys.stderr)
    chat_loop(lambda history: _reply(pipe, history, gen), ns.system, interactive)
    return 0


def _named_template(model_name: str | None) -> str | None:
    from quantserve.text import template_for_model_name

    template = template_for_model_name(model_name)
    if model_name and template is None:
        print(f"quantserve chat: --model-name {model_name}: no built-in template by that name; the model's own "
              "chat template is used", file=sys.stderr)
    return template


def _reply(pipe, history: list[dict], gen) -> str | None:
    """Stream one reply to stdout; None when the request was rejected."""
    from quantserve.engine.engine import RequestError

    parts: list[str] = []
    try:
        for chunk in pipe.stream_infer([history], gen_config=gen):
            parts.append(chunk.text)
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [stopped]")
    except RequestError as e:
        print(f"error: {e} (type 'end' to clear the history)", file=sys.stderr)
        return None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(parts)
