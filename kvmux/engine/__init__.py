"""The engine: a supervisor (`supervisor.Engine`) wiring four asyncio actors (admission, prefill, decode,
eviction) that exchange the msgpack messages of `messages`, the router that hands outputs back to callers,
and the runner that executes each step on the forward thread.

Nothing is imported here, so light modules of this package (`loop_thread`) load without torch.
"""
