"""Encoder models (BERT embedders and cross-encoders): whole inputs in, one vector or score out.

No KV cache and no decoding: a request is one forward pass. `Encoder` runs a batch; `AsyncEncoder`
gives it the asyncio interface of `AsyncEngine.embed`: one worker thread takes every request
queued since its last batch, sorts them by length (little padding), runs them in batches of at
most `max_batch_size` sequences and `max_batch_tokens` padded tokens, and answers each.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from quantserve.engine.async_engine import EngineFailed, TokenEvent
from quantserve.engine.engine import EngineStats, RequestError
from quantserve.engine.request import Pooling
from quantserve.models.families.bert import ENCODER_TYPES, load_bert
from quantserve.models.loader import read_config
from quantserve.models.pooling import sentence_config


@dataclass
class EncodeRequest:
    ids: list[int]
    type_ids: list[int] | None
    pooling: Pooling
    loop: asyncio.AbstractEventLoop
    done: asyncio.Future


class Encoder:
    """One loaded encoder; not thread-safe (AsyncEncoder's worker owns it)."""

    def __init__(self, path: Path, max_batch_size: int = 64, max_batch_tokens: int = 16384, num_threads: int = 0,
                 dtype: str = "auto"):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.path = path
        self.model = load_bert(path)
        self.compute = compute_dtype(dtype)
        self.args = self.model.args
        self.pooling = sentence_config(path)
        self.session_len = min(self.pooling.max_length or self.args.max_position_embeddings,
                               self.args.max_position_embeddings)
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self.vocab_size = self.args.vocab_size

    def check(self, ids: list[int], type_ids: list[int] | None) -> None:
        if not ids:
            raise RequestError("the input is empty")
        if len(ids) > self.session_len:
            raise RequestError(f"the input has {len(ids)} tokens; this model reads at most {self.session_len}")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise RequestError(f"token ids must be in [0, {self.vocab_size})")
        if type_ids is not None and (len(type_ids) != len(ids) or max(type_ids) >= self.args.type_vocab_size):
            raise RequestError("token type ids must match the input and be below the model's type vocabulary")

    @torch.inference_mode()
    def run(self, inputs: list[list[int]], type_ids: list[list[int] | None], pooling: Pooling) -> list[list[float]]:
        """Right-pad the inputs, one forward pass, then each row's vector (or [score])."""
        ids = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)
        types = torch.zeros_like(ids)
        for i, (row, row_types) in enumerate(zip(inputs, type_ids)):
            ids[i, :len(row)] = torch.tensor(row)
            if row_types is not None:
                types[i, :len(row)] = torch.tensor(row_types)
        with torch.autocast("cpu", dtype=self.compute, enabled=self.compute is not None):
            hidden = self.model(ids, types, torch.tensor([len(row) for row in inputs])).float()    # [B, T, H]
        if pooling.kind == "score":
            return [[s] for s in cross_encoder_scores(self.model.classify(hidden).float()).tolist()]
        return [pool_row(hidden[i, :len(row)], pooling) for i, row in enumerate(inputs)]

    def pooling_for(self, asked: str | None = None, normalize: bool = True) -> Pooling:
        """How this encoder embeds: `asked`, else as its sentence-transformers files say, else
        CLS; normalized as its files say (always, when they declare nothing)."""
        declared = self.pooling
        return Pooling(asked or declared.kind or "cls", normalize and (declared.normalize or not declared.kind))

    def describe(self) -> dict:
        kind = "cross-encoder" if self.args.num_labels else f"{self.pooling.kind} pooling"
        matmuls = str(self.compute or torch.float32).replace("torch.", "")
        return {"kernels": f"torch, {torch.get_num_threads()} threads, {matmuls} matmuls", "weights": "float32",
                "kv_cache": "none",
                "session_len": self.session_len, "max_batch_size": self.max_batch_size, "encoder": kind,
                "memory": self.memory_summary()}

    def memory_summary(self) -> str:
        held = sum(p.nbytes for p in self.model.parameters())
        matmuls = str(self.compute or torch.float32).replace("torch.", "")
        return f"{'weights':<12}{held / 1e9:>9.3f} GB   float32 encoder, {self.args.num_layers} layers, {matmuls} matmuls"


