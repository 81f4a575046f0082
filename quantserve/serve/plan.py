"""An OpenAI request body -> a Plan: prompt token ids, SamplingParams and the text-side options
(stop strings, tool parsing, logprobs). Everything that can be refused is refused here, with a
400 naming the field, before the engine sees the request.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from quantserve.config import GenerationConfig, Limits, SamplingParams
from quantserve.engine.request import Pooling
from quantserve.guided import Grammar, GrammarError, constraint_grammar, tool_calls_schema
from quantserve.serve.errors import APIError
from quantserve.serve.reasoning import starts_inside
from quantserve.serve.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from quantserve.serve.tools import ToolParser, template_supports_tools, tools_system_prompt
from quantserve.text import Tokenizer

FIM_MARKERS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
               ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


@dataclass
class Plan:
    prompt_ids: list[int]
    params: list[SamplingParams]            # one per choice
    stop_words: list[str] = field(default_factory=list)
    skip_special_tokens: bool = True
    tool_parser: ToolParser | None = None   # auto tool choice: parse the model's own format
    forced_tools: bool = False              # required / named: output is a JSON list of calls
    echo: str = ""                          # completions: prompt text put before the output
    first_index: int = 0                    # choice indices start here (completions with many prompts)
    reasoning: bool | None = None           # --reasoning-parser: None off; True the reply starts inside <think>
    pin_owner: str | None = None            # a session keeping the request's KV blocks for its next turn
    lora: str | None = None                 # the LoRA adapter it runs with (the model name it asked for)


@dataclass
class ModelInfo:
    tokenizer: Tokenizer
    session_len: int
    vocab_size: int
    defaults: GenerationConfig             # the model's generation_config.json sampling defaults
    tool_parser: ToolParser
    default_max_tokens: int = 1024         # when a request sets no max_tokens (capped by the context)
    generates: bool = True                 # False: an encoder, which only embeds or scores
    pooling: Pooling | None = None         # how /v1/embeddings pools it; None: it does not embed
    truncate: bool = False                 # long embedding inputs are cut to session_len (sentence-transformers)
    matryoshka_dimensions: list[int] | bool | None = None   # the `dimensions` it was trained to be cut to
    cross_encoder: bool = False            # scores (query, document) pairs with its classifier
    score_tokens: tuple[int, int] | None = None   # a decoder's single-token "yes" and "no", for rerank
    reasoning_parser: str | None = None    # split <think> reasoning into reasoning_content

    @property
    def capabilities(self) -> list[str]:
        """What /v1/models says this model can do."""
        return ((["chat", "completions"] if self.generates else []) + (["embeddings"] if self.pooling else [])
                + (["rerank", "score"] if self.cross_encoder or self.score_tokens else []))


def check_generates(model: ModelInfo) -> None:
    if not model.generates:
        raise APIError(400, "this model only embeds and scores: use /v1/embeddings, /v1/rerank or /v1/score",
                       "model", "model_not_supported")


def chat_plan(req: ChatCompletionRequest, model: ModelInfo, limits: Limits) -> Plan:
    check_generates(model)
    check_common(req, model, limits)
    tools = chat_tools(req)
    use_tools = bool(tools)
    prompt_ids = chat_prompt_ids(req, model)
    forced = use_tools and req.tool_choice not in (None, "auto")
    grammar = chat_grammar(req, model, tools if use_tools else [])
    parser = model.tool_parser if use_tools and not forced else None
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = sampling_params(req, model, len(prompt_ids), logprobs, grammar)
    skip = req.skip_special_tokens and not (parser and parser.keeps_special_tokens)
    reasoning = starts_inside(model.tokenizer.hf.decode(prompt_ids[-64:])) if model.reasoning_parser else None
    return Plan(prompt_ids, params, req.stop or [], skip, parser, forced, reasoning=reasoning)


def completion_plans(req: CompletionRequest, model: ModelInfo, limits: Limits) -> list[Plan]:
    check_generates(model)
    check_common(req, model, limits)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported", "echo", "unsupported")
    prompts = req.prompt if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else [req.prompt]
    if len(prompts) * req.n > limits.max_sequences:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} asks for {len(prompts) * req.n} sequences; "
                       f"at most {limits.max_sequences} per request", "prompt", "invalid_value")
    grammar = compiled(output_constraint(req), model)
    plans = []
    for i, prompt in enumerate(prompts):
        ids = encode_completion(prompt, req.suffix, model.tokenizer)
        check_token_ids(ids, model)
        params = sampling_params(req, model, len(ids), req.logprobs, grammar)
        echo = (prompt if isinstance(prompt, str) else model.tokenizer.decode(prompt)) if req.echo else ""
        plans.append(Plan(ids, params, req.stop or [], req.skip_special_tokens, echo=echo, first_index=i * req.n))
    return plans


def check_common(req: SamplingFields, model: ModelInfo, limits: Limits) -> None:
    if req.n > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n}, got {req.n}", "n", "invalid_value")
    stops = req.stop or []
    if len(stops) > limits.max_stops:
        raise APIError(400, f"at most {limits.max_stops} stop strings, got {len(stops)}", "stop", "invalid_value")
    if any(len(s) > limits.max_stop_len for s in stops):
        raise APIError(400, f"stop strings must be at most {limits.max_stop_len} characters", "stop", "invalid_value")
    bad = [k for k in req.logit_bias or {} if not 0 <= int(k) < model.vocab_size]
    if bad:
        raise APIError(400, f"logit_bias token id {bad[0]} is outside the vocabulary [0, {model.vocab_size})",
                       "logit_bias", "invalid_value")


def chat_tools(req: ChatCompletionRequest) -> list[dict]:
    """The request's functions, as the template and the grammar take them; none with tool_choice "none"."""
    if req.tool_choice == "none":
        return []
    return [t.function.model_dump(exclude_none=True) for t in req.tools or []]


