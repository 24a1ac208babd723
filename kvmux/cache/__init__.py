"""The KV cache: the block pool tensor, per-sequence block tables and prefix caching over the native
allocator, the host and disk tiers below the device, and the copies that move blocks between them."""
