"""One step's contract between the engine and the forward: what a step asks (`work`: the chunks, their draws,
the block copies) and what it gives back (the sampled tokens), and the packed tensors a model reads
(`forward_batch`). The engine, the runner, the model and the attention kernels all speak it, so it sits below
them all."""
