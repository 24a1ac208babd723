"""llama.cpp (llama-cpp-python, the `peers` extra) on the same GGUF file, the same threads and the same limits
(sequences at once, tokens per step): continuous batching of greedy sequences in one unified KV cache.

llama-cpp-python's high-level `Llama` runs one sequence at a time, so this drives its low-level API the way
llama.cpp's own server batches: each `llama_decode` takes every running sequence's next token plus prompt
chunks up to the step's token budget, and a sequence's cells are released when it ends. Prompts go in as the
workload's token ids (no llama.cpp tokenization), outputs are the argmax of each sequence's logits.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from bench.job import Job
from bench.metrics import Timing, summarize


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise RuntimeError("the llama-cpp engine needs llama-cpp-python: pip install -e '.[peers]'") from exc
    return llama_cpp


def gguf_path(model: str | None) -> str:
    """The GGUF file llama.cpp runs: the job's model, or the default model's own file."""
    from kvmux.model.loader import default_model_path

    path = model or str(default_model_path())
    if not path.endswith(".gguf"):
        raise ValueError(f"the llama-cpp engine runs GGUF files only, not {path}; pass --model some.gguf")
    return path


class LlamaCpp:
    """One llama.cpp model and context over the low-level API."""

    def __init__(self, path: str, n_ctx: int, n_batch: int, n_seq_max: int, threads: int) -> None:
        lib = self.lib = _llama_cpp()
        lib.llama_backend_init()
        # Quiet (its log goes to stderr); the callback is kept alive as long as llama.cpp may call it.
        self._quiet = lib.llama_log_callback(lambda *_: None)
        lib.llama_log_set(self._quiet, None)
        self.model = lib.llama_model_load_from_file(path.encode(), lib.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = n_ctx, n_batch, n_seq_max
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = True  # any sequence may use any cell, as kvmux's pool does
        params.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells for {n_seq_max} sequences")
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.memory = lib.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = lib.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def decode(self, pieces: list[tuple[int, int, list[int], int]]) -> list[np.ndarray]:
        """One llama_decode over (sequence, first position, tokens, how many of the last tokens want logits);
        returns those logits rows, in order (views into llama.cpp's buffer, valid until the next call)."""
        b, n, wanted = self.batch, 0, []
        for seq, pos, tokens, outputs in pieces:
            for i, token in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = token, pos + i, 1, seq
                b.logits[n] = i >= len(tokens) - outputs
                if b.logits[n]:
                    wanted.append(n)
                n += 1
        b.n_tokens = n
        if (rc := self.lib.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {n} tokens")
        return [np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,)) for i in wanted]

    def release(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced next-token logits at every position of `ids` (one sequence), float32 [len, vocab]."""
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            rows += [r.copy() for r in self.decode([(0, start, chunk, len(chunk))])]
        self.release(0)
        return np.stack(rows)


@dataclass
class Running:
    timing: Timing
    prompt: list[int]
    fed: int = 0  # prompt tokens already in the KV cache
    tokens: list[int] = field(default_factory=list)  # generated so far


def _step(llm: LlamaCpp, running: dict[int, Running], budget: int) -> list[tuple[int, Running]]:
    """One step as kvmux plans it: every decoding sequence's last token, then prompt chunks in the rest of the
    budget; each sequence whose prompt is done gets its next token. Returns those (sequence, state)."""
    pieces, owners = [], []
    for seq, r in running.items():
        if r.fed == len(r.prompt):
            pieces.append((seq, len(r.prompt) + len(r.tokens) - 1, [r.tokens[-1]], 1))
            owners.append((seq, r))
            budget -= 1
    for seq, r in running.items():
        if r.fed < len(r.prompt) and budget > 0:
            chunk = r.prompt[r.fed:r.fed + budget]
            r.fed += len(chunk)
            budget -= len(chunk)
            ends = r.fed == len(r.prompt)
            pieces.append((seq, r.fed - len(chunk), chunk, int(ends)))
            if ends:
                owners.append((seq, r))
    for (_, r), row in zip(owners, llm.decode(pieces), strict=True):
        r.tokens.append(int(row.argmax()))
    return owners


def run(job: Job) -> dict:
    opts = job.options
    max_seqs, budget = opts.get("max_num_seqs", 64), opts.get("max_num_batched_tokens", 512)
    # Room for the whole workload at once, the sizing kvmux's pool gets, so no sequence waits for cells.
    cells = sum(len(r.prompt_ids) + r.output_len for r in job.requests) + 64
    llm = LlamaCpp(gguf_path(job.model), cells, budget, max_seqs, os.cpu_count() or 1)
    try:
        warm = job.requests[0].prompt_ids[:16][::-1]
        llm.decode([(0, 0, warm, 1)])
        llm.release(0)
        timings = {r.request_id: Timing(r.request_id, r.arrival, len(r.prompt_ids), r.output_len)
                   for r in job.requests}
        waiting = deque(sorted(job.requests, key=lambda r: r.arrival))
        free, running = list(range(max_seqs)), {}
        start = time.perf_counter()
        while waiting or running:
            now = time.perf_counter() - start
            while waiting and free and waiting[0].arrival <= now:
                r = waiting.popleft()
                running[free.pop()] = Running(timings[r.request_id], r.prompt_ids)
            if not running:
                time.sleep(max(0.0, waiting[0].arrival - now))
                continue
            got = _step(llm, running, budget)
            now = time.perf_counter() - start
            for seq, r in got:
                r.timing.token(now)
                if len(r.tokens) == r.timing.output_len:
                    llm.release(seq)
                    del running[seq]
                    free.append(seq)
    finally:
        llm.close()
    ordered = [timings[r.request_id] for r in job.requests]
    return summarize(ordered, max(t.last for t in ordered), latency=job.mode == "online")
