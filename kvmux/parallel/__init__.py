"""Tensor parallelism over torch.distributed: the model split across N worker processes by heads, MLP
features and vocabulary, driven by the one engine process that keeps the scheduler, the allocator and the
actors. Which slice of every weight a rank holds is the model's business (`kvmux.model.sharding`: the loader
cuts the slices as it reads the weights).

- `collectives`: the all-reduces and gathers a sharded forward makes.
- `worker`: a rank's process: its slice of the model and of the KV pool, one step per message.
- `driver`: the engine process's side: starts or joins the ranks, sends each step, reads the tokens back.
"""
