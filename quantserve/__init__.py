"""quantserve: run quantized LLMs fast on the machine you already have."""
from quantserve.config import EngineConfig, GenerationConfig

# LMDeploy spells the engine config after its backends; both mean the one engine here.
PytorchEngineConfig = TurbomindEngineConfig = EngineConfig

__version__ = "0.1.0"
__all__ = ["pipeline", "EngineConfig", "GenerationConfig", "PytorchEngineConfig", "TurbomindEngineConfig"]


def pipeline(*args, **kwargs):
    from quantserve.api import pipeline as _pipeline

    return _pipeline(*args, **kwargs)
