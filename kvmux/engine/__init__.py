"""The engine: a supervisor (`supervisor.Engine`) wiring four asyncio actors (admission, prefill, decode,
eviction) that exchange the msgpack messages of `messages`, and the router that hands outputs back to callers.
Each step runs on the forward thread through a runner (`kvmux.runner`, or `kvmux.parallel`'s across ranks).
"""
