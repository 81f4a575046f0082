"""`quantserve convert` (seed 001): a workspace in LMDeploy's layout whose weights are the
kernels' runtime tensors, memory-mapped at load, giving the same tokens as the source model;
repacked with a notice where the kernel layout differs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantserve.config import EngineConfig, SamplingParams
from quantserve.convert import convert
from quantserve.engine.engine import Engine
from quantserve.models.workspace import RUNTIME, WEIGHTS

PROMPTS = [list(range(3, 30)), list(range(40, 90))]
GREEDY = SamplingParams(max_new_tokens=10)


def tokens(model, **config) -> list[list[int]]:
    engine = Engine(model, EngineConfig(**{"cache_max_tokens": 512, "session_len": 256, **config}), progress=False)
    requests = [engine.add_request(f"r{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    while engine.has_work:
        engine.step()
    return [r.output_token_ids for r in requests]


def quantserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantserve.cli.main", *args], capture_output=True, text=True,
                          timeout=600, input="")


@pytest.mark.parametrize("family, dtype", [("llama", "float16"), ("llama3", "bfloat16"), ("qwen3_moe", "float32"),
                                           ("gemma3", "float32"), ("gemma2", "float32")])
def test_a_workspace_runs_the_same_tokens_from_memory_mapped_runtime_tensors(tiny_dirs, tmp_path, family, dtype):
    workspace = tmp_path / "workspace"
    summary = convert("internlm-chat-7b", str(tiny_dirs[family]), str(workspace), progress=False)
    assert "chat template: internlm" in summary
    weights = workspace / WEIGHTS
    assert {"config.json", "config.ini", RUNTIME, "layout.json", "chat_template.jinja"} <= {p.name for p in
                                                                                         weights.iterdir()}
    assert not list(weights.glob("*.safetensors")) and (workspace / "triton_models" / "tokenizer").is_dir()
    assert tokens(workspace, dtype=dtype) == tokens(tiny_dirs[family], dtype=dtype)
    engine = Engine(workspace / WEIGHTS, EngineConfig(cache_max_tokens=512, session_len=256), progress=False)
    held = list(engine.model.layers[0].buffers()) + list(engine.model.layers[0].parameters())
    assert held and all(mapped_from(t, weights / RUNTIME) for t in held)


def mapped_from(t: torch.Tensor, path: Path) -> bool:
    """The tensor's memory is a mapping of the file (/proc/self/maps), not a copy of it."""
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in open("/proc/self/maps")
             if line.rstrip().endswith(str(path))]
    return any(lo <= t.data_ptr() < hi for lo, hi in spans)


@pytest.mark.parametrize("tied", [False, True])
def test_a_quantized_checkpoint_converts_with_its_format_and_group_size(tiny_dirs, tmp_path, tied):
    from quantserve import lite

    source = tiny_dirs["llama3" if tied else "llama"]
    rtn = tmp_path / "rtn"
    lite.rtn(str(source), str(rtn), w_bits=4, w_group_size=32, progress=False)
    out = quantserve("convert", "llama2", str(rtn), "--model-format", "awq", "--group-size", "32", "--dst_path",
                     str(tmp_path / "workspace_quant"))
    assert out.returncode == 0, out.stderr
    layout = json.loads((tmp_path / "workspace_quant" / WEIGHTS / "layout.json").read_text())
    assert layout["embed"] == ("head_codes" if tied else "table")
    assert {e["kind"] for e in layout["modules"].values()} == {"int"}
    assert tokens(tmp_path / "workspace_quant") == tokens(rtn)


def test_a_gguf_with_a_quantized_token_table_converts(tmp_path):
    gguf = Path(__file__).parent / "data" / "gguf" / "tiny-Q4_0.gguf"
    if not gguf.is_file():
        pytest.skip("fixture missing")
    convert("llama2", str(gguf), str(tmp_path / "ws"), progress=False)
    layout = json.loads((tmp_path / "ws" / WEIGHTS / "layout.json").read_text())
    assert layout["embed"] == "own_codes"
    from quantserve.models.resolve import resolve_model

    assert tokens(tmp_path / "ws") == tokens(resolve_model(str(gguf), progress=False))


