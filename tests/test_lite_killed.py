"""`quantserve lite` killed at any moment never leaves a --work-dir that looks complete but is not,
and the next run with the same --work-dir starts clean (or says, in one line, what to remove)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quantserve.cli.main import main
from quantserve.quant.checkpoint import COPIED

# one torch thread leaves this process a core to watch the child's directory closely
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
CALIB = ["--w-group-size", "32", "--calib-samples", "1", "--calib-seqlen", "32", "--no-clip"]


def lite_argv(method: str, model: Path, work: Path, calib: Path) -> list[str]:
    return ["lite", method, str(model), "--work-dir", str(work), *CALIB, "--calib-dataset", str(calib)]


def expected_files(model: Path) -> set[str]:
    return {"config.json", "model.safetensors"} | {name for name in COPIED if (model / name).is_file()}


def assert_complete(work: Path, model: Path) -> None:
    """Every file a result has, and it loads: weights, codes and tokenizer."""
    from quantserve.models.loader import load_model
    from quantserve.text import Tokenizer

    assert {p.name for p in work.iterdir()} == expected_files(model)
    load_model(work, torch.float32, "cpu", 64, progress=False)
    Tokenizer(work)


def disk_state(parent: Path) -> frozenset:
    """(path, size, mtime) of everything under parent; what the child renames meanwhile is skipped."""
    state = set()
    for root, dirs, files in os.walk(parent):  # os.walk skips directories that vanish under it
        for name in dirs + files:
            try:
                st = os.stat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            state.add((os.path.join(root, name), st.st_size, st.st_mtime_ns))
    return frozenset(state)


def run_and_kill(argv: list[str], work: Path, rng: random.Random, when: str) -> None:
    """Start `quantserve lite`; SIGKILL it after a seeded delay: "early" at a random moment of its
    start, "write" a few milliseconds after anything is written beside or inside the work dir
    (while the result is being written)."""
    before = disk_state(work.parent)
    proc = subprocess.Popen([sys.executable, "-m", "quantserve.cli.main", *argv], env=ONE_THREAD,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + (120 if when == "write" else rng.uniform(0.5, 3.0))
    while proc.poll() is None and time.monotonic() < deadline:
        if when == "write" and disk_state(work.parent) - before:  # written, not only swept
            time.sleep(rng.uniform(0, 0.003))  # the tiny result takes ~4 ms to write
            break
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def run_to_the_end(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "quantserve.cli.main", *argv], env=ONE_THREAD,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    from conftest import CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(CORPUS * 4))
    return path


PLANS = {  # kills, in order; "finish" lets a run complete, so later kills meet an earlier result
    "rtn": ["early", "write", "finish", "write", "write", "write"],
    "auto_awq": ["write"],
    "auto_gptq": ["write"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", PLANS)
def test_killed_lite_never_leaves_a_partial_work_dir(method, tiny_chat_model, calib_text, tmp_path):
    rng = random.Random(f"{method}-7")
    work = tmp_path / "out" / "work"
    work.parent.mkdir()
    argv = lite_argv(method, tiny_chat_model, work, calib_text)
    for step in PLANS[method]:
        if step == "finish":
            run_to_the_end(argv)
            continue
        run_and_kill(argv, work, rng, step)
        if work.exists():  # killed after the rename: a whole result, this run's or the earlier one
            assert_complete(work, tiny_chat_model)
    run_to_the_end(argv)
    assert_complete(work, tiny_chat_model)
    assert [p.name for p in work.parent.iterdir()] == ["work"]  # what the killed runs left is gone


def test_work_dir_with_other_files_is_refused_in_one_line(tiny_chat_model, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.json").write_text("{}")
    (work / "notes.txt").write_text("mine")
    code = main(["lite", "rtn", str(tiny_chat_model), "--work-dir", str(work), "--w-group-size", "32"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0] == (f"quantserve lite: error: --work-dir {work} holds files a quantized model does not "
                        "(notes.txt); remove them or choose another directory")
    assert (work / "notes.txt").read_text() == "mine"  # never replaced, never deleted


def test_leftovers_of_dead_runs_are_swept_and_live_ones_kept(tiny_chat_model, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    work = tmp_path / "work"
    stale = [tmp_path / f".work.partial-{dead.pid}-x1y2", tmp_path / f".work.old-{dead.pid}"]
    live = tmp_path / f".work.partial-{os.getppid()}-z3"  # pytest's parent: running
    for d in [*stale, live]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    assert main(["lite", "rtn", str(tiny_chat_model), "--work-dir", str(work), "--w-group-size", "32"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "work"])
    assert_complete(work, tiny_chat_model)


def test_work_dir_may_not_be_the_model_itself(tiny_chat_model, capsys):
    before = (tiny_chat_model / "model.safetensors").read_bytes()
    assert main(["lite", "rtn", str(tiny_chat_model), "--work-dir", str(tiny_chat_model)]) == 1
    assert "is the model being quantized" in capsys.readouterr().err
    assert (tiny_chat_model / "model.safetensors").read_bytes() == before
