"""Several LoRA adapters over one base in one stacked engine, chosen per request.

Three adapters of one base (different ranks, targets and seeds; one leaves some projections alone)
serve, in ONE batch, requests of each adapter, their presets, a base stream that is another adapter
(`base_adapter`: Δ = log π_b − log π_a) and a scaled delta (`lora_scale`: W + 1.5·s·B·A), each
against its float64 reference: PEFT's merge of each adapter (and of the adapter with B scaled by 1.5),
greedy tokens and sampled log q. Eager with prefix caching on — a later batch sends the same long
prompt under other adapters and scales, which must not reuse the first's KV blocks, while the same
adapter again does — and compiled under tensor parallelism 2. Prompt scoring (prompt_logprobs) too:
each adapter's presets, a base_adapter's `:base`, a scaled `:rl` and extrapolated rows with a base
adapter or a scale score the prompt with their own models. `rlvrx serve --lora-modules` lists the
names with the base as parent, serves each, and answers bad names and scales with a 400. With runtime
loading on, adapters load and unload through vLLM's routes (checks, slots, in-flight requests, a name
loaded again). Bad sets of adapters are refused at start-up in one line.
"""

import math
import shutil
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from rlvrx.kernels import reference as ref
from rlvrx.server.toy_pair import build_lora_child, merge_adapter
from tests import engine_checks as checks
from tests.conftest import ROOT, child_env, next_logits, ref_settings, run_engine, start_server, stop_server

ADAPTERS = {  # name: LoRA options
    "a": {"rank": 4, "seed": 11},
    "b": {"rank": 8, "seed": 12, "alpha": 4.0},
    "c": {"rank": 2, "seed": 13, "target_modules": ["q_proj", "v_proj", "down_proj"]},
}
SCALE = 1.5
LONG_PROMPT = np.random.default_rng(5).integers(3, 380, size=300).tolist()
GREEDY = (0.5, -0.3, "base", 0)  # extrapolation settings of the greedy requests
SAMPLED = (0.3, None, "rl", 20, 0.9, 0.9)  # (gamma, tau, generator, k, temperature, top_p)
TP = {"tensor_parallel_size": 2, "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}}


def scaled_adapter(adapter, factor: float, out):
    """A copy of the adapter with every lora_B multiplied by `factor`: PEFT's W + factor·s·B·A."""
    shutil.copytree(adapter, out)
    tensors = load_file(out / "adapter_model.safetensors")
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, out / "adapter_model.safetensors")
    return out


@pytest.fixture(scope="module")
def adapters(toy_pairs, tmp_path_factory):
    """(base, {name: adapter}, {name: merged}, merged of b at SCALE)."""
    root = tmp_path_factory.mktemp("adapters")
    base = toy_pairs["qwen2"][0]
    built = {name: build_lora_child(base, root / name, **options) for name, options in ADAPTERS.items()}
    scaled = merge_adapter(base, scaled_adapter(built["b"][0], SCALE, root / "b-scaled"), root / "b-scaled-merged")
    return base, {n: a for n, (a, _) in built.items()}, {n: m for n, (_, m) in built.items()}, scaled


@pytest.fixture(scope="module")
def models(adapters):
    """Float64 references: "base", each adapter's merge, and "b*1.5"."""
    base, _, merged, scaled = adapters
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()  # noqa: E731
    return {"base": load(base), **{name: load(path) for name, path in merged.items()}, f"b*{SCALE}": load(scaled)}


def xargs(adapter: str, **extra) -> dict:
    return {"adapter": adapter, **checks.xargs(*GREEDY), **extra}


# (request extra_args, RL reference, base reference, kind): kind "q" greedy extrapolation,
# "rl"/"base" a preset (that model alone, greedy), "sampled" log q along a sampled path.
CASES = [
    (xargs("a"), "a", "base", "q"),
    (xargs("b"), "b", "base", "q"),
    (xargs("c"), "c", "base", "q"),
    (xargs("c", preset="rl"), "c", "base", "rl"),
    (xargs("b", preset="base"), "b", "base", "base"),
    (xargs("b", base_adapter="a"), "b", "a", "q"),
    (xargs("a", base_adapter="c", preset="base"), "a", "c", "base"),
    (xargs("b", lora_scale=SCALE), f"b*{SCALE}", "base", "q"),
    (xargs("b", lora_scale=SCALE, preset="rl"), f"b*{SCALE}", "base", "rl"),
    (xargs("b", lora_scale=SCALE, base_adapter="b"), f"b*{SCALE}", "b", "q"),
    ({**xargs("c"), **checks.xargs(*SAMPLED[:4])}, "c", "base", "sampled"),
    ({**xargs("a", base_adapter="b"), **checks.xargs(*SAMPLED[:4])}, "a", "b", "sampled"),
]