def test_another_kernel_layout_is_repacked_at_load_with_a_notice(tiny_dirs, tmp_path, monkeypatch, capfd):
    from quantserve.kernels import bf16, cpu

    if not bf16.available(cpu()):
        pytest.skip("bf16 pairs are packed only where the CPU has AVX512_BF16")
    convert("llama3", str(tiny_dirs["llama3"]), str(tmp_path / "ws"), progress=False)
    monkeypatch.setenv("QUANTSERVE_BF16_DOT", "0")          # as an AVX2 machine packs bfloat16
    capfd.readouterr()
    assert tokens(tmp_path / "ws", dtype="bfloat16") == tokens(tiny_dirs["llama3"], dtype="bfloat16")
    assert "repacked at load" in capfd.readouterr().err
    monkeypatch.setenv("QUANTSERVE_DISABLE_KERNELS", "1")   # the PyTorch ops: plain weights
    assert tokens(tmp_path / "ws", dtype="bfloat16") == tokens(tiny_dirs["llama3"], dtype="bfloat16")


def test_seed_001_flow_workspace_commands_and_static_kv(tiny_chat_model, tmp_path):
    workspace = tmp_path / "workspace"
    from quantserve.models.resolve import resolve_model
    from quantserve.text import BUILTIN_TEMPLATES, Tokenizer

    assert quantserve("convert", "internlm-chat-7b", str(tiny_chat_model), "--dst-path", str(workspace)).returncode == 0
    assert Tokenizer(resolve_model(str(workspace))).chat_template == BUILTIN_TEMPLATES["internlm"]   # the name's
    chat = quantserve("chat", "turbomind", str(workspace), "--max-new-tokens", "4")
    assert chat.returncode == 0 and "LMDeploy backend" in chat.stderr
    stats = tmp_path / "quant_output"
    assert quantserve("lite", "calibrate", "--model", str(tiny_chat_model), "--calib_dataset", "wikitext2",
                      "--calib_samples", "2", "--calib_seqlen", "64", "--work_dir", str(stats)).returncode == 0
    out = quantserve("lite", "kv_qparams", "--work_dir", str(stats), "--turbomind_dir",
                     str(workspace / "triton_models" / "weights"), "--kv_sym", "False", "--num_tp", "1")
    assert out.returncode == 0, out.stderr
    engine = Engine(workspace, EngineConfig(cache_max_tokens=512, session_len=256), progress=False)
    assert engine.kv_cache_dtype == "int8, static"


def test_convert_errors_are_one_line(tiny_chat_model, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    for args, says in ((["--model-format", "awq"], "not quantized"),
                       (["--tp", "2"], "--tp 2"),
                       (["--dst-path", str(tmp_path / "busy")], "not a workspace")):
        out = quantserve("convert", "internlm-chat-7b", str(tiny_chat_model), *args)
        assert out.returncode == 1 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_a_damaged_workspace_is_a_one_line_error(tiny_chat_model, tmp_path):
    import shutil

    convert("llama2", str(tiny_chat_model), str(tmp_path / "ws"), progress=False)
    weights = tmp_path / "ws" / WEIGHTS
    cases = (("runtime.pt", lambda f: f.write_bytes(f.read_bytes()[:1000]), "runtime.pt: cannot be read"),
             ("layout.json", lambda f: f.write_text('{"modules": {'), "layout.json: not valid JSON"),
             ("config.ini", lambda f: f.write_text("[llama]\nquant_policy = 5\n"), "quant_policy = 5 (allowed"))
    for name, damage, says in cases:
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(tmp_path / "ws", broken)
        damage(broken / WEIGHTS / name)
        out = quantserve("chat", str(broken))
        assert out.returncode == 1 and says in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert weights.is_dir()
