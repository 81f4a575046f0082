"""Embeddings, rerank and score: `/v1/embeddings` (OpenAI's shape), `/v1/rerank` (Cohere / Jina's
shape, as llama.cpp and vLLM serve it, also at `/rerank` and `/v2/rerank`) and `/v1/score` (vLLM's).

A model's `ModelInfo.pooling` says whether and how it embeds: an encoder's from its
sentence-transformers files, a decoder's from `--pooling` (or its files). Scores come from a
cross-encoder's classifier, or from a decoder's last-token P(yes) against P(no) under a
judging prompt (Qwen3-Reranker's recipe). Every input is one engine request, so a batch of inputs
is batched with whatever else runs.
"""
from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from quantserve.engine.request import Pooling
from quantserve.serve.errors import APIError
from quantserve.serve.service import Service, as_api_error

MAX_INPUTS = 2048
RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
JUDGE = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
         'Note that the answer can only be "yes" or "no".')


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, token ids, or a list of token-id lists")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="keep the first N dimensions (Matryoshka models)")
    user: str | None = None


class Document(BaseModel):
    text: str


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    query: str
    documents: list[str | Document] = Field(min_length=1, max_length=MAX_INPUTS)
    top_n: int | None = Field(None, ge=1)
    return_documents: bool = True
    instruction: str | None = Field(None, description="a decoder reranker's task line (Qwen3-Reranker's Instruct)")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    instruction: str | None = None