def chat_prompt_ids(req: ChatCompletionRequest, model: ModelInfo) -> list[int]:
    return encode_chat(req.messages, model, chat_tools(req), req.do_preprocess, req.chat_template_kwargs,
                       req.continue_final_message)


def encode_chat(messages: list[ChatMessage], model: ModelInfo, tools: list[dict], do_preprocess: bool = True,
                template_kwargs: dict | None = None, continue_final: bool = False) -> list[int]:
    tok = model.tokenizer
    if not do_preprocess:
        return tok.hf.encode("".join(m.text() for m in messages), add_special_tokens=True)
    native = template_supports_tools(tok.chat_template)
    messages = [message_dict(m, native) for m in messages]
    if tools and not native:
        messages = with_tools_prompt(messages, tools)
    kwargs = dict(template_kwargs or {})
    if tools and native:
        kwargs["tools"] = [{"type": "function", "function": t} for t in tools]
    # continuing: the text ends inside the final assistant message instead of opening a new one
    ending = {"continue_final_message": True} if continue_final else {"add_generation_prompt": True}
    try:
        text = tok.hf.apply_chat_template(messages, chat_template=tok.chat_template, tokenize=False, **ending,
                                          **kwargs)
    except Exception as e:            # the template's own checks (role order, missing fields), or its errors
        raise APIError(400, f"the chat template refused these messages: {e}", "messages", "invalid_value") from None
    return tok.hf.encode(text, add_special_tokens=False)


