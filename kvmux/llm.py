"""A synchronous wrapper for scripts: the engine runs on an event loop in a background thread."""
from __future__ import annotations

import asyncio
import atexit
import uuid
import weakref

from kvmux.engine.supervisor import Engine, Prompt
from kvmux.loop_thread import LoopThread
from kvmux.outputs import Completion, KvmuxError
from kvmux.sampling import SamplingParams

Conversation = list[dict]  # chat messages: {"role": ..., "content": ...}


class LLM:
    """Blocking access to an Engine.

        with LLM() as llm:
            print(llm.chat([{"role": "user", "content": "Hello!"}])[0].text)

    An LLM a script never closes is closed when the interpreter exits.
    """

    def __init__(self, model: str | None = None, **options) -> None:
        self._loop = LoopThread("kvmux-loop")
        self.engine = Engine(model, **options)
        try:
            self._loop.run(self.engine.start())
        except BaseException:
            self._loop.close()
            raise
        # A weak reference, so the handler does not keep an LLM alive that the script has dropped.
        self._atexit = _close_at_exit(weakref.ref(self))
        atexit.register(self._atexit)

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run every prompt concurrently (continuous batching) and return their completions in order.

        Prompts are raw text (no chat template: see `chat`), token ids or chat
        messages. A prompt the engine refuses gets a completion of its own with
        finish_reason "error" and `error` saying why; the others run as usual.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], (int, dict))):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams; give one, or one per prompt")

        async def one(prompt, sampling):
            request_id = uuid.uuid4().hex
            try:
                return await self.engine.complete(prompt, sampling, request_id=request_id)
            except KvmuxError as exc:
                return Completion(request_id, finish_reason="error", error=str(exc))

        async def run_all():
            return await asyncio.gather(*(one(p, sp) for p, sp in zip(prompts, params)))

        return self._loop.run(run_all())

    def chat(self, messages: Conversation | list[Conversation],
             params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Answer one conversation (a list of messages) or several, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate(list(conversations), params)

    def stats(self) -> dict:
        return self._loop.run(self.engine.stats())

    def close(self) -> None:
        atexit.unregister(self._atexit)
        if self._loop.alive:
            self._loop.run(self.engine.stop())
            self._loop.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_at_exit(ref: weakref.ref):
    def close() -> None:
        llm = ref()
        if llm is not None:
            llm.close()
    return close
