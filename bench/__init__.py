"""`kvmux bench`: throughput, latency and memory of kvmux against transformers baselines on one workload."""
