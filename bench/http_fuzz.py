"""Fuzz the HTTP server with schemathesis against its own OpenAPI schema: `python -m bench.http_fuzz`.

Every operation gets in-schema (positive) and out-of-schema (negative) cases; every answer goes through
schemathesis' checks (no 5xx, statuses, content types and bodies as the schema documents them, out-of-schema
data refused) except positive_data_acceptance: ranges are the engine's to check, not the schema's, so a
well-typed temperature of -1 is rightly a 400. After the run the pool must be whole and the server must still
answer. tests/test_http_fuzz.py runs this briefly; the default here is the long run recorded in
bench/results/http_fuzz.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import positive_data_acceptance

ROOT = Path(__file__).resolve().parent.parent
# What the fuzzed engine allows: every generation short (a larger max_tokens is refused), room for many requests.
# 16 is completions' default max_tokens, so requests that leave it out are served.
ENGINE = {"num_blocks": 128, "block_size": 8, "max_tokens_limit": 16, "max_pending": 64}


def fuzz(url: str, examples: int, seed: int | None = None) -> dict:
    """Run `examples` cases per operation and generation mode against the server at url; returns the statuses
    seen and every failed check (nothing in `failures` is a pass)."""
    api = schemathesis.openapi.from_url(url + "/openapi.json")
    statuses: Counter = Counter()
    failures: list[dict] = []
    for result in api.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
                      suppress_health_check=list(HealthCheck))
            @given(operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call(timeout=60)
                statuses[f"{operation.method.upper()} {operation.path} {response.status_code}"] += 1
                try:
                    case.validate_response(response, excluded_checks=[positive_data_acceptance])
                except (Failure, FailureGroup) as exc:  # every failed check is recorded, not only the first
                    failures.append({"operation": f"{operation.method.upper()} {operation.path}", "mode": mode.value,
                                     "status": response.status_code, "check": str(exc)[:2000],
                                     "request": case.as_curl_command()[:2000]})

            try:
                (run if seed is None else hypothesis_seed(seed)(run))()
            except Unsatisfiable:
                pass  # nothing to break in this mode (GET /health has no input that could be out of the schema)
    return {"cases": sum(statuses.values()), "statuses": dict(sorted(statuses.items())), "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=500, help="cases per operation and mode [default: 500]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model to serve [default: SmolLM2-135M-Instruct]")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "http_fuzz.json")
    args = parser.parse_args(argv)

    from kvmux.engine.supervisor import Engine
    from kvmux.loop_thread import LoopThread
    from kvmux.serve.http import HttpOptions, HttpServer

    loop = LoopThread("kvmux-fuzz")
    engine = Engine(args.model, **ENGINE)
    loop.run(engine.start())
    server = HttpServer(engine, HttpOptions(port=0))
    loop.run(server.start())
    started = time.perf_counter()
    report = fuzz(f"http://127.0.0.1:{server.port}", args.examples, args.seed)
    elapsed = time.perf_counter() - started

    async def leaked() -> int:
        while engine.admission.live or server.in_flight():
            await asyncio.sleep(0.01)
        return engine.blocks.num_blocks - engine.blocks.num_free

    report.update(leaked_blocks=loop.run(leaked(), timeout=60), seconds=elapsed, examples=args.examples,
                  seed=args.seed, model=engine.loaded.name, engine=ENGINE, load_avg=os.getloadavg(),
                  command=" ".join(["python -m bench.http_fuzz", *(argv if argv is not None else sys.argv[1:])]))
    loop.run(server.shutdown())
    loop.run(engine.stop())
    loop.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['cases']} cases in {elapsed:.0f} s, {len(report['failures'])} failed checks, "
          f"{report['leaked_blocks']} leaked blocks; wrote {args.out}")
    return 1 if report["failures"] or report["leaked_blocks"] else 0


if __name__ == "__main__":
    sys.exit(main())
