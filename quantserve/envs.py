"""Every environment variable quantserve reads, in one place."""
import os
from pathlib import Path


def quantserve_home() -> Path:
    """Cache root for converted models and downloaded wheels (QUANTSERVE_HOME)."""
    default = Path.home() / ".cache" / "quantserve"
    return Path(os.environ.get("QUANTSERVE_HOME", default)).expanduser()


def num_threads() -> int | None:
    """Threads for CPU kernels (QUANTSERVE_NUM_THREADS); None means all cores."""
    value = os.environ.get("QUANTSERVE_NUM_THREADS")
    return int(value) if value else None


def log_level() -> str:
    return os.environ.get("QUANTSERVE_LOG_LEVEL", "INFO").upper()


def kernels_disabled() -> bool:
    """QUANTSERVE_DISABLE_KERNELS=1 forces the plain PyTorch path (for comparison and debugging)."""
    return os.environ.get("QUANTSERVE_DISABLE_KERNELS", "") not in ("", "0")


def isa() -> str | None:
    """QUANTSERVE_ISA=avx512|avx2|torch forces the kernel backend; None: the widest the CPU runs."""
    return os.environ.get("QUANTSERVE_ISA", "").strip().lower() or None


def bf16_dot() -> bool:
    """QUANTSERVE_BF16_DOT=0 keeps bfloat16 weights on the float32-activation kernels; by default
    they multiply bf16-rounded activations with vdpbf16ps where the CPU has AVX512_BF16."""
    return os.environ.get("QUANTSERVE_BF16_DOT", "1") not in ("0", "")
