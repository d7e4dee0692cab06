"""Schemathesis fuzz of a running server against its own OpenAPI schema.

    python benchmarks/fuzz.py --url http://127.0.0.1:8000 --model demo --examples 2000

Request bodies come from the request schemas that `/openapi.json` publishes for
/v1/chat/completions and /v1/completions, the extrapolation fields included: valid ones
(`positive`) and ones that break the schema (`negative`), sent to the three served names.
Every answer must be a 2xx or an OpenAI-format 4xx — no 5xx (also none inside a stream), no
hang — and /health must answer 200 afterwards. Counts that a valid case could ask for many
tokens (`n`, `max_tokens`, ...) are capped (BOUNDS) so that a case costs a few tokens.
Prints the cases, the answers by status and the fields that 4xx answers named most; exits 1
on a failure.
"""

import argparse
import json
import sys
import time
import urllib.request
from collections import Counter

ROUTES = ("/v1/chat/completions", "/v1/completions")
BOUNDS = {"n": 4, "best_of": 4, "max_tokens": 8, "max_completion_tokens": 8, "min_tokens": 8, "top_logprobs": 5,
          "logprobs": 5, "prompt_logprobs": 5}
TIMEOUT_S = 120  # a case that takes longer counts as a hang


def bound(body) -> None:
    """Cap the counts that make a valid case expensive (in place)."""
    if isinstance(body, dict):
        for key, most in BOUNDS.items():
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > most:
                body[key] = most


def problem(status: int, content_type: str, text: str) -> str | None:
    """What is wrong with an answer, or None: a 5xx, an error that is not in OpenAI's format, or
    a 5xx error event inside a stream."""
    if status >= 500:
        return f"HTTP {status}: {text[:500]}"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
            assert error["message"] and error["type"] and error["code"] == status
        except (ValueError, KeyError, TypeError, AssertionError):
            return f"HTTP {status} not in OpenAI's error format: {text[:500]}"
    elif content_type.startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                code = (json.loads(line[6:]).get("error") or {}).get("code")
                if isinstance(code, int) and code >= 500:
                    return f"error event in a stream: {line[:500]}"
    return None


def fuzz(url: str, model: str, examples: int, mode: str, api_key: str | None = None) -> tuple[Counter, Counter]:
    """Send `examples` generated cases; returns the statuses seen and the `param` of the 4xx answers.
    Raises AssertionError on a failure (after Hypothesis has shrunk it to a small case)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(url + "/openapi.json").include(path=list(ROUTES), method="POST")
    names = st.sampled_from([model, f"{model}:rl", f"{model}:base"])
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    statuses: Counter = Counter()
    params: Counter = Counter()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=GenerationMode(mode)), name=names)
    def send(case, name):
        if isinstance(case.body, dict):
            case.body["model"] = name
        bound(case.body)
        response = case.call(base_url=url, headers=headers, timeout=TIMEOUT_S)
        statuses[response.status_code] += 1
        content_type = (response.headers.get("content-type") or [""])[0]  # schemathesis: lists of values
        found = problem(response.status_code, content_type, response.text)
        assert found is None, f"{found}\nrequest: {case.path} {json.dumps(case.body, default=repr)[:2000]}"
        if response.status_code >= 400:
            params[json.loads(response.text)["error"]["param"]] += 1

    send()
    return statuses, params


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url + "/health", timeout=30).status == 200
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="demo", help="the served name (its :rl and :base presets are used too)")
    parser.add_argument("--examples", type=int, default=1000, help="cases per mode")
    parser.add_argument("--modes", default="positive,negative")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    failed = False
    for mode in args.modes.split(","):
        started = time.perf_counter()
        try:
            statuses, params = fuzz(args.url, args.model, args.examples, mode, args.api_key)
            outcome = "ok"
        except AssertionError as exc:
            statuses, params, outcome, failed = Counter(), Counter(), f"FAILED: {exc}", True
        print(json.dumps({"mode": mode, "cases": sum(statuses.values()), "statuses": dict(sorted(statuses.items())),
                          "refused_fields": dict(params.most_common(8)),
                          "seconds": round(time.perf_counter() - started, 1), "result": outcome}))
    alive = healthy(args.url)
    print(json.dumps({"healthy_afterwards": alive}))
    sys.exit(1 if failed or not alive else 0)


if __name__ == "__main__":
    main()
