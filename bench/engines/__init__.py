"""One module per engine; each exposes run(job) -> dict of results (timings summarised by bench.metrics)."""