# Prompt scoring (prompt_logprobs) per adapter, base stream and scale:
# (extra_args, temperature, top_p, RL reference, base reference, what is scored, reference settings).
SCORING = [
    ({"adapter": "a", "preset": "rl"}, 0.8, 0.9, "a", "base", "rl", None),
    ({"adapter": "b", "preset": "base", "base_adapter": "a"}, 0.0, 1.0, "b", "a", "base", None),
    ({"adapter": "b", "preset": "rl", "lora_scale": SCALE}, 1.0, 1.0, f"b*{SCALE}", "base", "rl", None),
    ({"adapter": "c", "preset": "base"}, 1.0, 1.0, "c", "base", "base", None),
    ({**checks.SCORED["sampled"][0], "adapter": "c", "base_adapter": "b"}, *checks.SCORED["sampled"][1:3],
     "c", "b", "extrapolate", checks.SCORED["sampled"][3]),
    ({**checks.SCORED["greedy"][0], "adapter": "b", "lora_scale": SCALE}, *checks.SCORED["greedy"][1:3],
     f"b*{SCALE}", "base", "extrapolate", checks.SCORED["greedy"][3]),
]


def scoring_batch() -> list[dict]:
    """The SCORING requests, beside two generating ones of other adapters and streams."""
    generating = [request(i, CASES[i][0], CASES[i][3]) for i in (5, 7)]
    return generating + [{"prompt_ids": checks.SCORED_PROMPT, "params": {
        "temperature": t, "top_p": p, "max_tokens": 1, "prompt_logprobs": checks.SCORED_TOP, "extra_args": extra}}
        for extra, t, p, *_ in SCORING]


def check_scoring(results, models) -> None:
    for i, got in zip((5, 7), results):
        assert got[0]["token_ids"] == expected_greedy(models, CASES[i], checks.PROMPTS[i % 3]), CASES[i]
    for (extra, _, _, rl, base, scored, s), got in zip(SCORING, results[2:], strict=True):
        want = checks.reference_scores((models[rl], models[base]), checks.SCORED_PROMPT, scored, s)
        checks.check_scores(got[0]["prompt_logprobs"], want)


def request(i: int, extra: dict, kind: str, prompt=None) -> dict:
    prompt = prompt or checks.PROMPTS[i % 3]
    if kind == "sampled":
        params = checks.sampled(*SAMPLED[4:], seed=100 + i, extra=extra)
    else:
        params = checks.greedy(extra)
    return {"prompt_ids": prompt, "params": params}


def batches() -> list[list[dict]]:
    """All cases in one batch; then the long prompt under adapter a; then, later, the same prompt
    under other adapters and scales, and under a again (a prefix-cache hit); then prompt scoring."""
    mixed = [request(i, extra, kind) for i, (extra, _, _, kind) in enumerate(CASES)]
    long_cases = [CASES[0], CASES[1], CASES[5], CASES[7], CASES[0]]
    long = [request(0, extra, kind, LONG_PROMPT) for extra, _, _, kind in long_cases]
    return [mixed, long[:1], long[1:], scoring_batch()]


def expected_greedy(models, case, prompt) -> list[int]:
    _, rl, base, kind = case
    pair = (models[rl], models[base])
    if kind == "q":
        return checks.reference_greedy(pair, prompt, ref_settings(*GREEDY))
    alone = models[rl] if kind == "rl" else models[base]
    return checks.reference_greedy((alone, alone), prompt, ref_settings(0.0, -math.inf, "rl", 0))


def check_run(results, models) -> None:
    mixed, first_long, later_long, scoring = results
    check_scoring(scoring, models)
    for i, (case, got) in enumerate(zip(CASES, mixed)):
        prompt = checks.PROMPTS[i % 3]
        if case[3] != "sampled":
            assert got[0]["token_ids"] == expected_greedy(models, case, prompt), case
            continue
        ids, s = list(prompt), ref_settings(*SAMPLED)
        for token, lps in zip(got[0]["token_ids"], got[0]["logprobs"]):
            a, b = next_logits((models[case[1]], models[case[2]]), ids)
            q = ref.two_stage_distribution(a, b, s)
            assert lps[str(token)] == pytest.approx(math.log(q[token]), abs=2e-3), case
            ids.append(token)
    long_cases = [CASES[0], CASES[1], CASES[5], CASES[7], CASES[0]]
    for case, got in zip(long_cases, first_long + later_long):
        assert got[0]["token_ids"] == expected_greedy(models, case, LONG_PROMPT), case


