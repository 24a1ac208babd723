"""The Llama family over a packed batch (`llama`), loading safetensors folders and GGUF files (`loader`), and
which slice of it a tensor-parallel rank holds (`sharding`)."""
