"""vLLM's offline entry point, on the same Pipeline as pipeline():

    from quantserve import LLM, SamplingParams
    llm = LLM("path/to/model", quantization="w8a8")          # or awq, gptq, gguf, w4a16
    outputs = llm.generate(["Tell me about computer science."], SamplingParams(temperature=0, max_tokens=64))
    outputs[0].outputs[0].text          # vLLM's shape; outputs[0].text is the first completion's text

`generate` sends the prompt text as it is (no chat template), as vLLM does; `chat` applies the
model's template to message lists.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from quantserve.api import Pipeline
from quantserve.config import EngineConfig, GenerationConfig


@dataclass
class SamplingParams:
    """vLLM's names and defaults (max_tokens 16, temperature 1.0); temperature 0 is greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16     # None: up to the session length
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True

    def generation_config(self, session_len: int, seed: int | None) -> GenerationConfig:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return GenerationConfig(
            max_new_tokens=self.max_tokens or session_len, do_sample=self.temperature > 0,
            temperature=self.temperature, top_p=self.top_p, top_k=max(self.top_k, 0), min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, min_new_tokens=self.min_tokens, stop_words=stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            random_seed=self.seed if self.seed is not None else seed, skip_special_tokens=self.skip_special_tokens)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


ENGINE_KEYS = {f.name for f in fields(EngineConfig)}


class LLM:
    """LLM(model, quantization=None, dtype="auto", max_model_len=None, seed=None, **EngineConfig fields)."""

    def __init__(self, model: str | None = None, quantization: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int | None = None, **kwargs):
        unknown = sorted(set(kwargs) - ENGINE_KEYS)
        if unknown:
            raise TypeError(f"LLM() got unexpected arguments {unknown}; it takes EngineConfig's fields too")
        config = EngineConfig(dtype=dtype, session_len=max_model_len, quantization=quantization, **kwargs)
        self.pipe = Pipeline(model, config, progress=False)
        self.seed = seed

    def generate(self, prompts: str | Sequence[str], sampling_params: SamplingParams | Sequence[SamplingParams]
                 | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, with `n` completions each; prompts go in as raw text."""
        return self._run(_prompts(prompts), sampling_params, do_preprocess=False)

    def chat(self, messages: list[dict] | Sequence[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """One conversation (a message list) or several, through the model's chat template."""
        batch = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run(batch, sampling_params, do_preprocess=True)

    def _run(self, batch: list, sampling_params, do_preprocess: bool) -> list[RequestOutput]:
        params = list(sampling_params) if isinstance(sampling_params, Sequence) else \
            [sampling_params or SamplingParams()] * len(batch)
        if len(params) != len(batch):
            raise ValueError(f"{len(params)} sampling_params for {len(batch)} prompts")
        # n completions of a prompt are n requests; the engine's prefix cache shares their prompt
        flat = [(i, p) for i, p in enumerate(batch) for _ in range(params[i].n)]
        configs = [params[i].generation_config(self.pipe.engine.session_len, self.seed) for i, _ in flat]
        responses = self.pipe([p for _, p in flat], gen_config=configs, do_preprocess=do_preprocess)
        outputs = [RequestOutput(str(i), p if isinstance(p, str) else None, []) for i, p in enumerate(batch)]
        for (i, _), r in zip(flat, responses):
            out = outputs[i]
            out.prompt_token_ids = out.prompt_token_ids or self.pipe.tokenizer.encode_prompt(batch[i], do_preprocess)
            out.outputs.append(CompletionOutput(len(out.outputs), r.text, r.token_ids, r.finish_reason))
        return outputs


def _prompts(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("generate() takes prompt strings; use chat() for message lists")
    return list(prompts)