def compute_dtype(name: str) -> torch.dtype | None:
    """The matmuls' type, decided once at load: bfloat16 (autocast: norms, softmax and sums stay
    float32) where the CPU multiplies bfloat16 natively (AVX512_BF16), about twice the float32
    rate; else float32 (None: no autocast). An explicit --dtype is taken as given."""
    from quantserve import envs
    from quantserve.kernels import cpu_flags

    if name == "auto":
        name = "bfloat16" if "avx512_bf16" in cpu_flags() and envs.bf16_dot() else "float32"
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def pool_row(hidden: torch.Tensor, pooling: Pooling) -> list[float]:
    """hidden: [T, H] of one input's real tokens -> its pooled (and normalized) vector."""
    vec = {"mean": lambda: hidden.mean(0), "cls": lambda: hidden[0], "last": lambda: hidden[-1]}[pooling.kind]()
    if pooling.normalize:
        vec = torch.nn.functional.normalize(vec, dim=0)
    return vec.tolist()


def cross_encoder_scores(logits: torch.Tensor) -> torch.Tensor:
    """[B, labels] -> [B] relevance in (0, 1): sigmoid of a single logit (as sentence-transformers'
    CrossEncoder), else the last label's probability."""
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)[:, -1]


class AsyncEncoder:
    step_started: float | None = None       # AsyncEngine's interface: an encoder's batches are not watched

    def __init__(self, encoder: Encoder):
        self.engine = encoder
        self.requests: queue.Queue = queue.Queue()
        self.running = True
        self.worker = threading.Thread(target=self._loop, name="quantserve-encoder", daemon=True)
        self.worker.start()

    async def embed(self, request_id: str, prompt_ids: list[int], pooling: Pooling,
                    type_ids: list[int] | None = None) -> TokenEvent:
        """The input's vector (or [score]) on a finished TokenEvent; RequestError if unfit."""
        self.engine.check(prompt_ids, type_ids)
        if pooling.kind == "score" and not self.engine.args.num_labels:
            raise RequestError("this model embeds; scoring needs a cross-encoder (a sequence classifier)")
        loop = asyncio.get_running_loop()
        request = EncodeRequest(list(prompt_ids), type_ids, pooling, loop, loop.create_future())
        self.requests.put(request)
        if not self.running:                # shut down before or while this was queued
            self._fail_queued()
        vector = await request.done
        return TokenEvent([], len(prompt_ids), 0, 0, "stop", embedding=vector)

    @property
    def alive(self) -> bool:
        return self.worker.is_alive()

    def unpin(self, owner: str) -> None:
        """Nothing to release: an encoder keeps no KV blocks (AsyncEngine's interface)."""

    def stats(self) -> EngineStats:
        return EngineStats(0, self.requests.qsize(), 1, 1, 0, 0)

    def shutdown(self) -> None:
        self.running = False
        self.requests.put(None)
        self.worker.join(timeout=10)
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                r = self.requests.get_nowait()
            except queue.Empty:
                return
            if r is not None:
                r.loop.call_soon_threadsafe(_settle, r.done, r.done.set_exception,
                                            EngineFailed("the encoder was shut down"))

    def _loop(self) -> None:
        while self.running:
            first = self.requests.get()
            if first is None:
                break
            pending = [first]
            while not self.requests.empty() and len(pending) < 4 * self.engine.max_batch_size:
                item = self.requests.get_nowait()
                if item is not None:
                    pending.append(item)
            for batch in self._batches(pending):
                self._run(batch)

    def _batches(self, pending: list[EncodeRequest]) -> list[list[EncodeRequest]]:
        """Same pooling together, by length; cut at the size and padded-token limits."""
        pending.sort(key=lambda r: (r.pooling.kind, r.pooling.normalize, len(r.ids)))
        batches: list[list[EncodeRequest]] = []
        for r in pending:
            last = batches[-1] if batches else None
            fits = (last and last[0].pooling == r.pooling
                    and len(last) < self.engine.max_batch_size
                    and len(r.ids) * (len(last) + 1) <= self.engine.max_batch_tokens)
            if fits:
                last.append(r)
            else:
                batches.append([r])
        return batches

    def _run(self, batch: list[EncodeRequest]) -> None:
        try:
            results = self.engine.run([r.ids for r in batch], [r.type_ids for r in batch], batch[0].pooling)
        except Exception as e:              # a failed batch fails its requests, not the worker
            results = [RuntimeError(f"encoding failed: {e}")] * len(batch)
        for r, result in zip(batch, results):
            setter = r.done.set_exception if isinstance(result, BaseException) else r.done.set_result
            r.loop.call_soon_threadsafe(_settle, r.done, setter, result)


def _settle(future: asyncio.Future, setter, result) -> None:
    if not future.done():               # the caller may have gone (cancelled)
        setter(result)


def is_encoder(path: Path) -> bool:
    """A checkpoint this module runs (BERT family) rather than the decoder engine."""
    try:
        return read_config(path).get("model_type") in ENCODER_TYPES
    except (FileNotFoundError, ValueError):
        return False
