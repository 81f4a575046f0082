"""The synchronous engine: requests in (token ids), tokens out, one step at a time.

step() = schedule -> execute -> update. Everything above (text, chat templates, streaming,
HTTP) lives outside engine/ and talks to it through add_request / step / abort.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from quantserve.config import ConfigError, EngineConfig, SamplingParams
from quantserve.engine.block_manager import BlockManager
from quantserve.engine.model_runner import ModelRunner
from quantserve.engine.request import FinishReason, Pooling, Request
from quantserve.engine.scheduler import Scheduler
from quantserve.engine.speculative import DraftModelProposer, NgramProposer, Proposer
from quantserve.kvcache.budget import CachePlan, free_memory, plan_cache
from quantserve.kvcache.paged import PagedKVCache
from quantserve.models.layers import CausalLM, ModelArgs
from quantserve.models.loader import (family_for, load_model, load_time_spec, model_args, model_config,
                                      require_supported, same_vocabulary, torch_dtype)
from quantserve.models.lora import Adapter, LoRASet
from quantserve.models.resolve import resolve_model
from quantserve.models.workspace import load_static_kv, model_dir_of, saved_settings

logger = logging.getLogger("quantserve")

DEFAULT_MAX_BATCH_SIZE = {"cpu": 16, "cuda": 128}


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int              # includes free blocks still holding cached prefixes
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_pinned_blocks: int = 0        # held by open sessions between their turns
    spec_num_drafts: int = 0          # speculative verify rows run
    spec_num_draft_tokens: int = 0    # tokens they proposed
    spec_num_accepted_tokens: int = 0  # of those, accepted

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class Draft(NamedTuple):
    """A draft model for speculative decoding: its module, shape and storage dtype."""

    model: CausalLM
    args: ModelArgs
    dtype: torch.dtype


class RequestError(ValueError):
    """A request the engine cannot run; the message says why. Other requests are unaffected."""


class UnknownLoRA(RequestError):
    """A request named a LoRA adapter that is not loaded."""


class Engine:
    def __init__(self, model_path: str | Path, config: EngineConfig | None = None, progress: bool = True):
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_path = model_dir_of(Path(model_path))     # a workspace: its triton_models/weights
        cfg = model_config(model_path, config.model_overrides())
        require_supported(cfg, config.model_format, config.quantization)
        self.args = model_args(cfg)
        saved = saved_settings(Path(model_path))      # a workspace's config.ini: defaults below the flags
        self.session_len = self._session_len(config.session_len or saved.get("session_len"))
        self.max_batch_size = config.max_batch_size or DEFAULT_MAX_BATCH_SIZE[config.device]
        self.dtype = torch_dtype(config.dtype, cfg, config.device)
        self.model = load_model(Path(model_path), self.dtype, config.device, self.session_len, cfg, progress,
                                config.head_bits, load_time_spec(cfg, config.quantization))
        self.kv_bits = config.quant_policy if config.quant_policy is not None else saved.get("quant_policy", 0)
        self.draft = self._load_draft(Path(model_path), progress) if config.speculative_model else None
        self.weights_bytes = self.model.weight_bytes() + (self.draft.model.weight_bytes() if self.draft else 0)
        self.plan = self._plan_cache()
        self.cache = PagedKVCache(self.args.num_layers, self.plan.num_blocks, self.plan.block_size,
                                  self.args.num_kv_heads, self.args.head_dim, self.dtype, config.device,
                                  kv_bits=self.kv_bits)
        static = load_static_kv(Path(model_path), self.kv_bits, self.args.num_layers, self.args.num_kv_heads)
        if static is not None:                  # lite kv_qparams wrote calibrated parameters here
            self.cache.set_static(static)
        self.draft_cache = self._draft_cache() if self.draft else None
        session_blocks = -(-self.session_len // self.plan.block_size)    # pins always leave room for one
        blocks = BlockManager(self.plan.num_blocks, self.plan.block_size, config.enable_prefix_caching,
                              cache_tag=f"{self.dtype}/{self.kv_bits}/{'static' if static else 'online'}",
                              max_pinned_blocks=max(0, self.plan.num_blocks - session_blocks))
        self.scheduler = Scheduler(blocks, self.max_batch_size, config.max_prefill_token_num, self._proposer())
        self.runner = ModelRunner(self.model, self.cache, config.device)
        self.requests: dict[str, Request] = {}
        self.loras = LoRASet(self.model, family_for(cfg), config.max_loras, config.max_lora_rank)
        logger.info(self.memory_summary())

    def _load_draft(self, target_dir: Path, progress: bool) -> Draft:
        """The draft model, loaded as the model is (its own dtype rule, ops and quantization)."""
        path = resolve_model(self.config.speculative_model, progress)
        cfg = model_config(path)
        require_supported(cfg)
        if not same_vocabulary(target_dir, path):
            raise ConfigError(f"the draft model {self.config.speculative_model} has another vocabulary than the "
                              "model: speculative decoding needs the same tokenizer", field="speculative_model")
        dtype = torch_dtype(self.config.dtype, cfg, self.config.device)
        model = load_model(path, dtype, self.config.device, self.session_len, cfg, progress, self.config.head_bits)
        return Draft(model, model_args(cfg), dtype)

    def _proposer(self) -> Proposer | None:
        c = self.config
        if c.speculative == "ngram":
            return NgramProposer(c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min,
                                 c.speculative_disable_by_batch_size)
        if c.speculative != "draft_model":
            return None
        return DraftModelProposer(self.draft.model, self.draft_cache, c.num_speculative_tokens,
                                  c.speculative_disable_by_batch_size, c.draft_p_min, self.args.vocab_size,
                                  self.draft.args.vocab_size, c.max_prefill_token_num, c.device)

    def _draft_cache(self) -> PagedKVCache:
        """The draft model's own cache (never quantized), a slot for every one of the model's."""
        _, args, dtype = self.draft
        return PagedKVCache(args.num_layers, self.plan.num_blocks, self.plan.block_size, args.num_kv_heads,
                            args.head_dim, dtype, self.config.device)

    def _session_len(self, asked: int | None) -> int:
        """--session-len, else the model's context (a sliding window does not bound it)."""
        return asked or self.args.max_position_embeddings

    def _plan_cache(self) -> CachePlan:
        c = self.config
        per_token = PagedKVCache.bytes_per_token(self.args.num_layers, self.args.num_kv_heads,
                                                 self.args.head_dim, self.dtype, self.kv_bits)
        if self.draft:                  # the draft model's cache has a slot for every one of the model's
            _, args, dtype = self.draft
            per_token += PagedKVCache.bytes_per_token(args.num_layers, args.num_kv_heads, args.head_dim, dtype)
        plan = plan_cache(free_memory(c.device), c.cache_max_entry_count, per_token,
                          c.cache_block_seq_len, self.max_batch_size, self.session_len, c.cache_max_tokens)
        if plan.num_tokens < self.session_len:
            raise ConfigError(
                f"the KV cache holds {plan.num_tokens} tokens, less than one session of {self.session_len}: "
                "raise --cache-max-entry-count or lower --session-len")
        return plan

    @property
    def kv_cache_dtype(self) -> str:
        """float16 / bfloat16 / float32, or int8 / int4 (with ", static" under lite kv_qparams' parameters)."""
        name = {0: str(self.dtype).replace("torch.", ""), 8: "int8", 4: "int4"}[self.cache.kv_bits]
        return f"{name}, static" if self.cache.static is not None else name

    def describe(self) -> dict:
        """What a user wants to see about the running model: precision, capacity, memory."""
        return {"kernels": self.kernel_backend(), "weights": str(self.dtype).replace("torch.", ""),
                "kv_cache": self.kv_cache_dtype,
                "session_len": self.session_len, "max_batch_size": self.max_batch_size,
                "kv_cache_tokens": self.plan.num_tokens, "prefix_caching": self.config.enable_prefix_caching,
                "speculative": self.speculative_summary(), "memory": self.memory_summary()}

    def speculative_summary(self) -> str | None:
        c = self.config
        if c.speculative == "ngram":
            return f"ngram, K={c.num_speculative_tokens}, n {c.prompt_lookup_min}-{c.prompt_lookup_max}"
        if c.speculative == "draft_model":
            return f"draft model {c.speculative_model}, K={c.num_speculative_tokens}, p_min {c.draft_p_min}"
        return None

    def kernel_backend(self) -> str:
        """The ops this engine's model runs on, decided once at load (CUDA always runs torch ops)."""
        if torch.device(self.config.device).type != "cpu":
            return self.model.ops.describe()
        return f"{self.model.ops.describe()}, {torch.get_num_threads()} threads"

    @property
    def kv_bytes(self) -> int:
        """The KV cache's bytes, with the draft model's cache beside it."""
        return self.cache.nbytes + (self.draft_cache.nbytes if self.draft_cache is not None else 0)

    def memory_summary(self) -> str:
        """The start-up memory table: weights, KV cache, activations, total (GB = 1e9 bytes)."""
        acts = self.activation_bytes()
        draft = f", with the draft model's ({self.draft.model.weight_bytes() / 1e9:.3f} GB)" if self.draft else ""
        rows = [("weights", self.weights_bytes, f"{str(self.dtype).replace('torch.', '')}{draft}"),
                ("KV cache", self.kv_bytes,
                 f"{self.kv_cache_dtype}: {self.plan.num_blocks} blocks x {self.plan.block_size} = "
                 f"{self.plan.num_tokens:,} tokens, {self.plan.bytes_per_token:,} B/token{draft and ' (both caches)'}"),
                ("activations", acts, f"peak estimate for {self.config.max_prefill_token_num} tokens per step"),
                ("total", self.weights_bytes + self.kv_bytes + acts, f"session_len {self.session_len:,}, "
                 f"max_batch_size {self.max_batch_size}")]
        table = "\n".join(f"{name:<12}{n / 1e9:>9.3f} GB   {note}" for name, n, note in rows)
        return f"{'kernels':<12}{'':>12}   {self.kernel_backend()}\n{table}"

    def activation_bytes(self) -> int:
        """Float32 working buffers of the largest step, plus the logits of a full batch."""
        a = self.args
        tokens = min(self.config.max_prefill_token_num, self.max_batch_size * self.session_len)
        per_token = 3 * a.hidden_size + a.q_size + 2 * a.kv_size + a.q_size + 3 * a.intermediate_size
        return 4 * (tokens * per_token + 2 * self.max_batch_size * a.vocab_size)

    def measure_memory(self) -> dict:
        """What this process holds now (GB): tensors by kind, and the resident set."""
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        kib = lambda key: int(status[key].split()[0]) * 1024 / 1e9  # noqa: E731
        return {"weights_gb": self.weights_bytes / 1e9, "kv_cache_gb": self.kv_bytes / 1e9,
                "kv_tokens": self.plan.num_tokens, "rss_gb": kib("VmRSS"), "peak_rss_gb": kib("VmHWM")}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    pooling: Pooling | None = None, pin_owner: str | None = None, lora: str | None = None) -> Request:
        """A request to continue `prompt_token_ids`, or with `pooling` only to read them (an
        embedding or a score, ready once its prompt has been computed). `pin_owner`: keep the
        request's full KV blocks pinned for that owner after it ends (a session's next turn starts
        from them), until `unpin(owner)`. `lora`: the name of a loaded adapter to run it with."""
        self._validate(request_id, prompt_token_ids)
        lora_id = self.loras.id_of(lora) if lora is not None else 0
        if lora_id is None:
            loaded = ", ".join(f"'{n}'" for n in self.loras.names) or "none"
            raise UnknownLoRA(f"no LoRA adapter named '{lora}' is loaded (loaded: {loaded})")
        if pooling is not None and any(not 0 <= t < self.args.vocab_size for t in pooling.score_tokens):
            raise RequestError(f"score token ids must be in [0, {self.args.vocab_size})")
        if any(not 0 <= t < self.args.vocab_size for t in (*params.stop_token_ids, *params.eos_token_ids)):
            raise RequestError(f"stop token ids must be in [0, {self.args.vocab_size})")
        if any(not 0 <= t < self.args.vocab_size for t, _ in params.logit_bias):
            raise RequestError(f"logit_bias token ids must be in [0, {self.args.vocab_size})")
        request = Request(request_id, list(prompt_token_ids), params, self.session_len, pooling=pooling,
                          pin_owner=pin_owner, lora_id=lora_id)
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request

    def _validate(self, request_id: str, ids: list[int]) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.session_len:
            raise RequestError(f"the prompt has {len(ids)} tokens; the session length is {self.session_len} "
                               "(raise --session-len or shorten the prompt)")
        if min(ids) < 0 or max(ids) >= self.args.vocab_size:
            raise RequestError(f"token ids must be in [0, {self.args.vocab_size})")

    # ---- LoRA adapters ---------------------------------------------------------------------------

    def read_lora(self, path: str | Path) -> Adapter:
        """Read and check a PEFT LoRA directory for this model (LoRAError says what is wrong); reads
        no serving state, so it may run off the engine's thread."""
        return self.loras.read(path)

    def add_lora(self, name: str, path: str | Path) -> None:
        """Serve the PEFT LoRA adapter at `path` as `name` (models/lora.py's LoRAError if it cannot)."""
        self.install_lora(name, self.read_lora(path))

    def install_lora(self, name: str, adapter: Adapter) -> None:
        """Serve an adapter read by read_lora as `name`; LoRAError when the name is taken or
        --max-loras adapters are loaded."""
        self.loras.add(name, adapter, self._loras_in_use())
        logger.info("LoRA adapter '%s' from %s: %.1f MB", name, adapter.path, adapter.nbytes / 1e6)

    def remove_lora(self, name: str) -> None:
        """New requests can no longer name it; requests already running with it finish with it."""
        self.loras.remove(name, self._loras_in_use())

    def list_loras(self) -> dict[str, str]:
        """Loaded adapters: name -> path."""
        return {name: a.path for name, a in self.loras.names.items()}

    def _loras_in_use(self) -> set[int]:
        return {r.lora_id for r in self.requests.values() if r.lora_id}

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and not request.is_finished:
            self.scheduler.finish(request, FinishReason.ABORT)

    def unpin(self, owner: str) -> None:
        self.scheduler.blocks.unpin(owner)

    def stats(self) -> EngineStats:
        blocks, spec = self.scheduler.blocks, self.scheduler.proposer
        drafts = (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) if spec else (0, 0, 0)
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), blocks.num_blocks,
                           blocks.num_free_blocks, blocks.queried_tokens, blocks.hit_tokens,
                           blocks.num_pinned_blocks, *drafts)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[Request]:
        """Run one batch; return the requests that got a token (finished ones leave the engine)."""
        out = self.scheduler.schedule()
        sampled = self.runner.execute(out) if not out.is_empty else {}
        changed = self.scheduler.update(out, sampled)
        for r in changed:
            if r.is_finished:
                self.requests.pop(r.request_id, None)
        return changed
