"""transformers `generate` with static batches: B requests at a time, left-padded, each batch running to its
longest output. Offline only: a static batch cannot admit arrivals, so online latency is not measured."""
from __future__ import annotations

import time

import torch

from bench.engines.hf_common import load
from bench.job import Job
from bench.metrics import Timing, summarize


def _batch_tensors(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def _generate(model, prompts: list[list[int]], max_new: int, pad_id: int) -> torch.Tensor:
    ids, mask = _batch_tensors(prompts, pad_id)
    # eos_token_id=None: every row runs the full max_new_tokens (no early stop on EOS).
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                         eos_token_id=None, pad_token_id=pad_id)
    return out[:, ids.shape[1]:]


def run(job: Job) -> dict:
    model = load(job.hf_folder, job.dtype)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batch = job.options["batch_size"]
    reqs = job.requests
    with torch.inference_mode():
        _generate(model, [reqs[0].prompt_ids[:16]], 4, pad_id)  # warm-up
        timings = [Timing(r.request_id, 0.0, len(r.prompt_ids), r.output_len) for r in reqs]
        generated = 0
        start = time.perf_counter()
        for i in range(0, len(reqs), batch):
            group = reqs[i:i + batch]
            new = _generate(model, [r.prompt_ids for r in group], max(r.output_len for r in group), pad_id)
            now = time.perf_counter() - start
            generated += new.numel()
            for t, r, row in zip(timings[i:i + batch], group, new):
                # A request's useful output is its first output_len tokens; the rest of the row is padding work.
                t.token(now, min(r.output_len, row.numel()))
    result = summarize(timings, max(t.last for t in timings), latency=False)
    result["generated_tokens_incl_padding"] = generated
    return result