def message_dict(m: ChatMessage, native_tools: bool) -> dict:
    d: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.tool_calls:
        calls = [{"name": c.function.name, "arguments": parse_arguments(c.function.arguments)} for c in m.tool_calls]
        if native_tools:
            d["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        else:
            d["content"] += "".join(f"<tool_call>\n{json.dumps(c, ensure_ascii=False)}\n</tool_call>" for c in calls)
    if m.name:
        d["name"] = m.name
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    return d


def parse_arguments(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise APIError(400, "tool call arguments must be a JSON object", "messages", "invalid_value") from None
    if not isinstance(value, dict):
        raise APIError(400, "tool call arguments must be a JSON object", "messages", "invalid_value")
    return value


def with_tools_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    prompt = tools_system_prompt(tools)
    if messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def encode_completion(prompt: str | list[int], suffix: str | None, tok: Tokenizer) -> list[int]:
    if suffix is None:
        return tok.hf.encode(prompt, add_special_tokens=True) if isinstance(prompt, str) else list(prompt)
    vocab = tok.hf.get_vocab()
    markers = next((m for m in FIM_MARKERS if all(t in vocab for t in m)), None)
    if markers is None:
        raise APIError(400, "suffix needs a fill-in-the-middle model; this one has no FIM tokens", "suffix", "unsupported")
    text = prompt if isinstance(prompt, str) else tok.decode(prompt)
    return tok.hf.encode(f"{markers[0]}{text}{markers[1]}{suffix}{markers[2]}", add_special_tokens=False)


def check_token_ids(ids: list[int], model: ModelInfo) -> None:
    if any(not 0 <= t < model.vocab_size for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {model.vocab_size})", "prompt", "invalid_value")


Constraint = tuple[str, str, Any]          # (the request field, vLLM's kind: json / regex / ..., its value)


def output_constraint(req: SamplingFields) -> Constraint | None:
    """The one constraint a request puts on its output, in any of its spellings; a second is a 400."""
    found: list[Constraint] = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        found.append(("response_format", "json", fmt.json_schema.schema_) if fmt.type == "json_schema"
                     else ("response_format", "json_object", True))
    if req.structured_outputs is not None:
        found += [(f"structured_outputs.{kind}", kind, v) for kind, v in req.structured_outputs.given().items()]
    for kind in ("json", "regex", "choice", "grammar"):
        if getattr(req, f"guided_{kind}") is not None:
            found.append((f"guided_{kind}", kind, getattr(req, f"guided_{kind}")))
    if len(found) > 1:
        raise APIError(400, f"{found[0][0]} and {found[1][0]} both constrain the output; give one of them",
                       found[1][0], "invalid_value")
    return found[0] if found else None


def chat_grammar(req: ChatCompletionRequest, model: ModelInfo, tools: list[dict]) -> Grammar | None:
    """The grammar of the reply: the request's constraint, or the calls of a required / named
    tool_choice (`tools`: those in use), which no other constraint may join."""
    constraint = output_constraint(req)
    if constraint and tools:
        raise APIError(400, f"{constraint[0]} and tools cannot be combined", constraint[0], "invalid_value")
    if tools and req.tool_choice not in (None, "auto"):
        named = req.tool_choice.function.name if not isinstance(req.tool_choice, str) else None
        chosen = [t for t in tools if named is None or t["name"] == named]
        constraint = ("tools", "json", tool_calls_schema(chosen, req.parallel_tool_calls and named is None))
    return compiled(constraint, model)


def compiled(constraint: Constraint | None, model: ModelInfo) -> Grammar | None:
    """The constraint's grammar, checked against the model's tokenizer now, so a bad regex or
    grammar is a 400 naming its field rather than a failure in the engine."""
    if constraint is None:
        return None
    param, kind, value = constraint
    try:
        return Grammar(model.tokenizer, model.vocab_size, constraint_grammar(kind, value))
    except GrammarError as e:
        raise APIError(400, f"invalid {'schema' if kind.startswith('json') else kind}: {e}", param,
                       "invalid_value") from None


def sampling_params(req: SamplingFields, model: ModelInfo, prompt_len: int, logprobs: int | None,
                    grammar: Grammar | None) -> list[SamplingParams]:
    room = model.session_len - prompt_len
    if room <= 0 or (req.max_new_tokens or 0) > room:
        raise APIError(400, f"This model's maximum context length is {model.session_len} tokens; the prompt has "
                       f"{prompt_len} tokens and {req.max_new_tokens or 1} were requested for the output",
                       "messages" if isinstance(req, ChatCompletionRequest) else "prompt", "context_length_exceeded")
    top_k = None if req.top_k is None else max(req.top_k, 0)            # vLLM's -1: off
    generation = model.defaults.updated(
        max_new_tokens=req.max_new_tokens or min(room, model.default_max_tokens), temperature=req.temperature,
        top_p=req.top_p, top_k=top_k, min_p=req.min_p, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos,
        min_new_tokens=req.min_new_tokens)
    extra = dict(logit_bias=tuple((int(k), v) for k, v in (req.logit_bias or {}).items()), logprobs=logprobs,
                 guide=grammar, priority=req.priority)
    seeds = [None] * req.n if req.seed is None else [(req.seed + i) % 2**64 for i in range(req.n)]
    eos = model.tokenizer.eos_token_ids
    return [generation.updated(random_seed=s).to_sampling_params(eos, **extra) for s in seeds]
