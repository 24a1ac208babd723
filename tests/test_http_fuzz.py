"""A bounded schemathesis run over the HTTP server's own OpenAPI schema (bench/http_fuzz.py has the checks and
the longer run): whatever it sends, in the schema and deliberately outside it, no answer is a 500, every answer
is what the schema documents, the server keeps serving, and no block leaks."""
from __future__ import annotations

from bench.http_fuzz import ENGINE, fuzz

from server_helpers import ServedHttp

EXAMPLES = 20  # per operation and generation mode: about 180 cases, some seconds


def test_fuzzing_the_api_breaks_nothing(tiny):
    served = ServedHttp(tiny, ENGINE)
    try:
        report = fuzz(served.url, EXAMPLES)
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