def add_embedding_routes(app: FastAPI, state) -> None:
    from quantserve.serve.openai_app import ERRORS, client_key

    @app.post("/v1/embeddings", responses=ERRORS)
    async def embeddings(body: EmbeddingRequest, request: Request):
        service = await ready(state, body.model, request, client_key)
        vectors, tokens = await embed_body(service, body)
        return {"object": "list", "model": body.model or state.models.default,
                "data": [{"object": "embedding", "index": i, "embedding": encode(v, body.encoding_format)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/rerank", responses=ERRORS)
    @app.post("/v2/rerank", include_in_schema=False)
    @app.post("/rerank", include_in_schema=False)
    async def rerank(body: RerankRequest, request: Request):
        service = await ready(state, body.model, request, client_key)
        docs = [d if isinstance(d, str) else d.text for d in body.documents]
        scores, tokens = await score_pairs(service, [body.query] * len(docs), docs, body.instruction)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:body.top_n or len(docs)]
        results = [{"index": i, "relevance_score": scores[i],
                    **({"document": {"text": docs[i]}} if body.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": body.model or state.models.default,
                "results": results, "usage": {"total_tokens": tokens}}

    @app.post("/v1/score", responses=ERRORS)
    async def score(body: ScoreRequest, request: Request):
        service = await ready(state, body.model, request, client_key)
        first, second = score_lists(body)
        scores, tokens = await score_pairs(service, first, second, body.instruction)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "model": body.model or state.models.default,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


async def ready(state, model: str | None, request: Request, client_key) -> Service:
    service = await state.ready(model)
    service.check_rate(client_key(state, request))
    return service


def embed_pooling(service: Service) -> Pooling:
    pooling = service.model.pooling
    if pooling is None:
        raise APIError(400, "this model does not embed: serve an embedding model, or a decoder with --pooling "
                       "last|mean|cls", "model", "model_not_supported")
    return pooling


async def embed_body(service: Service, body: EmbeddingRequest) -> tuple[list[list[float]], int]:
    """The body's vectors (cut to its `dimensions`) and the tokens read (HTTP and gRPC)."""
    inputs = await asyncio.to_thread(embedding_inputs, body, service)
    vectors = await run_all(service, [(ids, None) for ids in inputs], embed_pooling(service))
    return [shape(v, body.dimensions, service) for v in vectors], sum(map(len, inputs))


def embedding_inputs(body: EmbeddingRequest, service: Service) -> list[list[int]]:
    """`input` -> one token-id list per input (strings tokenized with the model's own rules)."""
    raw = body.input
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise APIError(400, "input must not be empty", "input", "invalid_value")
    if len(raw) > MAX_INPUTS:
        raise APIError(400, f"at most {MAX_INPUTS} inputs per request", "input", "invalid_value")
    if any(not x for x in raw):                   # OpenAI refuses empty strings too
        raise APIError(400, "an input is empty", "input", "invalid_value")
    embed_pooling(service)
    model = service.model
    return [model.tokenizer.hf.encode(x, truncation=model.truncate, max_length=model.session_len)
            if isinstance(x, str) else list(x) for x in raw]


def shape(vector: list[float], dimensions: int | None, service: Service) -> list[float]:
    """OpenAI's `dimensions`: the first N, normalized again; only where the model was trained for it."""
    if dimensions is None or dimensions == len(vector):
        return vector
    allowed = service.model.matryoshka_dimensions
    if dimensions > len(vector) or not allowed or (allowed is not True and dimensions not in allowed):
        sizes = f"one of {allowed}" if isinstance(allowed, list) else f"{len(vector)} (not a Matryoshka model)"
        raise APIError(400, f"dimensions must be {sizes}", "dimensions", "invalid_value")
    v = np.asarray(vector[:dimensions], dtype=np.float32)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).tolist()


def encode(vector: list[float], fmt: str) -> list[float] | str:
    """base64: the little-endian float32 bytes, as OpenAI's clients decode them."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode() if fmt == "base64" else vector


def score_lists(body: ScoreRequest) -> tuple[list[str], list[str]]:
    """vLLM's pairing: 1 x N, N x N, or 1 x 1."""
    first = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    second = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if not first or not second:
        raise APIError(400, "text_1 and text_2 must not be empty", "text_1", "invalid_value")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second) or len(second) > MAX_INPUTS:
        raise APIError(400, f"text_1 must hold one text or as many as text_2 (at most {MAX_INPUTS})", "text_2",
                       "invalid_value")
    return first, second


async def score_pairs(service: Service, queries: list[str], docs: list[str],
                      instruction: str | None) -> tuple[list[float], int]:
    """Relevance in (0, 1) of each (query, document) pair, and the tokens read."""
    model = service.model
    if model.cross_encoder:
        inputs = await asyncio.to_thread(cross_inputs, model, queries, docs)
        pooling = Pooling("score")
    elif model.score_tokens is not None:
        inputs = await asyncio.to_thread(judge_inputs, model, queries, docs, instruction or RERANK_INSTRUCTION)
        pooling = Pooling("score", score_tokens=model.score_tokens)
    else:
        raise APIError(400, "this model cannot score: serve a cross-encoder or a yes/no reranker", "model",
                       "model_not_supported")
    scores = await run_all(service, inputs, pooling)
    return [s[0] for s in scores], sum(len(ids) for ids, _ in inputs)


def cross_inputs(model, queries: list[str], docs: list[str]) -> list[tuple[list[int], list[int]]]:
    enc = model.tokenizer.hf(queries, docs, truncation="only_second", max_length=model.session_len)
    return list(zip(enc["input_ids"], enc["token_type_ids"]))


def judge_inputs(model, queries: list[str], docs: list[str], instruction: str) -> list[tuple[list[int], None]]:
    """Qwen3-Reranker's prompt through the model's chat template, thinking switched off."""
    tok = model.tokenizer
    out = []
    for q, d in zip(queries, docs):
        messages = [{"role": "system", "content": JUDGE},
                    {"role": "user", "content": f"<Instruct>: {instruction}\n<Query>: {q}\n<Document>: {d}"}]
        text = tok.hf.apply_chat_template(messages, chat_template=tok.chat_template, add_generation_prompt=True,
                                          tokenize=False, enable_thinking=False)
        ids = tok.hf.encode(text, add_special_tokens=False)
        if len(ids) >= model.session_len:
            raise APIError(400, f"a query and document take {len(ids)} tokens; the model reads "
                           f"{model.session_len}", "documents", "context_length_exceeded")
        out.append((ids, None))
    return out


async def run_all(service: Service, inputs: list[tuple[list[int], list[int] | None]], pooling: Pooling) -> list:
    """Every input as its own engine request, admitted as one API request."""
    ticket = service.reserve()
    rid = uuid.uuid4().hex
    try:
        async with service.admitted():
            jobs = [embed_one(service, f"embd-{rid}-{i}", ids, types, pooling) for i, (ids, types) in enumerate(inputs)]
            events = await asyncio.gather(*jobs)
    finally:
        ticket.release()
    service.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in inputs))
    return [e.embedding for e in events]


async def embed_one(service: Service, rid: str, ids: list[int], types: list[int] | None, pooling: Pooling):
    try:
        if types is not None:
            return await service.engine.embed(rid, ids, pooling, types)
        return await service.engine.embed(rid, ids, pooling)
    except Exception as e:
        raise as_api_error(e) from None
