"""The engine: a supervisor that loads the model, wires the actors together and serves requests."""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kvmux.cache.block_manager import BlockManager
from kvmux.cache.disk_store import DiskStore, store_key
from kvmux.cache.disk_store import describe as describe_stores
from kvmux.cache.kv_cache import PoolGeometry
from kvmux.cache.pool_plan import host_blocks, plan_pool
from kvmux.cache.tiers import DISK, DISK_SLIDING
from kvmux.config import MODEL_ENV, ConfigError, EngineConfig, SpeculativeConfig, resolve_dtype
from kvmux.engine import messages
from kvmux.engine.admission import Admission, Limits
from kvmux.engine.constraints import Constraints
from kvmux.engine.decode import Decode
from kvmux.engine.draft_model import DraftModel
from kvmux.engine.eviction import Eviction, Policy
from kvmux.engine.prefill import Prefill
from kvmux.engine.router import OutputStream, Router
from kvmux.engine.speculation import Speculator
from kvmux.model.config import SLIDING
from kvmux.model.loader import LoadedModel, default_model_path, load_model, load_model_info
from kvmux.model.metadata import context_length
from kvmux.model.sharding import Shard
from kvmux.model.tokenizer import chat_renderer
from kvmux.ops.threads import cpu_budget, pool_stats, set_threads, threads
from kvmux.outputs import Completion, KvmuxError, RequestOutput, RequestRecord, RequestRejected
from kvmux.parallel.driver import Launch, ParallelRunner
from kvmux.parallel.worker import Spec
from kvmux.runner.k_mean import digest as k_mean_digest
from kvmux.runner.k_mean import pool_k_mean
from kvmux.runner.runner import Runner
from kvmux.sampling import SamplingParams, num_samples

log = logging.getLogger("kvmux")

Prompt = str | list[int] | list[dict]


