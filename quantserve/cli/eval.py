"""`quantserve eval ppl [MODEL]`: perplexity through the engine's paged KV cache.

    quantserve eval ppl --quant-policy 8 --chunk-size 64          # default model, WikiText-2 test
"""
from __future__ import annotations

import json
import sys

from quantserve.cli.args import add_engine_args, add_model_arg, engine_config


def add_arguments(p) -> None:
    p.add_argument("what", choices=["ppl"], help="what to evaluate")
    add_model_arg(p)
    add_engine_args(p)
    p.add_argument("--dataset", default="wikitext2",
                   help="wikitext2 = WikiText-2 raw test split, ptb = Penn Treebank validation split (bundled), "
                        "or the path of any text file")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="prefill chunk in tokens (sets --max-prefill-token-num); small chunks make attention read the cache")
    p.add_argument("--max-windows", "--max-samples", dest="max_windows", type=int, default=None,
                   help="score only the first N windows")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(ns) -> int:
    from quantserve.bench.perplexity import dataset_text, perplexity
    from quantserve.engine.engine import Engine
    from quantserve.models.resolve import resolve_model
    from quantserve.text import Tokenizer

    if ns.chunk_size:
        ns.max_prefill_token_num = ns.chunk_size
    ns.session_len = max(ns.session_len or 0, ns.seqlen + 1)
    ns.max_batch_size = ns.max_batch_size or 1
    path = resolve_model(ns.model_path)
    engine = Engine(path, engine_config(ns), progress=not ns.json)
    result = perplexity(engine, dataset_text(ns.dataset), Tokenizer(path).hf, ns.seqlen, ns.max_windows,
                        progress=sys.stderr.isatty() or not ns.json)
    report = {"model": str(path), "dataset": ns.dataset, "quant_policy": engine.cache.kv_bits,
              "kv_cache": engine.kv_cache_dtype, "dtype": str(engine.dtype),
              "seqlen": ns.seqlen, "chunk_size": ns.max_prefill_token_num, "windows": result.windows,
              "tokens": result.tokens, "ppl": result.ppl}
    if ns.json:
        print(json.dumps(report))
    else:
        print(f"perplexity {result.ppl:.4f} on {ns.dataset} ({result.windows} windows x {ns.seqlen} tokens, "
              f"KV {engine.kv_cache_dtype}, {engine.dtype} weights)")
    return 0
