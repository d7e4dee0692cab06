"""Cost of the combine step against one decode step and one full sort; the GPU check of the fused kernel.

    python benchmarks/combine_bench.py --device cuda            # GPU: kernel, PyTorch, copy, 7B step
    python benchmarks/combine_bench.py --device cpu             # CPU: PyTorch path vs a decode step
    python benchmarks/combine_bench.py --device cpu --sort-only --threads 1   # CPU: PyTorch path vs a sort
    python benchmarks/combine_bench.py --device cpu --sort-only --threads 1 --baseline edb33a1   # and an older one
    TRITON_INTERPRET=1 python benchmarks/combine_bench.py --device cpu --small --kernel   # smoke run

First it checks the Triton kernel against the PyTorch path on random rows (paper-like and
extreme settings, fp32 and bf16) and exits non-zero on a mismatch. Then, for each
vocabulary and batch size, it times (side by side, same run): the kernel, the unfused
PyTorch path, a device-to-device copy of the same bytes, and one batched decode step of a
random-weight Llama model (7B shape on GPU; a small one on CPU or with --small), and prints
one table; `--out` writes it as JSON.

On CPU it also times the PyTorch path against one full sort of the same rows (`torch.sort` of
[N, V] float32, what a top-p by sorting costs at the least), at the paper setting and at k = 0,
on LM-like rows and on flat ones, for V = 49,152 and 151,936 and N = 1 / 16 / 64 (Δ asked for,
as the engine asks), and prints the combine's cost in full sorts ("sorts"). LM-like rows:
log-probabilities falling with the log of a token's rank at a per-row slope in [1, 2.2] plus
Gaussian noise (σ 0.5), shuffled — at top-p 0.7 they keep a median 5 tokens, 218 at the 90th
percentile (SmolLM2-135M on text: 13 and 205). Flat rows: Gaussian logits of σ 2.5, which keep
about 2% of the vocabulary, and of σ 1 (high temperature, a weak model), which keep about 32%.
`--baseline REV` also times the combine of kernels/ at git revision REV on the same rows, each
repeat running this one, REV's and the sort in turn ("base_sorts"). All are timed in CPU
seconds of this process (`time.process_time`, median of the repeats), so that other work on
the machine counts less; compare figures of one run.

Bytes: `min_MB` is what the step must move at least (read both logit rows once, write the
output once); `frac_copy` is that over the kernel's time, as a fraction of the copy
bandwidth measured in the same run.
"""

import argparse
import importlib
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlvrx.kernels import RowSettings, rule  # noqa: E402

warnings.filterwarnings("ignore", category=RuntimeWarning)  # the Triton interpreter's inf arithmetic


def paper_settings(rows: int, device: str, candidates: int = 50) -> RowSettings:
    return RowSettings.uniform(rows, gamma=0.05, tau=-0.3, generator="base", candidates=candidates, temperature=1.0,
                               top_p=0.7, device=device)


def mixed_settings(rows: int, device: str, seed: int) -> RowSettings:
    g = torch.Generator().manual_seed(seed)
    pick = lambda values: torch.tensor(values)[torch.randint(len(values), (rows,), generator=g)]  # noqa: E731
    return RowSettings(
        gamma=pick([0.0, 0.05, 1.0, 10.0]).float().to(device),
        tau=pick([-math.inf, -0.3, 0.4, math.inf]).float().to(device),
        use_base=pick([0, 1]).bool().to(device),
        candidates=pick([0, 1, 50, 1000]).long().to(device),
        temperature=pick([0.0, 0.7, 1.0, 1.5]).float().to(device),
        top_p=pick([0.05, 0.7, 1.0]).float().to(device),
    )


