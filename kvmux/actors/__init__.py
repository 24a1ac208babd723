"""The engine's four actors: admission, prefill, decode and eviction."""
