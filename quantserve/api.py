"""pipeline(): the Python API, shaped like LMDeploy's.

    pipe = pipeline(model_path, backend_config=EngineConfig(cache_max_entry_count=0.4))
    outs = pipe(["Hi", "Tell me a story"], gen_config=GenerationConfig(max_new_tokens=64))
    for chunk in pipe.stream_infer(prompts, gen_config=...): ...
    pipe.add_lora("sql", "/adapters/sql"); pipe(["q1", "q2"], lora=["sql", None])   # PEFT LoRA, per prompt

Prompts (strings or OpenAI message lists) → token ids → Engine requests; engine steps →
new token ids → TextStream (detokenize, stop strings) → Response deltas.
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from quantserve.config import EngineConfig, GenerationConfig, SamplingParams
from quantserve.engine.encoder import Encoder, is_encoder
from quantserve.engine.engine import Engine, RequestError
from quantserve.engine.request import Pooling, Request
from quantserve.models.loader import family_for, read_config
from quantserve.models.resolve import resolve_model
from quantserve.text import TextStream, Tokenizer, load_chat_template

Prompt = str | list[dict]
_ids = itertools.count()


@dataclass
class Response:
    text: str
    generate_token_len: int
    input_token_len: int
    finish_reason: str | None = None
    token_ids: list[int] = field(default_factory=list)
    index: int = 0


@dataclass
class _Job:
    index: int
    request: Request
    stream: TextStream
    sent_tokens: int = 0


class Pipeline:
    def __init__(self, model_path: str | None = None, backend_config: EngineConfig | None = None,
                 chat_template: str | None = None, progress: bool = True):
        path = resolve_model(model_path, progress=progress)
        self.model_path = path
        config = backend_config or EngineConfig()
        self.encoder = Encoder(path, dtype=config.dtype) if is_encoder(path) else None   # an embedder or cross-encoder
        if self.encoder is None:
            family_for(read_config(path))  # a broken or foreign config.json is named as such, before the tokenizer
        self.tokenizer = Tokenizer(path, load_chat_template(chat_template))  # before the weights: fails fast
        self.engine = Engine(path, config, progress=progress) if self.encoder is None else None

    def embed(self, texts: str | Sequence[str], pooling: str | None = None, normalize: bool = True,
              batch_size: int = 64) -> list[float] | list[list[float]]:
        """Embedding vectors: an encoder pools as its sentence-transformers files say; a decoder pools
        its final hidden states by `pooling` (last | mean | cls, default last), batched in the engine."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        if self.encoder is not None:
            mode = self.encoder.pooling_for(pooling, normalize)
            ids = [self.tokenizer.hf.encode(t, truncation=True, max_length=self.encoder.session_len) for t in batch]
            vectors = [v for i in range(0, len(ids), batch_size)
                       for v in self.encoder.run(ids[i:i + batch_size], [None] * len(ids[i:i + batch_size]), mode)]
        else:
            vectors = self._embed_in_engine([self.tokenizer.hf.encode(t) for t in batch],
                                            Pooling(pooling or "last", normalize))
        return vectors[0] if single else vectors

    def _embed_in_engine(self, ids: list[list[int]], pooling: Pooling) -> list[list[float]]:
        requests = [self.engine.add_request(f"embed-{next(_ids)}", x, SamplingParams(max_new_tokens=1), pooling)
                    for x in ids]
        while self.engine.has_work:
            self.engine.step()
        return [r.embedding for r in requests]

    def add_lora(self, name: str, path: str) -> None:
        """Serve a PEFT LoRA adapter under `name`, for prompts run with lora=name."""
        self.engine.add_lora(name, path)

    def __call__(self, prompts: Prompt | Sequence[Prompt], gen_config=None, do_preprocess: bool = True,
                 lora: str | Sequence[str | None] | None = None) -> Response | list[Response]:
        """lora: the adapter every prompt runs with, or one per prompt (None: the base model)."""
        batch, single = _as_batch(prompts)
        outs = [Response("", 0, 0, index=i) for i in range(len(batch))]
        for chunk in self.stream_infer(batch, gen_config, do_preprocess, lora):
            out = outs[chunk.index]
            out.text += chunk.text
            out.token_ids += chunk.token_ids
            out.generate_token_len = chunk.generate_token_len
            out.input_token_len = chunk.input_token_len
            out.finish_reason = chunk.finish_reason
        return outs[0] if single else outs

    infer = __call__

    def stream_infer(self, prompts: Prompt | Sequence[Prompt], gen_config=None, do_preprocess: bool = True,
                     lora: str | Sequence[str | None] | None = None) -> Iterator[Response]:
        """Yield Response deltas (new text and token ids) as they are generated, tagged by index."""
        batch, _ = _as_batch(prompts)
        configs = _configs_for(gen_config, len(batch))
        loras = [lora] * len(batch) if lora is None or isinstance(lora, str) else list(lora)
        if len(loras) != len(batch):
            raise ValueError(f"{len(loras)} LoRA adapters for {len(batch)} prompts")
        jobs = self._submit(batch, configs, do_preprocess, loras)
        try:
            yield from self._run(jobs)
        finally:
            for job in jobs.values():
                self.engine.abort(job.request.request_id)

    def _submit(self, batch: list[Prompt], configs: list[GenerationConfig], do_preprocess: bool,
                loras: list[str | None]) -> dict:
        if self.engine is None:
            raise RequestError(f"{self.model_path.name} is an encoder: it only embeds, with pipe.embed(texts)")
        jobs: dict[str, _Job] = {}
        try:
            for i, (prompt, cfg, lora) in enumerate(zip(batch, configs, loras)):
                if not prompt:
                    raise RequestError("the prompt is empty")
                ids = self.tokenizer.encode_prompt(prompt, do_preprocess)
                params = cfg.to_sampling_params(self.tokenizer.eos_token_ids)
                rid = f"pipe-{next(_ids)}"
                request = self.engine.add_request(rid, ids, params, lora=lora)
                stream = TextStream(self.tokenizer, ids, cfg.stop_words, cfg.skip_special_tokens,
                                    params.eos_token_ids + params.stop_token_ids)
                jobs[rid] = _Job(i, request, stream)
        except BaseException as e:
            for job in jobs.values():
                self.engine.abort(job.request.request_id)
            if isinstance(e, RequestError):
                raise RequestError(f"prompt {len(jobs)}: {e}") from None
            raise
        return jobs

    def _run(self, jobs: dict[str, _Job]) -> Iterator[Response]:
        """Step the engine until every job finished. Another consumer of the same engine may
        step it too, so progress is read from the requests, not from what a step returns."""
        pending = dict(jobs)
        while pending:
            if not self.engine.has_work and all(not j.request.is_finished for j in pending.values()):
                raise RuntimeError("the engine stopped with requests unfinished")
            self.engine.step()
            for rid, job in list(pending.items()):
                r = job.request
                if len(r.output_token_ids) > job.sent_tokens or r.is_finished or job.stream.stopped:
                    chunk = self._advance(job)
                    if chunk.finish_reason:
                        del pending[rid]
                    yield chunk

    def _advance(self, job: _Job) -> Response:
        r = job.request
        new = r.output_token_ids[job.sent_tokens:]
        job.sent_tokens = len(r.output_token_ids)
        text = job.stream.add(new, final=r.is_finished)
        reason = r.finish_reason.value if r.is_finished else None
        if job.stream.stopped:                  # a stop string wins over a length limit hit at once
            if not r.is_finished:
                self.engine.abort(r.request_id)
            reason = "stop"
        return Response(text, len(r.output_token_ids), len(r.prompt_token_ids), reason, new, job.index)


def _as_batch(prompts) -> tuple[list[Prompt], bool]:
    """A string or one message list is a single prompt; a list of those is a batch."""
    if isinstance(prompts, str):
        return [prompts], True
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], dict):
        return [prompts], True
    return prompts, False


def _configs_for(gen_config, n: int) -> list[GenerationConfig]:
    if isinstance(gen_config, (list, tuple)):
        if len(gen_config) != n:
            raise ValueError(f"{len(gen_config)} gen_configs for {n} prompts")
        return list(gen_config)
    return [gen_config or GenerationConfig()] * n


def pipeline(model_path: str | None = None, backend_config: EngineConfig | None = None,
             chat_template_config: str | None = None, log_level: str = "WARNING", **kwargs) -> Pipeline:
    """LMDeploy-compatible constructor. model_path: a model directory, a .gguf file, or None for
    the default model (SmolLM2-135M-Instruct, prepared offline on first use)."""
    logging.getLogger("quantserve").setLevel(log_level)
    return Pipeline(model_path, backend_config, chat_template_config, **kwargs)