@pytest.fixture(scope="module")
def runs(adapters, tmp_path_factory) -> dict:
    base, paths, _, _ = adapters
    tmp = tmp_path_factory.mktemp("engine")
    spec = {"base": str(base), "adapters": {n: str(p) for n, p in paths.items()}, "batches": batches()}
    single = [request(i, extra, kind) for i, (extra, _, _, kind) in enumerate(CASES) if i in SINGLE]
    return {"eager": run_engine({**spec, "prefix_caching": True}, tmp),
            "compiled-tp2": run_engine({**spec, "eager": False, **TP}, tmp),
            "single": run_engine({"base": str(base), "adapters": {"b": str(paths["b"])}, "batches": [single],
                                  "eager": False}, tmp)}


# The cases one adapter (b) serves alone, in one batch: extrapolated and :rl at scales 1 and 1.5.
SINGLE = (1, 7, 8)


def test_one_adapter_scales_each_row_inside_the_compiled_graph(runs, models):
    for i, got in zip(SINGLE, runs["single"][0]):
        assert got[0]["token_ids"] == expected_greedy(models, CASES[i], checks.PROMPTS[i % 3]), CASES[i]


def test_each_row_gets_its_adapter_scale_and_base_stream_in_one_batch(runs, models):
    check_run(runs["eager"]["results"], models)


def test_prefix_caching_keeps_adapters_and_scales_apart(runs, models):
    """The long prompt's blocks were found in the cache (by the same adapter), and the other adapters
    and scales got their own reference output (checked in check_run)."""
    assert runs["eager"]["prefix_cache_hits"] >= 256
    check_run(runs["eager"]["results"], models)


def test_compiled_tensor_parallel_serves_what_eager_serves(runs, models):
    check_run(runs["compiled-tp2"], models)


@pytest.fixture(scope="module")
def adapters_server(adapters, tmp_path_factory):
    base, paths, _, _ = adapters
    modules = [f"{name}={path}" for name, path in paths.items()]
    proc, url = start_server(None, tmp_path_factory.mktemp("server") / "server.log",
                             extra_args=("--base", str(base), "--lora-modules", *modules))
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), paths, base
    stop_server(proc)


def test_served_adapters_are_listed_and_each_serves_its_reference(adapters_server, models):
    client, paths, base = adapters_server
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {f"{n}{s}" for n in ADAPTERS for s in ("", ":rl", ":base")}
    assert all(getattr(cards[n], "parent", None) == str(base) for n in cards)
    assert getattr(cards["b"], "root", None) == str(paths["b"].resolve())
    prompt = checks.PROMPTS[1]
    for case in (CASES[1], CASES[3], CASES[5], CASES[8]):
        extra, _, _, kind = case
        name = extra["adapter"] + {"q": "", "rl": ":rl", "base": ":base"}[kind]
        fields = {k: extra[k] for k in ("base_adapter", "lora_scale") if k in extra}
        out = client.completions.create(model=name, prompt=prompt, max_tokens=checks.MAX_TOKENS, temperature=0.0,
                                        extra_body={"gamma": GREEDY[0], "tau": GREEDY[1], "generator": GREEDY[2],
                                                    "candidates": GREEDY[3], "ignore_eos": True,
                                                    "return_token_ids": True, **fields})
        assert out.model == name
        assert out.choices[0].token_ids == expected_greedy(models, case, prompt), case


@pytest.mark.parametrize("fields,param", [({"base_adapter": "zzz"}, "base_adapter"),
                                          ({"lora_scale": 11}, "lora_scale"),
                                          ({"lora_scale": "big"}, "lora_scale")])
def test_bad_adapter_fields_get_a_400_naming_the_field(adapters_server, fields, param):
    client = adapters_server[0]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt="hi", max_tokens=2, extra_body=fields)
    assert err.value.body["param"] == param


