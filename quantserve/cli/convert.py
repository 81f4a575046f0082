"""`quantserve convert MODEL_NAME MODEL_PATH`: a deployment workspace, LMDeploy's TurboMind layout
(`workspace/triton_models/weights/`, its config.ini) holding the weights as the kernels run them."""
from __future__ import annotations

import logging
import sys


def add_arguments(p) -> None:
    p.add_argument("model_name", help="LMDeploy's model name (internlm-chat-7b, qwen-7b, llama2, …): picks the chat "
                                      "template; other names keep the model's own")
    p.add_argument("model_path", help="a Hugging Face model directory (float, AWQ or GPTQ) or a .gguf file")
    p.add_argument("--model-format", default=None, choices=["hf", "llama", "awq", "gptq", "gguf"],
                   help="what the model is (checked against its config.json; detected when omitted)")
    p.add_argument("--group-size", type=int, default=None, help="AWQ / GPTQ group size (checked against the model)")
    p.add_argument("--dst-path", default="./workspace", help="where the workspace is written (default ./workspace)")
    p.add_argument("--session-len", type=int, default=None, help="the workspace's default session length")
    p.add_argument("--head-bits", type=int, default=8, choices=[4, 8],
                   help="bits of a weight-quantized model's output head")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism: 1 only")
    p.add_argument("--tokenizer-path", default=None, help="accepted for LMDeploy compatibility (the model's is used)")
    p.add_argument("--dtype", default="auto", help="accepted for LMDeploy compatibility (the checkpoint's is kept)")


def run(ns) -> int:
    from quantserve.convert import convert

    logging.basicConfig(level="WARNING", stream=sys.stderr)
    if ns.tp != 1:
        raise ValueError(f"--tp {ns.tp}: quantserve runs one process per model; use --tp 1")
    print(convert(ns.model_name, ns.model_path, ns.dst_path, ns.model_format, ns.group_size, ns.session_len,
                  ns.head_bits))
    return 0
