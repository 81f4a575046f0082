"""The tutorials' commands in LMDeploy's and vLLM's spellings (seeds 000, 001 and 003): the
backend word after `chat`, --model-name templates, `lite --model`, pasted quotes, the gradio
client's --restful-api, --quantization / -q, `LLM()` and the Python quantization API."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from quantserve.cli.args import engine_config
from quantserve.cli.main import build_parser
from quantserve.config import ConfigError, EngineConfig


def parse(line: str):
    return build_parser().parse_args(line.split()[1:])


def quantserve(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantserve.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_chat_takes_lmdeploys_backend_word_and_model_name(capsys):
    ns = parse("quantserve chat turbomind /share/internlm-chat-7b/ --model-name internlm-chat-7b")
    assert (ns.model_path, ns.backend, ns.model_name) == ("/share/internlm-chat-7b/", "turbomind", "internlm-chat-7b")
    assert "LMDeploy backend" in capsys.readouterr().err
    assert parse("quantserve chat pytorch ./workspace").model_path == "./workspace"
    assert parse("quantserve chat turbomind").model_path == "turbomind"   # alone it is a path, as written


def test_model_names_pick_lmdeploys_templates():
    from quantserve.text import BUILTIN_TEMPLATES, template_for_model_name

    assert [template_for_model_name(n) for n in ("internlm-chat-7b", "internlm2-chat-1_8b", "qwen-7b-chat",
                                                 "llama2", "Meta-Llama-3-8B", "nobody-knows")] == \
        ["internlm", "internlm2", "chatml", "llama2", None, None]
    from jinja2 import Template

    text = Template(BUILTIN_TEMPLATES["internlm"]).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "and?"}], add_generation_prompt=True, bos_token="<s>")
    assert text == "<s><|User|>:hi<eoh>\n<|Bot|>:hello<eoa>\n<|User|>:and?<eoh>\n<|Bot|>:"


def test_lite_in_the_older_spelling_with_model_flag_and_underscores():
    from quantserve.cli.lite import model_of

    ns = parse("quantserve lite auto_awq --model /share/internlm-chat-7b/ --w_bits 4 --w_group_size 128 "
               "--work_dir ./quant_output")
    assert (model_of(ns), ns.w_bits, ns.w_group_size, ns.work_dir) == ("/share/internlm-chat-7b/", 4, 128,
                                                                        "./quant_output")
    with pytest.raises(ValueError, match="MODEL_PATH or as --model"):
        model_of(parse("quantserve lite auto_awq /a --model /b"))


def test_seed_000_pasted_with_en_dashes_and_curly_quotes():
    ns = parse("quantserve lite auto_awq /root/models/internlm2_5-1_8b-chat –calib-dataset ‘ptb’ –calib-samples 128 "
               "–calib-seqlen 2048 –w-bits 4 –w-group-size 128 –batch-size 1 –search-scale False "
               "–work-dir /root/models/out")
    assert (ns.calib_dataset, ns.calib_samples, ns.search_scale, ns.work_dir) == ("ptb", 128, False, "/root/models/out")
    assert parse('quantserve lite auto_awq /m --calib-dataset "c4"').calib_dataset == "c4"
    assert parse("quantserve lite auto_awq /m --calib-dataset=“wikitext2”").calib_dataset == "wikitext2"


def test_an_unknown_dataset_is_named_before_any_weights_are_read(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    for dataset, says in (("‘c4’", "Hugging Face hub"), ("imagenet", "not a known dataset")):
        out = quantserve("lite", "auto_awq", str(broken), "--calib-dataset", dataset, "--work-dir", str(tmp_path / "q"))
        assert out.returncode == 1 and says in out.stderr and "checkpoint" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_gradio_client_restful_api_flag():
    ns = parse("quantserve serve gradio http://0.0.0.0:23333 --server_name 0.0.0.0 --server_port 6006 "
               "--restful_api True")
    assert (ns.restful_api, ns.server_port, ns.model_path) == (True, 6006, "http://0.0.0.0:23333")
    out = quantserve("serve", "gradio", "/some/model", "--restful-api", "True", timeout=60)
    assert out.returncode == 1 and "--restful-api True: give the api_server's URL" in out.stderr


def test_quantization_flag_spellings_and_gpu_only_methods():
    assert engine_config(parse("quantserve serve api_server /m --quantization AWQ")).quantization == "awq"
    assert engine_config(parse("quantserve chat /m -q gptq")).quantization == "gptq"
    with pytest.raises(ConfigError, match="runs on GPUs only.*w8a8") as e:
        EngineConfig(quantization="fp8")
    assert e.value.field == "quantization"
    with pytest.raises(ConfigError, match="not supported"):
        EngineConfig(quantization="int3")


def test_quantization_claims_are_checked_against_the_checkpoint(tiny_llama):
    from quantserve.engine.engine import Engine

    for claim in ("awq", "gguf"):
        with pytest.raises(ConfigError, match="not quantized") as e:
            Engine(tiny_llama, EngineConfig(quantization=claim, cache_max_tokens=256), progress=False)
        assert e.value.field == "quantization"


@pytest.mark.parametrize("method, bits, tolerance", [("w8a8", 8, 0.03), ("w4a16", 4, 0.2)])
def test_w8a8_and_w4a16_quantize_a_float_model_at_load(tiny_chat_model, method, bits, tolerance):
    from test_parity import engine_logits, small_engine

    reference, engine = small_engine(tiny_chat_model), small_engine(tiny_chat_model, quantization=method)
    linears = [m for m in engine.model.layers.modules() if hasattr(m, "spec")]
    assert len(linears) >= 2 * engine.args.num_layers and {m.spec.bits for m in linears} == {bits}
    assert engine.weights_bytes < reference.weights_bytes
    prompt = list(range(3, 40))
    a, b = engine_logits(reference, prompt, 0)[0], engine_logits(engine, prompt, 0)[0]     # the prompt's next token
    assert 0 < float((b - a).norm() / a.norm()) < tolerance


def test_llm_generate_returns_vllm_shaped_outputs(tiny_chat_model):
    from quantserve import LLM, SamplingParams
    from quantserve.api import pipeline
    from quantserve.config import GenerationConfig

    llm = LLM(str(tiny_chat_model), dtype="float32", cache_max_tokens=1024)
    outs = llm.generate(["hello there", "the cat"], SamplingParams(temperature=0, max_tokens=6))
    assert [o.prompt for o in outs] == ["hello there", "the cat"] and all(o.finished for o in outs)
    pipe = pipeline(str(tiny_chat_model), EngineConfig(dtype="float32", cache_max_tokens=1024), progress=False)
    same = pipe("hello there", gen_config=GenerationConfig(max_new_tokens=6), do_preprocess=False)
    first = outs[0].outputs[0]
    assert (first.text, first.token_ids, outs[0].text) == (same.text, same.token_ids, same.text)
    assert outs[0].prompt_token_ids == pipe.tokenizer.encode_prompt("hello there", False)
    assert first.finish_reason in ("length", "stop") and len(first.token_ids) <= 6
    sampled = llm.generate("hello", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5))[0]
    assert [o.index for o in sampled.outputs] == [0, 1, 2]
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4))
    assert chat[0].prompt is None and chat[0].outputs[0].token_ids
    with pytest.raises(ConfigError, match="GPUs only"):
        LLM(str(tiny_chat_model), quantization="fp8")
    with pytest.raises(TypeError, match="unexpected"):
        LLM(str(tiny_chat_model), gpu_memory_utilisation=0.9)


def test_the_python_quantization_api_writes_loadable_checkpoints(tiny_chat_model, tmp_path):
    from quantserve import LLM, SamplingParams, lite
    from quantserve.quant.primitives import QuantError

    summary = lite.rtn(str(tiny_chat_model), str(tmp_path / "rtn"), w_bits=4, w_group_size=32, progress=False)
    assert "RTN W4 g32" in summary
    config = json.loads((tmp_path / "rtn" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4
    out = LLM(str(tmp_path / "rtn"), quantization="w4a16", cache_max_tokens=512).generate(
        "hello", SamplingParams(temperature=0, max_tokens=3))
    assert out[0].token_ids
    with pytest.raises(QuantError, match="not a known dataset"):
        lite.auto_gptq(str(tiny_chat_model), str(tmp_path / "g"), calib_dataset="imagenet")