@pytest.fixture(scope="module")
def runtime_server(adapters, tmp_path_factory):
    """Runtime loading on: adapter a at start-up, room for three of rank ≤ 8."""
    base, paths, _, _ = adapters
    big = build_lora_child(base, tmp_path_factory.mktemp("rank16") / "d", rank=16, seed=14)[0]
    proc, url = start_server(None, tmp_path_factory.mktemp("server") / "server.log",
                             extra_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"},
                             extra_args=("--base", str(base), "--lora-modules", f"a={paths['a']}",
                                         "--max-loras", "3", "--max-lora-rank", "8"))
    yield url, paths, big, tmp_path_factory.mktemp("runtime")
    stop_server(proc)


def greedy_tokens(client, model: str, prompt: list[int], max_tokens: int = checks.MAX_TOKENS) -> list[int]:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                    extra_body={"gamma": GREEDY[0], "tau": GREEDY[1], "generator": GREEDY[2],
                                                "candidates": GREEDY[3], "ignore_eos": True, "return_token_ids": True})
    return out.choices[0].token_ids


def test_adapters_load_and_unload_at_run_time(runtime_server, models):
    url, paths, big, runtime_dir = runtime_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    post = lambda route, body: httpx.post(url + route, json=body, timeout=300)  # noqa: E731
    load = lambda name, path: post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})  # noqa: E731
    assert load("b", paths["b"]).status_code == 200
    assert load("c", paths["c"]).status_code == 200
    assert {m.id for m in client.models.list().data} == {f"{n}{s}" for n in "abc" for s in ("", ":rl", ":base")}
    for name in "abc":
        case = next(c for c in CASES if c[0]["adapter"] == name and c[3] == "q" and len(c[0]) == 5)
        assert greedy_tokens(client, name, LONG_PROMPT) == expected_greedy(models, case, LONG_PROMPT), name
    refused = {"slots": load("d", paths["a"]), "rank": load("e", big), "name": load("b", paths["b"]),
               "path": load("f", paths["a"].parent)}
    assert all(r.status_code == 400 for r in refused.values()), {k: r.text for k, r in refused.items()}
    assert refused["slots"].json()["error"]["param"] == "lora_name"
    assert refused["rank"].json()["error"]["param"] == "lora_path"
    assert post("/v1/unload_lora_adapter", {"lora_name": "a"}).status_code == 400  # the default stays
    assert post("/v1/unload_lora_adapter", {"lora_name": "zzz"}).status_code == 404

    # A request in flight with c finishes before c is unloaded (the unload returns after its last
    # token); then c is gone, and c loaded again from another adapter serves that one (the KV the
    # prefix cache holds for the old c is not reused).
    started, streamed = threading.Event(), {}

    def stream():
        chunks = client.completions.create(model="c", prompt=checks.PROMPTS[0], max_tokens=400, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True})
        reasons = []
        for chunk in chunks:
            started.set()
            reasons += [c.finish_reason for c in chunk.choices]
        streamed.update(reason=reasons[-1], ended=time.monotonic())

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60)
    unloaded = post("/v1/unload_lora_adapter", {"lora_name": "c"})
    returned = time.monotonic()
    thread.join(60)
    assert unloaded.status_code == 200, unloaded.text
    assert streamed["reason"] == "length" and streamed["ended"] <= returned + 0.5
    with pytest.raises(openai.NotFoundError):
        greedy_tokens(client, "c", LONG_PROMPT)
    # b's weights with a generation config of its own: the new c's defaults, not those of the old c
    # (requested above, which had none)
    b_with_defaults = shutil.copytree(paths["b"], runtime_dir / "b-with-defaults")
    (b_with_defaults / "generation_config.json").write_text('{"max_new_tokens": 3}')
    assert load("c", b_with_defaults).status_code == 200
    b_case = next(c for c in CASES if c[0]["adapter"] == "b" and c[3] == "q" and len(c[0]) == 5)
    assert greedy_tokens(client, "c", LONG_PROMPT) == expected_greedy(models, b_case, LONG_PROMPT)
    chat = client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}],
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3


