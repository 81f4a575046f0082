"""Truncated, corrupt and foreign model files: one line on stderr naming the file, never a
traceback or a hang; and seeded mutation fuzzing of the GGUF and safetensors readers."""
from __future__ import annotations

import json
import random
import resource
import shutil
import signal
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from quantserve.cli.main import main
from quantserve.models.gguf import gguf_metadata, gguf_tensors
from quantserve.models.loader import ModelLoadError, read_weights_file

from test_gguf import _random_model, write_gguf


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _huge_header_length(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + f.read_bytes()[8:])


def _header_not_json(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + f.read_bytes()[24:])


def _offsets_past_end(d: Path) -> None:
    header, body = _header(d / "model.safetensors")
    header[_first_tensor(header)]["data_offsets"] = [len(body) + 16, len(body) + 32]
    _with_header(d / "model.safetensors", header, body)


def _shape_not_matching_bytes(d: Path) -> None:
    header, body = _header(d / "model.safetensors")
    entry = header[_first_tensor(header)]
    entry["shape"] = [entry["shape"][0] * 3, *entry["shape"][1:]]
    _with_header(d / "model.safetensors", header, body)


def _config_not_json(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')


def _no_tokenizer(d: Path) -> None:
    for f in d.iterdir():
        if f.name not in ("config.json", "model.safetensors", "generation_config.json"):
            f.unlink()


DIR_CASES = {  # case -> (damage done to a copy of a good model directory, the file the error names)
    "header-length-past-end": (_huge_header_length, "model.safetensors"),
    "header-not-json": (_header_not_json, "model.safetensors"),
    "offsets-past-end": (_offsets_past_end, "model.safetensors"),
    "shape-not-matching-bytes": (_shape_not_matching_bytes, "model.safetensors"),
    "config-not-json": (_config_not_json, "config.json"),
    "no-tokenizer": (_no_tokenizer, ""),  # the directory itself
}


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> Path:
    return write_gguf(_random_model("llama", False), tmp_path_factory.mktemp("gguf") / "good.gguf", "llama", QT.Q8_0)


def _cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _wrong_magic(data: bytes) -> bytes:
    return b"GGML" + data[4:]


def _random_bytes(data: bytes) -> bytes:
    return random.Random(0).randbytes(len(data) // 10)


GGUF_CASES = {"cut-in-half": _cut_in_half, "wrong-magic": _wrong_magic, "random-bytes": _random_bytes}


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def assert_one_line_error(code: int, lines: list[str], name: str) -> None:
    assert code != 0
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0] and ": error: " in lines[0] and name in lines[0], lines[0]


@pytest.mark.parametrize("case", DIR_CASES)
def test_hostile_model_dir_is_one_line(case, tiny_chat_model, tmp_path, capsys):
    damage, named = DIR_CASES[case]
    model = tmp_path / f"model-{case}"
    shutil.copytree(tiny_chat_model, model)
    damage(model)
    code, lines = run_cli(["chat", str(model), "--dtype", "float32"], capsys)
    assert_one_line_error(code, lines, str(model / named))


@pytest.mark.parametrize("case", GGUF_CASES)
def test_hostile_gguf_is_one_line_and_leaves_no_cache(case, good_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUANTSERVE_HOME", str(tmp_path / "home"))
    bad = tmp_path / f"{case}.gguf"
    bad.write_bytes(GGUF_CASES[case](good_gguf.read_bytes()))
    code, lines = run_cli(["chat", str(bad), "--dtype", "float32"], capsys)
    assert_one_line_error(code, lines, str(bad))
    cache = tmp_path / "home" / "gguf"
    assert not cache.exists() or not any(cache.iterdir())


def tiny_gguf(path: Path, tokens: bool = True, vocab: int = 48, hidden: int = 32, ffn: int = 64) -> Path:
    """A one-layer Llama GGUF of ~20 KB: F32 norms, Q8_0 / Q4_0 / F16 matrices, a token list and
    arrays of 4- and 1-byte items."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    if tokens:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(vocab)])
        writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
        writer.add_token_scores([0.0] * vocab)
        writer.add_chat_template("{{ messages }}")
    # a byte array: a corrupt length field over 1-byte items reads on to the end of any file
    writer.add_key_value("general.fuzz_bytes", [7] * 16, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    for i, (name, shape) in enumerate(_tiny_shapes(vocab, hidden, ffn, hidden // 4 * 2).items()):
        values = rng.standard_normal(shape).astype(np.float32)
        qtype = QT.F32 if len(shape) == 1 else (QT.Q8_0, QT.Q4_0, QT.F16)[i % 3]
        data = {QT.F32: values, QT.F16: values.astype(np.float16)}.get(qtype)
        writer.add_tensor(name, gguf.quants.quantize(values, qtype) if data is None else data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_shapes(vocab: int, hidden: int, ffn: int, kv: int) -> dict[str, tuple[int, ...]]:
    return {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
            "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
            "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (kv, hidden),
            "blk.0.attn_v.weight": (kv, hidden), "blk.0.attn_output.weight": (hidden, hidden),
            "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
            "blk.0.ffn_down.weight": (hidden, ffn)}


def test_failed_conversion_leaves_no_cache_dir(tmp_path, monkeypatch, capsys):
    """This GGUF fails late (no tokenizer in its metadata), after the weights are written."""
    monkeypatch.setenv("QUANTSERVE_HOME", str(tmp_path / "home"))
    bad = tiny_gguf(tmp_path / "no-tokens.gguf", tokens=False)
    code, lines = run_cli(["chat", str(bad), "--dtype", "float32"], capsys)
    assert_one_line_error(code, lines[-1:], str(bad))  # after the conversion's progress lines
    assert list((tmp_path / "home" / "gguf").iterdir()) == []


class Hang(BaseException):
    """Raised by the per-case alarm; a BaseException so no `except Exception` can swallow it."""


def _raise_hang(signum, frame):
    raise Hang()


def fuzz(cases: int, seconds: float, mutate, target) -> tuple[int, int]:
    """Run target(mutate(rng)) for each seeded case: it must return or raise ModelLoadError, each
    within 2 s, and no case may grow the peak memory by hundreds of MB. Returns (run, loaded)."""
    rng, run, loaded, deadline = random.Random(1234), 0, 0, time.monotonic() + seconds
    previous = signal.signal(signal.SIGALRM, _raise_hang)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        while run < cases and time.monotonic() < deadline:
            data, run = mutate(rng), run + 1
            signal.setitimer(signal.ITIMER_REAL, 2.0)
            try:
                target(data)
                loaded += 1
            except ModelLoadError:
                pass
            except Hang:
                pytest.fail(f"case {run} (seed 1234) ran over 2 s")
            except Exception as e:
                raise AssertionError(f"case {run} (seed 1234) raised {type(e).__name__}, not ModelLoadError") from e
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mb < 300, f"peak memory grew by {grown_mb:.0f} MB: some case allocated far beyond its file"
    return run, loaded


def integer_fields(path: Path) -> list[tuple[int, int]]:
    """(byte offset, width) of every length, count, type, dimension and offset in a GGUF's header."""
    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    return sorted({(part.__array_interface__["data"][0] - base, part.dtype.itemsize)
                   for field in fields for part in field.parts
                   if part.dtype.kind == "u" and part.dtype.itemsize in (4, 8) and part.size == 1})


def _odd_integer(rng: random.Random, width: int, original: int) -> int:
    bits = 8 * width
    choices = [0, 1, 2 ** bits - 1, 2 ** (bits - 1), 2 ** bits - rng.randint(1, 8),  # the last: small negatives
               original + rng.randint(-8, 8), rng.getrandbits(bits), min(original * 1000 + 1, 2 ** bits - 1)]
    return rng.choice(choices) % 2 ** bits


def mutate_bytes(good: bytes, header_end: int, fields: list[tuple[int, int]], rng: random.Random) -> bytes:
    """Truncate, flip bytes, overwrite an integer field with an odd value, or copy a chunk over
    another; most of the damage lands in the header, where the reader's decisions are made."""
    data = bytearray(good)

    def near() -> int:
        return rng.randrange(header_end if rng.random() < 0.8 else len(data))

    kind = rng.randrange(4)
    if kind == 0:
        return bytes(data[:near()])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            data[near()] ^= 1 << rng.randrange(8)
    elif kind == 2 and fields:
        offset, width = rng.choice(fields)
        original = int.from_bytes(data[offset:offset + width], "little")
        data[offset:offset + width] = _odd_integer(rng, width, original).to_bytes(width, "little")
    else:
        start, length = near(), rng.randint(1, 64)
        chunk = data[start:start + length]
        at = near()
        data[at:at + len(chunk)] = chunk
    return bytes(data)


@pytest.mark.slow
@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's overflow warnings would be stray stderr lines
def test_fuzz_gguf_reader(tmp_path):
    good = tiny_gguf(tmp_path / "good.gguf")
    reader, arch, config = gguf_metadata(good)
    gguf_tensors(reader, good, config, arch)  # the unmutated file loads
    fields, header_end, data = integer_fields(good), reader.data_offset, good.read_bytes()
    case = tmp_path / "case.gguf"

    def target(mutated: bytes) -> None:
        case.write_bytes(mutated)
        r, a, c = gguf_metadata(case)
        gguf_tensors(r, case, c, a)

    run, loaded = fuzz(3000, 30, lambda rng: mutate_bytes(data, header_end, fields, rng), target)
    assert run >= 1000 and 0 < loaded < run, (run, loaded)


ODD_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
              "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "XYZ", "", 3, None]
ODD_NUMBERS = [-1, 0, 1, 3, 2 ** 31, 2 ** 32 + 1, 2 ** 62, 2 ** 64, 2 ** 70, 1.5, "7", None]


def mutate_header(header: dict, rng: random.Random) -> dict:
    """One field of one entry made odd: a dtype, a dimension, an offset, the entry's shape, or metadata."""
    header = json.loads(json.dumps(header))
    entry = header[rng.choice([k for k in header if k != "__metadata__"])]
    kind = rng.randrange(6)
    if kind == 0:
        entry["dtype"] = rng.choice(ODD_DTYPES)
    elif kind == 1 and entry["shape"]:
        entry["shape"][rng.randrange(len(entry["shape"]))] = rng.choice(ODD_NUMBERS)
    elif kind == 2:
        entry["data_offsets"][rng.randrange(2)] = rng.choice(ODD_NUMBERS)
    elif kind == 3:
        entry["data_offsets"] = entry["data_offsets"][::-1] if rng.random() < 0.5 else entry["data_offsets"][:1]
    elif kind == 4:
        entry["shape"] = rng.choice([[], [0], [2 ** 40, 2 ** 40], [1] * 40, "4"])
    else:
        header["__metadata__"] = rng.choice([{"format": 1}, [], "pt", {"a": None}])
    return header


def mutate_safetensors(good: bytes, header: dict, body: bytes, rng: random.Random) -> bytes:
    """Byte-level damage (as for GGUF), an odd header length, or a header lying about one tensor."""
    kind = rng.randrange(3)
    if kind == 0:
        return mutate_bytes(good, len(good) - len(body), [(0, 8)], rng)
    if kind == 1:
        length = _odd_integer(rng, 8, len(good) - len(body) - 8)
        return length.to_bytes(8, "little") + good[8:]
    raw = json.dumps(mutate_header(header, rng)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.slow
def test_fuzz_safetensors_reader(tmp_path):
    import torch
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"a": torch.randn(4, 8), "b": torch.randn(16).half(), "c": torch.randn(2, 3, 4).bfloat16(),
               "d": torch.arange(5), "e": torch.zeros(7, dtype=torch.uint8), "f": torch.ones(3, dtype=torch.bool)},
              str(good), metadata={"format": "pt"})
    assert set(read_weights_file(good)) == set("abcdef")
    header, body = _header(good)
    data, case = good.read_bytes(), tmp_path / "case.safetensors"

    def target(mutated: bytes) -> None:
        case.write_bytes(mutated)
        read_weights_file(case)

    run, loaded = fuzz(3000, 20, lambda rng: mutate_safetensors(data, header, body, rng), target)
    assert run >= 1000 and 0 < loaded < run, (run, loaded)
