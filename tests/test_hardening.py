"""Attacks on the live server: malformed input, private keys, dropped streams, overload (SIGTERM:
tests/test_shutdown.py)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from benchmarks.overload import stream_completion

HI = [{"role": "user", "content": "hi"}]
LONG_PROMPT = "hello " * 600

# (path, raw body, field the error must name, or None when vLLM's own message is enough)
BAD = [
    ("/v1/chat/completions", b"hello", None),
    ("/v1/chat/completions", b'{"model": "toy", "messages": [{"role": "us', None),
    ("/v1/chat/completions", b"\x00\x00\x00\x00\x00", None),  # not text: FastAPI's own format, before
    ("/v1/chat/completions", json.dumps({"model": "toy", "messages": "hi"}), "messages"),
    ("/v1/chat/completions", json.dumps({"model": "toy", "messages": []}), "messages"),
    ("/v1/chat/completions", json.dumps({"model": "nope", "messages": HI}), "model"),
    ("/v1/chat/completions", json.dumps({"model": "toy:teacher", "messages": HI}), "model"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": LONG_PROMPT, "max_tokens": 4}), None),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "max_tokens": 100000}), "max_tokens"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "max_tokens": -1}), "max_tokens"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "n": 100000}), "n"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "temprature": 0.5}), "temprature"),
    ("/v1/chat/completions", json.dumps({"model": "toy", "messages": HI, "gamma": 0.1, "best_of_luck": 1}), "best_of_luck"),
    ("/v1/completions", '{"model": "toy", "prompt": "hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"model": "toy", "prompt": "hi", "temperature": Infinity}', "temperature"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "temperature": "hot"}), "temperature"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "top_p": 1e9}), "top_p"),
    ("/v1/completions", '{"model": "toy", "prompt": "hi", "tau": NaN}', "tau"),
    ("/v1/completions", '{"model": "toy", "prompt": "hi", "gamma": Infinity}', "gamma"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "candidates": "all"}), "candidates"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "generator": None}), "generator"),
    ("/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "structured_outputs": "x"}), "structured_outputs"),
    ("/v1/chat/completions", json.dumps({"model": "toy", "messages": [*HI, {"role": "wizard", "content": "x"}]}),
     "messages[1].role"),
    # vLLM's beam search would drop the name and settings (it searched the default distribution for `:base`)
    ("/v1/completions", json.dumps({"model": "toy:base", "prompt": "hi", "use_beam_search": True, "n": 2}),
     "use_beam_search"),
    ("/v1/chat/completions", json.dumps({"model": "toy", "messages": HI, "use_beam_search": True}), "use_beam_search"),
    ("/v1/chat/completions/batch", json.dumps({"model": "toy", "messages": [HI], "use_beam_search": True}),
     "use_beam_search"),
]

# Every route vLLM serves here that feeds SamplingParams.extra_args (through `vllm_xargs`), with a
# body it answers with 200. (/inference/v1/generate's sampling_params.extra_args is off without
# --enable-scale-out; tests/test_middleware.py covers its body.)
GENERATION_ROUTES = {
    "/v1/chat/completions": {"model": "toy", "messages": HI, "max_tokens": 2},
    "/v1/completions": {"model": "toy", "prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions/batch": {"model": "toy", "messages": [HI, HI], "max_tokens": 2},
    "/v1/responses": {"model": "toy", "input": "hi", "max_output_tokens": 2},
    "/v1/messages": {"model": "toy", "messages": HI, "max_tokens": 2},
    "/invocations": {"model": "toy", "prompt": "hi", "max_tokens": 2},
}
# The keys the engine reads from extra_args, and one it once read (a file to write the counts to).
PRIVATE_KEYS = ["_rlvrx_temperature", "_rlvrx_top_p", "_rlvrx_stats_slot", "_rlvrx_admission", "_rlvrx_stats_file"]
PRIVATE_VALUES = ["hot", -1, 0, 1e300, 10**20, [0, 1], "/dev/null"]


def post(url: str, path: str, body: bytes | str, timeout: float = 60):
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def serves_normally(url: str) -> bool:
    # ignore_eos: a sampled end-of-sequence token would end the answer early without anything being wrong.
    status, body = post(url, "/v1/completions", json.dumps({"model": "toy", "prompt": "hi", "max_tokens": 2,
                                                            "ignore_eos": True}))
    return status == 200 and body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path,body,field", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(live_server, path, body, field):
    url, _, _ = live_server
    status, response = post(url, path, body)
    assert 400 <= status < 500, response
    error = response["error"]
    assert error["message"] and error["type"] and error["code"] == status
    if field is not None:
        assert field in error["message"] or error["param"] in (field, f"body.{field}")
    assert serves_normally(url)


@pytest.mark.parametrize("path", GENERATION_ROUTES)
@pytest.mark.parametrize("key", PRIVATE_KEYS)
def test_private_keys_from_clients_never_reach_the_engine(live_server, path, key):
    """Once, a bad `_rlvrx_temperature` in /v1/responses' vllm_xargs killed the engine."""
    url, _, _ = live_server
    for value in PRIVATE_VALUES:
        status, response = post(url, path, json.dumps({**GENERATION_ROUTES[path], "vllm_xargs": {key: value}}))
        assert status == 200, (value, response)
    assert serves_normally(url)


