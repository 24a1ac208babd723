"""A bounded schemathesis run over the HTTP server's own OpenAPI schema (bench/http_fuzz.py has the checks and
the longer run): whatever it sends, in the schema and deliberately outside it, no answer is a 500, every answer
is what the schema documents, the server keeps serving, and no block leaks."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.http_fuzz import ENGINE

from server_helpers import ServedHttp

EXAMPLES = 20  # per operation and generation mode: about 180 cases, some seconds
ROOT = Path(__file__).resolve().parent.parent


def fuzz_from_another_process(url: str, examples: int) -> dict:
    """bench.http_fuzz.fuzz against url, run by a plain Python process. Under pytest, each schemathesis module
    fuzz() imports first is rewritten through ast.parse while the server's threads run, and CPython 3.11 before
    3.11.8 can fail such a parse with "AST constructor recursion depth mismatch" (gh-106905): it did once in a
    clean-clone CI run."""
    code = "import json, sys; from bench.http_fuzz import fuzz; print(json.dumps(fuzz(sys.argv[1], int(sys.argv[2]))))"
    done = subprocess.run([sys.executable, "-c", code, url, str(examples)], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_fuzzing_the_api_breaks_nothing(tiny):
    served = ServedHttp(tiny, ENGINE)
    try:
        report = fuzz_from_another_process(served.url, EXAMPLES)
        assert report["failures"] == [], report["failures"][:3]
        assert report["cases"] > 150 and any(s.endswith(" 200") for s in report["statuses"])
        assert any(s.startswith("POST /v1/chat/completions 4") for s in report["statuses"])
        served.settle()
        done = served.client().completions.create(model="m", prompt="hello", max_tokens=3,
                                                  extra_body={"ignore_eos": True})
        assert done.choices[0].finish_reason == "length"
        served.settle()
    finally:
        served.close()