def random_rows(rows: int, vocab: int, device: str, dtype: torch.dtype, seed: int, kind: str = "flat",
                sigma: float = 2.5):
    """Base logits of the given kind ("flat": Gaussian of σ `sigma`, or "lm", see the module
    docstring) and an RL child of the base plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    if kind == "lm":
        slope = torch.empty(rows, 1).uniform_(1.0, 2.2, generator=g)
        by_rank = -slope * torch.arange(1, vocab + 1).log() + torch.randn(rows, vocab, generator=g) * 0.5
        base = by_rank.gather(1, torch.rand(rows, vocab, generator=g).argsort(dim=-1))
    else:
        base = torch.randn(rows, vocab, generator=g) * sigma
    rl = base + torch.randn(rows, vocab, generator=g) * 0.5
    return rl.to(device=device, dtype=dtype), base.to(device=device, dtype=dtype)


def check_kernel(device: str, vocabs: list[int], rows: int) -> list[dict]:
    """Kernel vs PyTorch path; raises on a mismatch. Returns one record per case."""
    from rlvrx.kernels import triton_combine

    records = []
    for vocab in vocabs:
        for dtype in (torch.float32, torch.bfloat16):
            rl, base = random_rows(rows, vocab, device, dtype, seed=vocab)
            settings = mixed_settings(rows, device, seed=vocab + 1)
            got = triton_combine.combine(rl, base, settings, want_delta=True)
            expected = rule.combine(rl, base, settings, want_delta=True)
            greedy = settings.temperature == 0
            argmax_ok = bool(torch.equal(got.out[greedy].argmax(-1), expected.out[greedy].argmax(-1)))
            q_err = float((got.out[~greedy].exp() - expected.out[~greedy].exp()).abs().max()) if (~greedy).any() else 0.0
            m_err = float((got.prob - expected.prob).abs().max())
            record = {"vocab": vocab, "dtype": str(dtype).split(".")[-1], "rows": rows, "greedy_argmax_equal": argmax_ok,
                      "max_abs_q_error": q_err, "max_abs_M_error": m_err}
            records.append(record)
            print("check", json.dumps(record))
            if not argmax_ok or q_err > 1e-4 or m_err > 1e-4:
                raise SystemExit(f"kernel mismatch: {record}")
    return records


def timed(fn, device: str, repeats: int, clock=time.perf_counter) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up (`clock` on CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = clock()
            fn()
            times.append(clock() - t0)
    return sorted(times)[len(times) // 2]


ROW_KINDS = (("lm", None), ("flat", 2.5), ("flat", 1.0))  # (kind, σ of flat rows)


def against_sort(vocabs: list[int], batches: list[int], repeats: int, baseline=None) -> list[dict]:
    """CPU: the PyTorch combine (Δ asked for) against one full sort of the same rows, at the paper
    setting and at k = 0, on LM-like and flat rows; with `baseline` (another version's `rule`
    module), that version's combine too, timed in turn with this one on the same rows."""
    print(f"{'rows':>9} {'k':>3} {'vocab':>7} {'batch':>5} {'combine_ms':>10} {'sort_ms':>9} {'sorts':>6}"
          + (f" {'base_ms':>9} {'base_sorts':>10}" if baseline else ""))
    records = []
    for kind, sigma in ROW_KINDS:
        for candidates in (50, 0):
            for vocab in vocabs:
                for batch in batches:
                    rl, base = random_rows(batch, vocab, "cpu", torch.float32, seed=batch, kind=kind, sigma=sigma)
                    settings = paper_settings(batch, "cpu", candidates)
                    fns = {"combine": lambda: rule.combine(rl, base, settings, want_delta=True),
                           "sort": lambda: base.sort(dim=-1, descending=True)}
                    if baseline:
                        fns["baseline"] = lambda: baseline.combine(rl, base, settings, want_delta=True)
                    seconds = timed_in_turn(fns, repeats)
                    label = kind if sigma is None else f"flat σ{sigma:g}"
                    record = {"rows": kind, "sigma": sigma, "candidates": candidates, "vocab": vocab, "batch": batch,
                              "combine_ms": seconds["combine"] * 1e3, "sort_ms": seconds["sort"] * 1e3,
                              "combine_over_sort": seconds["combine"] / seconds["sort"]}
                    line = (f"{label:>9} {candidates:>3} {vocab:>7} {batch:>5} {record['combine_ms']:>10.2f} "
                            f"{record['sort_ms']:>9.2f} {record['combine_over_sort']:>6.3f}")
                    if baseline:
                        record.update(baseline_ms=seconds["baseline"] * 1e3,
                                      baseline_over_sort=seconds["baseline"] / seconds["sort"])
                        line += f" {record['baseline_ms']:>9.2f} {record['baseline_over_sort']:>10.3f}"
                    records.append(record)
                    print(line, flush=True)
    return records


def timed_in_turn(fns: dict, repeats: int) -> dict:
    """Median CPU seconds (`time.process_time`) of each function, run in turn `repeats` times after
    one warm-up each, so that a slow spell of the machine weighs on all of them alike; each turn
    starts one function further on, so that none always runs after the same one (whose memory
    the allocator has just handed back)."""
    times = {name: [] for name in fns}
    names = list(fns)
    for fn in fns.values():
        fn()
    for turn in range(repeats):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            t0 = time.process_time()
            fns[name]()
            times[name].append(time.process_time() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def load_baseline(rev: str):
    """The `rule` module of the repository's kernels/ at git revision `rev`, imported under another
    package name (rlvrx_baseline) so that it runs beside this one."""
    root = Path(__file__).resolve().parent.parent
    target = Path(tempfile.mkdtemp(prefix="combine_baseline_")) / "rlvrx_baseline" / "kernels"
    target.mkdir(parents=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "kernels/"], cwd=root, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=root, check=True, capture_output=True,
                                  text=True).stdout
            (target / Path(name).name).write_text(text.replace("rlvrx.kernels", "rlvrx_baseline.kernels"))
    sys.path.insert(0, str(target.parent.parent))
    return importlib.import_module("rlvrx_baseline.kernels.rule")


