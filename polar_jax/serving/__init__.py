"""Serving: a continuous-batching engine (`Engine`) and an OpenAI-compatible HTTP server (`polar-serve`).

    from polar_jax.serving import Engine, SamplingParams
    engine = Engine(model, max_batch=16, max_len=1024)
    [out] = engine.generate([prompt_ids], SamplingParams(max_tokens=32))

The server (`polar_jax.serving.server`) needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""

from polar_jax.serving.engine import Engine
from polar_jax.serving.params import EngineOptions, SamplingParams
from polar_jax.serving.request import EngineClosedError, QueueFullError, RequestHandle, RequestOutput

__all__ = ["Engine", "EngineClosedError", "EngineOptions", "QueueFullError", "RequestHandle", "RequestOutput",
           "SamplingParams"]