def serve_refusal(*args: str) -> str:
    """The line `rlvrx serve` ends with (exit code 2, before vLLM starts; alone, or after argparse's usage)."""
    proc = subprocess.run([sys.executable, "-m", "rlvrx.server.cli", "serve", *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    if lines[-1].startswith("rlvrx serve: error: "):  # argparse's own: its usage, then the line
        return lines[-1]
    assert len(lines) == 1 and lines[0].startswith("rlvrx: error: "), proc.stderr[-3000:]
    return lines[0]


def test_serve_refuses_bad_adapter_sets_in_one_line(adapters, tmp_path):
    base, paths, merged, _ = adapters
    own = build_lora_child(base, tmp_path / "own", seed=15, modules_to_save=["norm"])[0]
    a, b = f"a={paths['a']}", f"b={paths['b']}"
    cases = {
        "either --rl": ("--base", str(base), "--rl", str(paths["a"]), "--lora-modules", a),
        "same name": ("--base", str(base), "--lora-modules", a, f"a={paths['b']}"),
        "own name": ("--base", str(base), "--lora-modules", a, b, "--served-model-name", "x"),
        "NAME=PATH": ("--base", str(base), "--lora-modules", "a:rl=" + str(paths["a"])),
        "several adapters cannot share": ("--base", str(base), "--lora-modules", a, f"own={own}"),
        "no adapter_config.json": ("--base", str(base), "--lora-modules", a, f"m={merged['b']}"),
    }
    for expected, args in cases.items():
        assert expected in serve_refusal(*args), expected


def test_rows_are_grouped_by_adapter_and_scale():
    """Runs of requests that share a stream's adapter and scale join one range; base streams without
    an adapter add nothing; a pass larger than the plan (padding) keeps the base half's offset."""
    from rlvrx.server.engine.adapter_rows import AdapterRows, grouped

    streams = [((0, 1.0), None), ((0, 1.0), None), ((1, 1.0), (0, 1.0)), ((0, 1.5), None), ((0, 1.0), None)]
    counts = np.array([3, 1, 2, 1, 4])
    groups = {(g.stream, g.slot, g.scale): g.ranges for g in grouped(streams, counts)}
    assert groups == {(0, 0, 1.0): ((0, 4), (7, 11)), (0, 1, 1.0): ((4, 6),), (1, 0, 1.0): ((4, 6),),
                      (0, 0, 1.5): ((6, 7),)}
    rows = AdapterRows()
    assert rows.rows(8, torch.device("cpu")) == [(0, 1.0, slice(0, 4))]  # no plan: a warm-up pass
    rows.tokens, rows.groups = 11, grouped(streams, counts)
    (slot, scale, index), *others = rows.rows(2 * 12, torch.device("cpu"))  # padded to 12 tokens
    assert (slot, scale, index.tolist()) == (0, 1.0, [0, 1, 2, 3, 7, 8, 9, 10])
    assert others == [(1, 1.0, slice(4, 6)), (0, 1.0, slice(16, 18)), (0, 1.5, slice(6, 7))]  # base half at 12


def test_adapter_settings_are_checked_against_the_served_adapters():
    from rlvrx.server.engine import settings as s

    served = s.ServedAdapters(("a", "b"), scalable=True, base_streams=True)
    assert s.check_adapters(s.Extrapolation(), served).adapter == "a"
    assert s.check_adapters(s.Extrapolation(adapter="b", base_adapter="a"), served).base_adapter == "a"
    for found, field in ((s.Extrapolation(base_adapter="z"), "base_adapter"), (s.Extrapolation(adapter="z"), "model")):
        with pytest.raises(s.SettingsError) as err:
            s.check_adapters(found, served)
        assert err.value.field == field
    with pytest.raises(s.SettingsError) as err:  # an adapter with its own embeddings cannot be scaled
        s.check_adapters(s.Extrapolation(lora_scale=2.0), s.ServedAdapters(("a",), scalable=False))
    assert err.value.field == "lora_scale"
    with pytest.raises(s.SettingsError) as err:  # one adapter: no other adapter for the base stream
        s.check_adapters(s.Extrapolation(base_adapter="a"), s.ServedAdapters(("a",), scalable=True))
    assert err.value.field == "base_adapter"
    with pytest.raises(s.SettingsError):  # two full checkpoints have no adapters
        s.check_adapters(s.Extrapolation(base_adapter="a"), s.ServedAdapters())
    with pytest.raises(s.SettingsError) as err:
        s.parse({"lora_scale": -1})
    assert err.value.field == "lora_scale"
    key = served.cache_key
    assert key(s.Extrapolation(adapter="a")) != key(s.Extrapolation(adapter="a", lora_scale=1.5))
    assert key(s.Extrapolation(adapter="a")) != s.ServedAdapters(("a",), True, keys={"a": "a#1"}).cache_key(
        s.Extrapolation(adapter="a"))