def decode_step_seconds(device: str, batch: int, shape: dict, repeats: int) -> float:
    """One batched decode step of a random-weight Llama (bf16 on GPU, fp32 on CPU) with a static cache."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(**shape)
    model = decode_step_seconds.models.get((device, str(shape)))
    if model is None:
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
        decode_step_seconds.models = {(device, str(shape)): model}
    prompt = 32
    cache = StaticCache(config=config, max_cache_len=prompt + repeats + 4)
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device=device)
    with torch.inference_mode():
        model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device=device), use_cache=True)
        position = [prompt]

        def step():
            pos = torch.tensor([position[0]], device=device)
            model(ids[:, :1], past_key_values=cache, cache_position=pos, use_cache=True)
            position[0] += 1

        return timed(step, device, repeats)


decode_step_seconds.models = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run (e.g. under TRITON_INTERPRET=1)")
    parser.add_argument("--kernel", action="store_true", help="on CPU, also run the Triton kernel (needs TRITON_INTERPRET=1)")
    parser.add_argument("--sort-only", action="store_true", help="CPU: only the table against a full sort")
    parser.add_argument("--threads", type=int, help="torch CPU threads (the vLLM CPU worker uses 1)")
    parser.add_argument("--baseline", metavar="REV", help="CPU: also time the combine of kernels/ at this git revision")
    parser.add_argument("--repeats", type=int, help="timed runs per figure, their median taken (default: 10 on GPU, "
                        "3 on CPU, 5 against a sort)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    use_kernel = device == "cuda" or args.kernel
    if args.small:
        vocabs, batches, repeats = [1000], [1, 4], 2
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=1000)
    elif device == "cuda":
        vocabs, batches, repeats = [32000, 152064], [1, 4, 16, 64, 256], 10
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)
    else:
        vocabs, batches, repeats = [32000, 152064], [1, 4, 16], 3
        shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152)  # SmolLM2-135M's shape

    repeats = args.repeats or repeats
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model_shape": shape,
               "baseline": args.baseline,
               "check": check_kernel(device, vocabs[:1] if args.small else vocabs, 8 if args.small else 32)
               if use_kernel else [], "rows": [], "vs_sort": []}
    if device == "cpu":
        sort_vocabs, sort_batches = (vocabs, batches) if args.small else ([49152, 151936], [1, 16, 64])
        baseline = load_baseline(args.baseline) if args.baseline else None
        results["vs_sort"] = against_sort(sort_vocabs, sort_batches, args.repeats or max(repeats, 5), baseline)
    if args.sort_only:
        write_json(results, args.out)
        return
    header = f"{'vocab':>7} {'batch':>5} {'torch_ms':>9} {'kernel_ms':>9} {'copy_ms':>8} {'min_MB':>8} " \
             f"{'kern_GB/s':>9} {'frac_copy':>9} {'decode_ms':>9} {'share':>7}"
    print(header)
    for vocab in vocabs:
        for batch in batches:
            rl, base = random_rows(batch, vocab, device, torch.float32, seed=batch)
            settings = paper_settings(batch, device)
            torch_s = timed(lambda: rule.combine(rl, base, settings), device, repeats)
            kernel_s = copy_s = None
            min_bytes = batch * vocab * (4 + 4 + 4)
            if use_kernel:
                from rlvrx.kernels import triton_combine

                out = torch.empty_like(rl)
                kernel_s = timed(lambda: triton_combine.combine(rl, base, settings, out=out), device, repeats)
                src = torch.empty(min_bytes // 4, device=device)
                dst = torch.empty_like(src)
                copy_s = timed(lambda: dst.copy_(src), device, repeats)
            decode_s = decode_step_seconds(device, batch, shape, repeats)
            combine_s = kernel_s if kernel_s is not None else torch_s
            row = {"vocab": vocab, "batch": batch, "torch_ms": torch_s * 1e3,
                   "kernel_ms": kernel_s * 1e3 if kernel_s else None, "copy_ms": copy_s * 1e3 if copy_s else None,
                   "min_MB": min_bytes / 1e6,
                   "kernel_GBps": min_bytes / kernel_s / 1e9 if kernel_s else None,
                   "frac_of_copy": (copy_s / kernel_s) if kernel_s else None,
                   "decode_ms": decode_s * 1e3, "combine_share_of_step": combine_s / decode_s}
            results["rows"].append(row)
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            print(f"{vocab:>7} {batch:>5} {row['torch_ms']:>9.3f} {fmt(row['kernel_ms'], '>9.3f')} "
                  f"{fmt(row['copy_ms'], '>8.3f')} {row['min_MB']:>8.2f} {fmt(row['kernel_GBps'], '>9.1f')} "
                  f"{fmt(row['frac_of_copy'], '>9.3f')} {row['decode_ms']:>9.3f} {row['combine_share_of_step']:>7.3f}")
    write_json(results, args.out)


def write_json(results: dict, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
