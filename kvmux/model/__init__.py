"""The Llama family over a packed batch (`llama`), its per-step input (`forward_batch`), and loading
safetensors folders and GGUF files (`loader`)."""
