"""kvmux: an LLM inference engine over a paged KV cache multiplexed across concurrent requests.

What a user imports lives here: the engine (`Engine`, asyncio; `LLM`, blocking), `SamplingParams`, the
outputs and errors, and the clients of a running server (`AsyncClient`, `Client`). The layers below are
kvmux.engine (actors), kvmux.cache (KV blocks), kvmux.ops (kernels), kvmux.model and kvmux.serve.
"""
from importlib import import_module

# Exports are imported on first use, so `import kvmux` (and with it the client library) does not pay for
# importing torch and transformers.
_EXPORTS = {
    "Engine": "kvmux.engine.supervisor", "LLM": "kvmux.llm", "SamplingParams": "kvmux.sampling",
    "EngineConfig": "kvmux.config",
    "RequestOutput": "kvmux.outputs", "Completion": "kvmux.outputs", "KvmuxError": "kvmux.outputs",
    "RequestRejected": "kvmux.outputs",
    "AsyncClient": "kvmux.serve.client", "Client": "kvmux.serve.client", "ServerError": "kvmux.serve.client",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvmux' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
