"""quantserve: run quantized LLMs fast on the machine you already have."""
from quantserve.config import EngineConfig, GenerationConfig

# LMDeploy spells the engine config after its backends; both mean the one engine here.
PytorchEngineConfig = TurbomindEngineConfig = EngineConfig

__version__ = "0.1.0"
__all__ = ["pipeline", "EngineConfig", "GenerationConfig", "PytorchEngineConfig", "TurbomindEngineConfig", "LLM",
           "SamplingParams"]


def pipeline(*args, **kwargs):
    from quantserve.api import pipeline as _pipeline

    return _pipeline(*args, **kwargs)


def __getattr__(name: str):
    """vLLM's `LLM` and `SamplingParams`, imported only when asked for (they load the engine)."""
    if name in ("LLM", "SamplingParams"):
        from quantserve import llm

        return getattr(llm, name)
    raise AttributeError(f"module 'quantserve' has no attribute {name!r}")
