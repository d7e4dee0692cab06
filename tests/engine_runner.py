"""Run one offline vLLM engine in a fresh process and print its generations as JSON.

Tests start several engines (the pair, the RL model alone, the base model alone); each
gets its own process so that vLLM's per-process state never leaks between them.

Usage: python tests/engine_runner.py SPEC.json  →  JSON on the last line of stdout.
SPEC: {"pair": [rl, base]}, {"base": path, "adapters": {name: adapter directory}} or {"model": path}, and "batches": a list of lists of
requests {"prompt_ids": [...], "params": {SamplingParams fields}}; each inner list is
submitted in one `generate` call; a request with "prompt_embeds_file" (a torch.save'd
[n, hidden] tensor) in place of "prompt_ids" gives its prompt as embeddings. Optional: "eager"
(default true; false compiles the model), "tensor_parallel_size" (default 1),
"max_num_batched_tokens" (a prompt longer than it is prefilled in chunks), "prompt_embeds"
(default false: vLLM's enable_prompt_embeds), "speculative_config" (vLLM's, e.g. ngram, plus the server's
"disable_by_batch_size", server.engine.draft_gate), "env" (variables set before vLLM is imported).
A request with `prompt_logprobs` gets them in its result, position 0 (which has none) left out.
With a speculative config the last line is {"results": ..., "spec": {draft and accepted token counts}}; with
"prefix_caching" (default false) {"results": ..., "prefix_cache_hits": tokens found in the cache}.
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def with_int_keys(params: dict) -> dict:
    """JSON turned logit_bias's token ids into strings; vLLM wants ints."""
    if params.get("logit_bias"):
        params = {**params, "logit_bias": {int(k): v for k, v in params["logit_bias"].items()}}
    return params


def as_json(position: dict) -> dict:
    """One position's logprobs, {token id (a string): logprob}."""
    return {str(t): lp.logprob for t, lp in position.items()}


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    os.environ.update(spec.get("env", {}))
    # vLLM's processes log to stdout, tensor-parallel workers even after the results are
    # printed: they (which inherit fd 1) log to stderr, and stdout carries the results alone.
    results_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    from rlvrx.server.engine import draft_gate
    from rlvrx.server.engine.pair import engine_kwargs

    if "pair" in spec:
        kwargs = engine_kwargs(*spec["pair"])
    elif "adapters" in spec:
        kwargs = engine_kwargs(None, spec["base"], spec["adapters"])
    else:
        kwargs = {"model": spec["model"], "logprobs_mode": "processed_logprobs"}
    speculative_config = draft_gate.apply(spec.get("speculative_config"), kwargs.setdefault("hf_overrides", {}))
    llm = LLM(**kwargs, dtype="float32", enforce_eager=spec.get("eager", True), max_model_len=512, seed=0,
              enable_prefix_caching=spec.get("prefix_caching", False),
              tensor_parallel_size=spec.get("tensor_parallel_size", 1),
              max_num_batched_tokens=spec.get("max_num_batched_tokens"),
              enable_prompt_embeds=spec.get("prompt_embeds", False),
              speculative_config=speculative_config,
              disable_log_stats=not (spec.get("speculative_config") or spec.get("prefix_caching")))
    results = []
    for batch in spec["batches"]:
        prompts = [EmbedsPrompt(prompt_embeds=torch.load(r["prompt_embeds_file"])) if "prompt_embeds_file" in r
                   else TokensPrompt(prompt_token_ids=r["prompt_ids"]) for r in batch]
        params = [SamplingParams(**with_int_keys(r["params"])) for r in batch]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        results.append([
            [
                {
                    "token_ids": list(c.token_ids),
                    "logprobs": [as_json(pos) for pos in (c.logprobs or [])],
                    **({"prompt_logprobs": [as_json(pos) for pos in out.prompt_logprobs[1:]]}
                       if out.prompt_logprobs is not None else {}),
                }
                for c in out.outputs
            ]
            for out in outputs
        ])
    if spec.get("speculative_config"):
        counters = {m.name: getattr(m, "value", None) or getattr(m, "values", None) for m in llm.get_metrics()
                    if m.name.startswith("vllm:spec_decode_num")}
        results = {"results": results, "spec": counters}
    elif spec.get("prefix_caching"):
        hits = sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")
        results = {"results": results, "prefix_cache_hits": hits}
    print("\n" + json.dumps(results), file=results_out, flush=True)


if __name__ == "__main__":
    main()