def test_a_stats_file_named_by_a_client_is_left_alone(live_server, tmp_path):
    url, _, _ = live_server
    target = tmp_path / "victim.bin"
    content = bytes(range(256)) * 4096  # 1 MiB: larger than any slot offset below
    target.write_bytes(content)
    xargs = {"_rlvrx_stats_file": str(target), "_rlvrx_stats_slot": 1, "_rlvrx_admission": "guess", "gamma": 1.0,
             "tau": "inf"}  # extrapolate every position: the counts are written
    for path, body in GENERATION_ROUTES.items():
        # The chat batch route carries no settings (test_routes.py): only the private keys there.
        sent = {k: v for k, v in xargs.items() if k.startswith("_")} if path.endswith("/batch") else xargs
        assert post(url, path, json.dumps({**body, "vllm_xargs": sent}))[0] == 200
    assert target.read_bytes() == content
    assert serves_normally(url)


def scrape_value(url: str, name: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def open_stream(url: str, max_tokens: int, chunks: int) -> socket.socket:
    """Start a streaming completion over a raw socket, read `chunks` events, return the socket."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": "toy", "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while seen.count(b"data: {") < chunks:
        seen += sock.recv(65536)
    return sock


def test_dropped_streams_are_aborted_and_free_their_kv_blocks(live_server):
    url, _, _ = live_server
    assert scrape_value(url, "vllm:num_requests_running") == 0
    sockets = [open_stream(url, 450, chunks=3) for _ in range(8)]
    assert scrape_value(url, "vllm:num_requests_running") > 0
    for sock in sockets:
        sock.close()
    deadline = time.time() + 60
    while scrape_value(url, "vllm:num_requests_running") > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert scrape_value(url, "vllm:num_requests_running") == 0
    assert scrape_value(url, "vllm:kv_cache_usage_perc") == 0
    assert serves_normally(url)


def test_overload_of_mixed_streams_completes_every_request(live_server):
    """Three times more concurrent streams than the batch holds (32), presets and settings mixed."""
    url, _, _ = live_server
    kinds = [{"model": "toy", "gamma": 0.5, "tau": -0.3}, {"model": "toy", "gamma": 1.0, "tau": None, "generator": "rl"},
             {"model": "toy:rl"}, {"model": "toy:base"}, {"model": "toy", "gamma": 0.0, "tau": 0.2, "candidates": 5}]
    payloads = [{**kinds[i % len(kinds)], "prompt": f"request {i % 7}", "max_tokens": 12, "ignore_eos": True,
                 "temperature": 0} for i in range(96)]
    results: list = [None] * len(payloads)

    def run(i):
        try:
            results[i] = stream_completion(url, payloads[i])
        except Exception as exc:  # noqa: BLE001 - counted as an error below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    errors = [r for r in results if not isinstance(r, dict)]
    assert not errors, errors[:3]
    assert all(r["done"] and r["tokens"] == 12 and r["finish_reason"] == "length" for r in results)
    for i in range(len(kinds) * 7):  # each request is what it gives when sent alone
        assert results[i]["text"] == stream_completion(url, payloads[i])["text"]
    assert serves_normally(url)
