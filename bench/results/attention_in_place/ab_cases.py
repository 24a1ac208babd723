"""The cases of ab.json: bf16 paged attention per layer on two threads, best of three timings, one line per case.
Run from a checkout of each build in turn (`PYTHONPATH=. python ab_cases.py`), processes alternated."""

import torch

from bench.attention import time_ms
from kvmux.checks.reference import LAYER, make_case
from kvmux.ops.cpu_attention import cpu_paged_attention
from kvmux.ops.threads import set_threads

torch.set_num_threads(1)
set_threads(2)
# (name, query tokens per sequence, contexts, query heads, KV heads, head_dim)
CASES = [("gemma decode b64 ctx250", [1] * 64, [250] * 64, 4, 1, 256),
         ("llama1b decode b8 ctx256", [1] * 8, [256] * 8, 32, 8, 64),
         ("smollm decode b64 ctx250", [1] * 64, [250] * 64, 9, 3, 64),
         ("gemma prefill 4x128", [128] * 4, [128] * 4, 4, 1, 256),
         ("llama prefill 4x128 d128", [128] * 4, [128] * 4, 8, 2, 128),
         ("llama1b d128 decode b16 ctx1000", [1] * 16, [1000] * 16, 32, 8, 128)]
for name, q_lens, ctx, heads, kv_heads, dim in CASES:
    case = make_case(q_lens, ctx, heads, kv_heads, dim, 16, torch.bfloat16, torch.bfloat16, seed=0)
    cache, batch = case.fresh_cache(), case.batch()
    ms = min(time_ms(lambda: cpu_paged_attention(case.q, case.k, case.v, cache, LAYER, batch, case.scale), min_time=0.5)
             for _ in range(3))
    print(name, round(ms, 3))