class Engine:
    """An asyncio LLM engine over a paged, multiplexed KV cache.

        async with Engine() as engine:
            async for out in engine.generate("Hello", SamplingParams(max_tokens=32)):
                print(out.text, end="")
    """

    def __init__(self, model: str | None = None, **options) -> None:
        self.config = EngineConfig(model=model, **options)
        self.config.validate()
        self.loaded: LoadedModel | None = None
        self._tasks: list[asyncio.Task] = []
        self._query_ids = itertools.count()
        self._stopping = asyncio.Lock()
        self._started_at = 0.0

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        cfg = self.config
        budget = cpu_budget()
        set_threads(cfg.threads or budget.threads)
        self.threads = {"threads": threads(), "chosen_by": "the threads setting" if cfg.threads else budget.reason(),
                        "affinity_cpus": budget.affinity, "cpu_quota": budget.quota}
        log.info("kernel threads: %d (%s)", self.threads["threads"], self.threads["chosen_by"])
        # The forward's parallel work is kvmux's kernels, on their own pool: torch's OpenMP threads beside it
        # spun on the same cores between torch's own ops and cost a fifth of the throughput (docs/benchmarks.md).
        torch.set_num_threads(1)
        model = cfg.model or os.environ.get(MODEL_ENV)
        source = Path(model).expanduser() if model else default_model_path()
        context = context_length(source)  # read without loading, so a bad setting fails before the load
        if cfg.max_model_len and context and cfg.max_model_len > context:
            raise ConfigError("max_model_len", f"is {cfg.max_model_len}, beyond the model's context length of "
                                               f"{context} tokens")
        # One thread runs every forward, so exactly one runs at a time and the
        # event loop stays free for admissions and streaming meanwhile.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="kvmux-forward")
        loop = asyncio.get_running_loop()
        self.dtype = resolve_dtype(cfg.dtype, cfg.device)
        dtype = getattr(torch, self.dtype)
        parallel = cfg.tensor_parallel_size > 1
        self.loaded = await loop.run_in_executor(self.executor, functools.partial(
            load_model_info if parallel else load_model, model, dtype, cfg.device,
            attention_backend=cfg.attention_backend, quantization=cfg.quantization))
        if self.loaded.tokenizer.chat_template:
            await loop.run_in_executor(self.executor, chat_renderer)  # after the weights (see chat_renderer)
        # Under tensor parallelism each rank plans its own kernels (and logs them); the driver has no weights.
        self.kernels = None if parallel else self.loaded.model.kernel_choices()
        if self.kernels:
            log.info("attention kernel: %s", self.kernels["attention"])
        arch = self.loaded.config
        max_model_len = cfg.max_model_len or arch.max_position_embeddings
        # Under tensor parallelism a block's bytes are a rank's: its KV heads' slice (the budgets are per rank).
        kv_heads = len(Shard.of(arch, 0, cfg.tensor_parallel_size).kv_heads) if parallel else arch.num_key_value_heads
        kv_dtype = torch.int8 if cfg.kv_cache_dtype == "int8" else dtype
        if kv_dtype == torch.int8 and arch.head_dim % 4:
            raise ConfigError("kv_cache_dtype", f"int8 keeps 4 head dims per dword, and this model's head_dim is "
                                                f"{arch.head_dim}; use --kv-cache-dtype auto")
        speculative = SpeculativeConfig.from_dict(cfg.speculative_config) if cfg.speculative_config else None
        split = cfg.sliding_window_pool != "off"
        sliding_layers = sum(t == SLIDING for t in arch.layer_types or ()) if split else 0
        window = arch.sliding_window or 0
        try:
            # The budget, but no more than every seat holding a full-length
            # sequence could use: a small model should not zero a gigabyte it never touches.
            pool = plan_pool(PoolGeometry(arch.num_hidden_layers, kv_heads, arch.head_dim, cfg.block_size, kv_dtype),
                             budget_bytes=int(cfg.kv_cache_gib * 2**30), num_blocks=cfg.num_blocks,
                             max_num_seqs=cfg.max_num_seqs, max_model_len=max_model_len,
                             num_sliding_layers=sliding_layers, window=window,
                             step_tokens=cfg.max_num_batched_tokens,
                             # a decode step's slots beyond its first token: drafts, or a run's later forwards
                             lookahead=max(speculative.num_speculative_tokens if speculative else 0,
                                           0 if parallel else cfg.num_scheduler_steps - 1))
        except ValueError as exc:
            raise ValueError(f"kv_cache_gib={cfg.kv_cache_gib} {exc}") from None
        geometry, num_blocks = pool.geometry, pool.num_blocks
        if cfg.sliding_window_pool == "on" and not pool.window:  # asked for by name: say why it is not there
            why = ("the model has no sliding-window layers" if not sliding_layers else
                   f"its window ({window}) is no shorter than max_model_len ({max_model_len})"
                   if window >= max_model_len else
                   f"the windows of --max-num-seqs {cfg.max_num_seqs} sequences would take more of --kv-cache-gib "
                   f"{cfg.kv_cache_gib} than they save (lower --max-num-seqs, or give more memory)")
            log.warning("--sliding-window-pool on: one pool holds every layer's KV for every token: %s", why)
        if pool.window:
            log.info("KV pool: %d blocks of the %d full-attention layers, %d of the %d sliding-window layers "
                     "(window %d)", num_blocks, geometry.num_layers, pool.num_sliding_blocks,
                     pool.sliding_geometry.num_layers, pool.window)
        num_host, num_host_sliding = host_blocks(pool, int(cfg.host_cache_gib * 2**30), cfg.num_host_blocks)
        # The sliding layers' slots have a disk store beside the blocks', as many of each (each rank its slices).
        sliding_disk = bool(pool.window and cfg.disk_cache_dir)
        disk_block_bytes = geometry.block_bytes + (pool.sliding_geometry.block_bytes if sliding_disk else 0)
        num_disk = int(cfg.disk_cache_gib * 2**30) // disk_block_bytes if cfg.disk_cache_dir else 0
        self.geometry, self.pool = geometry, pool
        # Everything that shapes a KV block's bytes: it seeds every block hash, and names the disk tier's store.
        # An int8 pool's K offset, calibrated before any key is stored (under tensor parallelism, by each rank).
        k_mean = None if parallel else await loop.run_in_executor(
            self.executor, pool_k_mean, self.loaded.model, geometry)
        kv_meta = kv_identity(self.loaded, self.dtype, geometry, cfg.tensor_parallel_size, k_mean)
        kv_key = store_key(kv_meta)
        stores = {DISK: (cfg.disk_cache_dir, kv_key, kv_meta, geometry)}
        if sliding_disk:  # in a folder of its own: a store holds its folder's lock
            meta = {**kv_identity(self.loaded, self.dtype, pool.sliding_geometry, cfg.tensor_parallel_size, k_mean),
                    "layer_group": "sliding_attention"}
            stores[DISK_SLIDING] = (os.path.join(cfg.disk_cache_dir, "sliding-window-layers"), store_key(meta), meta,
                                    pool.sliding_geometry)
        if parallel:
            sliding_key, sliding_meta = stores[DISK_SLIDING][1:3] if sliding_disk else ("", None)
            spec = Spec(str(self.loaded.path), self.dtype, cfg.quantization, cfg.device, cfg.attention_backend,
                        pool, num_host, num_host_sliding, num_disk, cfg.disk_cache_dir, cfg.tensor_parallel_size,
                        kv_key, kv_meta, sliding_key, sliding_meta)
            launch = Launch(cfg.tensor_parallel_size, cfg.distributed_init_method, cfg.nnodes)
            self.runner = await loop.run_in_executor(self.executor, functools.partial(
                ParallelRunner, launch, spec, arch, lambda reason: loop.call_soon_threadsafe(self._fail, reason)))
        else:
            disks = open_stores(stores, num_disk) if num_disk else {}
            self.runner = Runner.build(self.loaded.model, pool, num_host, num_host_sliding, disks, cfg.device, k_mean)
        self.blocks = BlockManager(num_blocks, cfg.block_size, enable_prefix_caching=cfg.enable_prefix_caching,
                                   cache_key=kv_key.encode(), num_host_blocks=num_host, num_disk_blocks=num_disk,
                                   num_sliding_blocks=pool.num_sliding_blocks, window=pool.window,
                                   num_host_sliding_blocks=num_host_sliding,
                                   num_disk_sliding_blocks=num_disk if sliding_disk else 0)
        opened = {}
        if parallel and num_disk:  # each rank opened its slice of each store
            for tier, found in self.runner.disk_opened.items():
                opened[tier] = found
                self.blocks.tiers_of(tier).on_disk_touch = functools.partial(self.runner.disk_touched, tier)
        elif not parallel:
            for tier, disk in self.runner.copier.disks.items():
                opened[tier] = await loop.run_in_executor(self.executor, disk.open)  # reads every block once
                self.blocks.tiers_of(tier).on_disk_touch = disk.touched
        for tier, found in opened.items():
            self.blocks.tiers_of(tier).restore_disk(found.blocks, found.corrupt, found.bad_records)
            log.info("disk cache %s: %d cached %s from earlier runs", stores[tier][0], len(found.blocks),
                     "blocks" if tier == DISK else "sliding-window slots")
        if opened:
            ours = {key for _, key, _, _ in stores.values()}
            others = [s for s in describe_stores(cfg.disk_cache_dir) if s["fingerprint"] not in ours]
            if others:  # each model and setting has its own store, bounded alone: say what the folder holds
                log.warning("disk_cache_dir %s also holds %d store(s) of other models or settings, %.1f GiB on disk "
                            "(`kvmux cache info` lists them, `kvmux cache clear` deletes them)", cfg.disk_cache_dir,
                            len(others), sum(s["disk_bytes"] for s in others) / 2**30)
        self.max_model_len = max_model_len

        tokenizer = self.loaded.tokenizer
        eos_ids = eos_token_ids(self.loaded)
        self.constraints = Constraints(tokenizer.backend.to_str, arch.vocab_size, eos_ids, cfg.structured_max_bytes,
                                       cfg.structured_compile_timeout)
        low = int(cfg.watermark * num_blocks)
        self.router = Router()
        self.prefill = Prefill(self.blocks, cfg.max_num_seqs, watermark_blocks=low, router=self.router)
        policy = Policy(cfg.preemption_mode, low_blocks=low, high_blocks=max(low, int(cfg.high_watermark * num_blocks)),
                        block_bytes=geometry.block_bytes,
                        sliding_block_bytes=pool.sliding_geometry.block_bytes if pool.sliding_geometry else 0)
        self.eviction = Eviction(self.blocks, policy, router=self.router)
        speculator = None
        if speculative is not None:
            draft = None
            if speculative.method == "draft_model":
                draft = await loop.run_in_executor(self.executor, functools.partial(
                    DraftModel.load, speculative.model, self.loaded, dtype=dtype, kv_dtype=kv_dtype,
                    device=cfg.device, attention_backend=cfg.attention_backend,
                    quantization=speculative.quantization or cfg.quantization,
                    budget_bytes=int(cfg.kv_cache_gib * 2**30), num_blocks=cfg.num_blocks, block_size=cfg.block_size,
                    max_num_seqs=cfg.max_num_seqs, max_model_len=max_model_len,
                    enable_prefix_caching=cfg.enable_prefix_caching))
            speculator = Speculator(speculative, draft)
            log.info("speculative decoding: %s", speculator.config)
        self.decode = Decode(self.blocks, self.runner, self.executor,
                             tokenizer, eos_ids, cfg.max_num_batched_tokens,
                             prefill=self.prefill, eviction=self.eviction, router=self.router,
                             constraints=self.constraints, speculator=speculator,
                             # Ranks other than 0 never see the sampled tokens a later forward would take.
                             num_scheduler_steps=1 if parallel else cfg.num_scheduler_steps)
        self.prefill.decode = self.decode
        self.eviction.decode = self.decode
        limits = Limits(max_model_len=max_model_len, pool_tokens=num_blocks * cfg.block_size,
                        block_size=cfg.block_size, max_pending=cfg.max_pending, vocab_size=arch.vocab_size,
                        max_prompt_tokens=cfg.max_prompt_tokens, max_tokens_limit=cfg.max_tokens_limit,
                        max_samples=cfg.max_num_seqs if pool.window else None)
        self.admission = Admission(tokenizer, limits, self.prefill, self.decode, self.router, self.constraints)
        self.router.admission = self.admission
        self._actors = [self.admission, self.prefill, self.decode, self.eviction]
        self._tasks = [asyncio.create_task(a.run(), name=f"kvmux-{a.name}") for a in self._actors + [self.router]]
        for task in self._tasks:
            task.add_done_callback(self._supervise)
        self._started_at = time.monotonic()

    def _supervise(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("actor %s died: %r; failing requests in flight", task.get_name(), task.exception())
            for stream in self.router.streams.values():
                stream.put(KvmuxError("engine_dead", f"{task.get_name()} crashed: {task.exception()!r}"))

    def _fail(self, reason: str) -> None:
        """Part of the engine is gone for good (a tensor-parallel rank): fail every request and stop."""
        log.error("%s; failing requests in flight and stopping the engine", reason)
        for stream in self.router.streams.values():
            stream.put(KvmuxError("engine_dead", reason))
        self._failing = asyncio.create_task(self.stop())

    async def stop(self) -> None:
        """Abort what is in flight, stop the actors, the forward thread and any tensor-parallel ranks."""
        if not self._tasks:
            return
        async with self._stopping:
            if self._tasks:
                await self._stop()

    async def _stop(self) -> None:
        for request_id in list(self.router.streams):
            await self.abort(request_id)
        for actor in self._actors + [self.router]:
            actor.send(messages.Shutdown())
        await asyncio.wait(self._tasks, timeout=30)
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        # The actors stopped before the aborts could end these (Shutdown overtakes an abort on its way):
        # their callers get an error instead of a stream that never ends.
        for stream in self.router.streams.values():
            stream.put(KvmuxError("not_running", "the engine stopped before this request finished"))
        self.executor.shutdown(wait=True)
        self.constraints.close()
        # No step runs any more: tensor-parallel ranks can be stopped (which waits for them), the disk tier's file go.
        if isinstance(self.runner, ParallelRunner):
            await asyncio.get_running_loop().run_in_executor(None, self.runner.close)
        else:
            self.runner.close()

    # -- requests ------------------------------------------------------------

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None, *,
                       request_id: str | None = None, priority: int = 0, cache_salt: str | None = None,
                       tools: list[dict] | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's output. prompt is raw text, token ids, or chat messages (the chat template is applied).

        With params.n > 1 the pieces of all n samples interleave, told apart by
        `index`; each sample's last piece has finished=True, and the stream
        ends after all n. Leaving the loop early (break, cancellation) aborts the request.
        Requests share cached prefix blocks only with requests of the same `cache_salt` (None: unsalted).
        With chat messages, `tools` (OpenAI's function definitions) are handed to the chat template.
        Raises RequestRejected when admission refuses it.
        """
        if not self._tasks:
            raise KvmuxError("not_running", "the engine is not started; use `async with Engine(...)`")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.router.streams:
            raise RequestRejected("duplicate_request_id", f"request id {request_id!r} is already in flight")
        params = params or SamplingParams()
        arrival = time.monotonic()
        submit = messages.Submit(request_id, *split_prompt(prompt), replace(params), priority, arrival, cache_salt,
                                 tools)
        try:
            self.admission.send(submit)
        # A lone surrogate; an integer msgpack cannot carry; an object in the tools or messages that is not data;
        # nesting deeper than msgpack goes (a JSON schema, say: ValueError "recursion limit exceeded").
        except (UnicodeEncodeError, OverflowError, TypeError, ValueError) as exc:
            try:
                params.validate()  # names the field, where a sampling parameter is what failed
            except ValueError as bad:
                raise RequestRejected("invalid_params", str(bad)) from None
            raise RequestRejected("invalid_params", f"the request cannot be encoded: {exc}") from None
        # Registered after the send, in the same turn of the loop: admission cannot answer before.
        stream = self.router.streams[request_id] = OutputStream()
        samples = self.router.samples_left[request_id] = num_samples(params.n)
        self.router.track(request_id, arrival)
        # The request lives on in the actor that holds it; a stream may last long, so it keeps no copy here.
        del prompt, params, submit
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, Exception):
                    finished = True
                    raise item
                samples -= item.finished
                finished = samples == 0
                yield item
        finally:
            del self.router.streams[request_id]
            if not finished:
                self.admission.send(messages.Abort(request_id))

    @property
    def request_listeners(self) -> list[Callable[[RequestRecord], None]]:
        """Called, on the engine's loop, with each request's RequestRecord once it has ended or was refused."""
        return self.router.listeners

    async def complete(self, prompt: Prompt, params: SamplingParams | None = None, **kw) -> Completion:
        """Run a request to the end and return its whole output (all n samples in `.samples`)."""
        return await Completion.collect(self.generate(prompt, params, **kw))

    async def abort(self, request_id: str) -> None:
        self.admission.send(messages.Abort(request_id))

    async def stats(self) -> dict:
        """Counters from every actor plus the state of the KV pool."""
        query_id = next(self._query_ids)
        future = asyncio.get_running_loop().create_future()
        self.router.queries[query_id] = (future, {}, {a.name for a in self._actors})
        for actor in self._actors:
            actor.send(messages.StatsQuery(query_id))
        try:
            merged = await asyncio.wait_for(future, timeout=30)
        finally:
            del self.router.queries[query_id]
        merged.update(
            blocks_total=self.blocks.num_blocks, blocks_free=self.blocks.num_free, blocks_used=self.blocks.num_used,
            block_size=self.blocks.block_size, kv_waste=self.blocks.kv_waste(), **self.blocks.cache_stats(),
            **self.pool.bytes_by_layer_group(self.blocks.num_used, self.blocks.num_sliding_used),
            **self.runner.stats(), **self.constraints.stats(), **kernel_counts(self.kernels),
            threads=self.threads["threads"], **pool_stats(),
            uptime_s=time.monotonic() - self._started_at,
        )
        return merged

    def describe(self) -> dict:
        """What is loaded: model name, dtype (`auto` resolved), context length, KV pool shape, and the kernels
        chosen for this CPU (per matmul shape and row range, with what each candidate measured at load)."""
        return {"model": self.loaded.name, "path": self.loaded.path, "dtype": self.dtype,
                "quantization": self.loaded.quantization, "max_model_len": self.max_model_len,
                "block_size": self.config.block_size,
                "num_blocks": self.blocks.num_blocks, "num_sliding_blocks": self.blocks.num_sliding_blocks,
                "sliding_window": self.pool.window, "kernels": self.kernels, "threads": self.threads,
                "config": asdict(self.config)}


def open_stores(stores: dict[int, tuple[str, str, dict, PoolGeometry]], num_blocks: int) -> dict[int, DiskStore]:
    """The disk tier's stores by tier, from (folder, fingerprint, meta, geometry); a failure closes those opened."""
    disks: dict[int, DiskStore] = {}
    try:
        for tier, (folder, key, meta, geometry) in stores.items():
            disks[tier] = DiskStore(folder, key, meta, geometry, num_blocks)
    except BaseException:
        for disk in disks.values():
            disk.close()
        raise
    return disks


def kv_identity(loaded: LoadedModel, dtype: str, geometry: PoolGeometry, tensor_parallel_size: int,
                k_mean: torch.Tensor | None = None) -> dict:
    """What makes a KV block's bytes what they are: the model's files (name, size, modification time), how it is
    computed (dtype, quantization, rotary settings) and the block's geometry."""
    path = Path(loaded.path).resolve()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    return {"model": str(path), "name": loaded.name,
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files],
            "dtype": dtype, "kv_dtype": str(geometry.dtype), "quantization": str(loaded.quantization),
            "rope": loaded.config.rope_parameters,
            "num_layers": geometry.num_layers, "num_kv_heads": geometry.num_kv_heads, "head_dim": geometry.head_dim,
            "block_size": geometry.block_size, "tensor_parallel_size": tensor_parallel_size,
            # int8 rows as kv_cache.py writes them since issue 25's second round: rotated, K less a calibrated mean.
            **({"int8_rows": "hadamard" + (f", k_mean {k_mean_digest(k_mean)}" if k_mean is not None else "")}
               if geometry.dtype == torch.int8 else {})}


def split_prompt(prompt: Prompt) -> tuple[str | None, list[int] | None, list[dict] | None]:
    if isinstance(prompt, str):
        return prompt, None, None
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return None, list(prompt), None
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return None, None, [dict(m) for m in prompt]
    raise RequestRejected("invalid_prompt", "prompt must be a string, a list of token ids, or a list of chat messages")


def kernel_counts(kernels: dict | None) -> dict[str, int]:
    """The kernel choices as numbers (stats are numbers only): matmul (shape, row range) cells per kernel, and
    1 for the attention kernel; describe() has the whole table (None under tensor parallelism: none here)."""
    if kernels is None:
        return {}
    counts = {f"kernels_attention_{kernels['attention']}": 1}
    for plan in kernels["linear"]:
        for r in plan["ranges"]:
            key = f"kernels_linear_{r['variant']}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = loaded.config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}
