"""A synchronous wrapper for scripts: the engine runs on an event loop in a background thread."""
from __future__ import annotations

import asyncio

from kvmux.engine.loop_thread import LoopThread
from kvmux.engine.supervisor import Engine, Prompt
from kvmux.outputs import Completion
from kvmux.sampling import SamplingParams


class LLM:
    """llm = LLM(); print(llm.generate(["Hello"])[0].text)"""

    def __init__(self, model: str | None = None, **options) -> None:
        self._loop = LoopThread("kvmux-loop")
        self.engine = Engine(model, **options)
        try:
            self._loop.run(self.engine.start())
        except BaseException:
            self._loop.close()
            raise

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run every prompt concurrently (continuous batching) and return their completions in order.

        A rejected prompt raises; pass prompts one list at a time to isolate them.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params] * len(prompts)

        async def run_all():
            return await asyncio.gather(*(self.engine.complete(p, sp) for p, sp in zip(prompts, params)))

        return self._loop.run(run_all())

    def stats(self) -> dict:
        return self._loop.run(self.engine.stats())

    def close(self) -> None:
        if self._loop.alive:
            self._loop.run(self.engine.stop())
            self._loop.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
