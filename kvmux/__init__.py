"""kvmux: an LLM inference engine over a paged KV cache multiplexed across concurrent requests."""
from importlib import import_module

# Exports are imported on first use, so `import kvmux.cache.block_manager` (or the
# client library) does not pay for importing torch and transformers.
_EXPORTS = {
    "Engine": "kvmux.engine.supervisor", "LLM": "kvmux.llm", "SamplingParams": "kvmux.sampling",
    "RequestOutput": "kvmux.outputs", "Completion": "kvmux.outputs", "KvmuxError": "kvmux.outputs",
    "RequestRejected": "kvmux.outputs",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvmux' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
