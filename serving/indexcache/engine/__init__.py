"""The engine: continuous batching over one preallocated KV cache (`engine.py`), sampling, and the
reference generate loops it is tested against (`generate.py`). It sees token ids only."""

from .engine import ContextLengthError, Engine, EngineRequest, TokenChunk
from .sampling import SamplingParams

__all__ = ["ContextLengthError", "Engine", "EngineRequest", "SamplingParams", "TokenChunk"]
