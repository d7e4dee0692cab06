"""Command line: `rlvrx serve` (the OpenAI server for a pair), `rlvrx eval` (accuracy of an
endpoint), `rlvrx demo` (build a pair), `rlvrx lora-extract` (a full RL checkpoint as a LoRA
adapter of its base, tools/lora_extract.py).

`rlvrx serve --rl PATH --base PATH [--gamma G --tau T --generator base|rl --candidates K]
[any vLLM serve flag]` checks the pair, then starts vLLM's OpenAI server with the
wrapper architecture, the extrapolating logits processor, processed logprobs, our
middleware, and three served names: `<name>`, `<name>:rl`, `<name>:base`. With
`--lora-modules NAME=ADAPTER ...` in place of `--rl`, each adapter of the base gets its three.
"""

import argparse
import atexit
import errno
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

from rlvrx.server.engine import draft_gate
from rlvrx.server.engine import settings as settings_mod
from rlvrx.server.engine import startup_error
from rlvrx.server.engine.pair import PairError, check_serving_flags, engine_kwargs

# Outermost last: a draining server refuses before anything else looks at the request.
MIDDLEWARE = ("rlvrx.server.api.middleware.ExtrapolationMiddleware", "rlvrx.server.api.drain.DrainMiddleware")
DEFAULT_SHUTDOWN_TIMEOUT = 120  # seconds


def tau_arg(text: str) -> float:
    return settings_mod.parse_tau(None if text.lower() in ("none", "null") else _maybe_number(text))


def _maybe_number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def our_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlvrx", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", allow_abbrev=False, help="serve a base/RL pair through the OpenAI API (other flags go to vLLM)")
    serve.add_argument("--rl", help="path of the RLVR-trained checkpoint, or of its LoRA adapter directory (its "
                                    "tokenizer and chat template are used)")
    serve.add_argument("--lora-modules", nargs="+", type=lora_module_arg, metavar="NAME=ADAPTER",
                       help="several LoRA adapters of --base, each served as NAME, NAME:rl and NAME:base (vLLM's "
                            "convention; also '{\"name\": ..., \"path\": ...}'); the first is the default")
    serve.add_argument("--max-loras", type=int, default=0,
                       help="with VLLM_ALLOW_RUNTIME_LORA_UPDATING: adapters the stacked engine can hold (default: "
                            "those given at start-up)")
    serve.add_argument("--max-lora-rank", type=int, default=0,
                       help="with VLLM_ALLOW_RUNTIME_LORA_UPDATING: the largest rank of an adapter loaded at run time "
                            "(default: 16, or the largest given)")
    serve.add_argument("--base", required=True, help="path of the base checkpoint")
    defaults = settings_mod.Extrapolation()
    serve.add_argument("--gamma", type=float, default=defaults.gamma, help="default extrapolation strength γ")
    serve.add_argument("--tau", type=str, default=str(defaults.tau), help="default threshold τ; 'null' = always, '-inf' = never")
    serve.add_argument("--generator", default=defaults.generator, help="default proposer: base or rl")
    serve.add_argument("--candidates", type=int, default=defaults.candidates, help="default top-k of the extrapolated draw; 0 = all")
    serve.add_argument("--protect-metrics", action="store_true", help="require the API key on /metrics too")
    serve.add_argument("--max-n", type=int, default=256, help="most choices (n) one request may ask for")
    serve.add_argument("--allow-custom-roles", action="store_true",
                       help="pass chat roles OpenAI does not have to the chat template (default: refuse them)")
    demo = sub.add_parser("demo", help="train the demo pair (3-digit addition: SFT base, GRPO child)")
    demo.add_argument("--out", default="models/demo")
    demo.add_argument("--alpha", type=float, default=0.0, help="training-time reweighting α (0: plain GRPO)")
    demo.add_argument("--rl-steps", type=int, default=None, help="GRPO steps (default: the trainer's)")
    demo.add_argument("--lora", type=int, default=0, metavar="RANK",
                      help="train only the child, as a LoRA adapter of this rank of <out>/base, into <out>/lora")
    ev = sub.add_parser("eval", help="accuracy of an OpenAI-compatible endpoint on {problem, answer} JSONL")
    ev.add_argument("--url", default="http://127.0.0.1:8000/v1", help="base URL of the OpenAI API")
    ev.add_argument("--api-key", default="unused")
    ev.add_argument("--model", required=True, help="served name; presets are sent as <model>:rl / <model>:base")
    ev.add_argument("--data", required=True, help="JSONL with 'problem' and 'answer' (and optionally 'id')")
    ev.add_argument("--n", type=int, default=8, help="samples per problem")
    ev.add_argument("--k", default="1", help="comma-separated k of pass@k")
    ev.add_argument("--gamma", default="0.05", help="comma-separated γ values (a grid with --tau)")
    ev.add_argument("--tau", default="-0.3", help="comma-separated τ values; 'null' = always extrapolate")
    ev.add_argument("--generator", default="base")
    ev.add_argument("--candidates", type=int, default=50)
    ev.add_argument("--selection", choices=settings_mod.SELECTIONS, default=None,
                    help="what flags a position: delta_logp (the server's default), entropy (τ in nats), "
                         "random (τ = probability)")
    ev.add_argument("--presets", default="rl,base", help="comma-separated presets to include ('' for none)")
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--top-p", type=float, default=0.7)
    ev.add_argument("--max-tokens", type=int, default=2048)
    ev.add_argument("--seed", type=int, default=None)
    ev.add_argument("--concurrency", type=int, default=16)
    ev.add_argument("--prompt-suffix", default=None, help="appended to each problem (default: the paper's)")
    ev.add_argument("--scoring", choices=("boxed", "exact", "number"), default="boxed",
                    help="boxed: math-verify on the last \\boxed{}; exact: the whole answer; number: the last integer")
    ev.add_argument("--out", default="eval/results.jsonl", help="results JSONL (appended; reruns resume)")
    ev.add_argument("--plot", default=None, help="PNG of accuracy against γ per τ (default: next to --out)")
    extract = sub.add_parser("lora-extract", help="a full RL checkpoint as a LoRA adapter of its base "
                                                   "(truncated SVD of each projection's delta), for the stacked model")
    extract.add_argument("--base", required=True, help="path of the base checkpoint")
    extract.add_argument("--rl", required=True, help="path of the full RL checkpoint")
    extract.add_argument("--rank", type=rank_arg, help="rank R of every projection delta, or 'full'")
    extract.add_argument("--out", required=True, help="adapter directory to write (the report's, with --report)")
    extract.add_argument("--targets", nargs="+", default=None, metavar="PROJ",
                         help="projections to extract (default: q/k/v/o_proj and gate/up/down_proj)")
    extract.add_argument("--report", action="store_true",
                         help="instead of an adapter, the energy of each projection delta captured by its top-R "
                              "singular values (table, rank_energy.{json,md,png} in --out)")
    extract.add_argument("--ranks", default="1,4,16,64", help="comma-separated ranks of the --report table")
    return parser


def lora_module_arg(text: str) -> tuple[str, str]:
    """NAME=PATH, or vLLM's JSON form {"name": ..., "path": ...}."""
    if text.lstrip().startswith("{"):
        try:
            found = json.loads(text)
            name, path = found["name"], found["path"]
        except (ValueError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"not a JSON object with 'name' and 'path': {text!r}") from None
    else:
        name, _, path = text.partition("=")
    if not name or not path or ":" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH with a NAME without ':', got {text!r}")
    return name, path


def served_adapters(ours: argparse.Namespace, name: str | None) -> dict[str, str] | None:
    """{served name: adapter directory} of a stacked engine, from --lora-modules or an adapter --rl;
    None for two full checkpoints."""
    from rlvrx.server.engine.adapter import is_adapter_dir

    if (ours.rl is None) == (ours.lora_modules is None):
        fail("give either --rl (one RL model or adapter) or --lora-modules (several adapters)")
    if ours.lora_modules is None:
        return {name or Path(ours.rl).resolve().name: ours.rl} if is_adapter_dir(ours.rl) else None
    if name is not None:
        fail("--served-model-name: with --lora-modules each adapter is served under its own name")
    adapters = dict(ours.lora_modules)
    if len(adapters) < len(ours.lora_modules):
        fail("--lora-modules: two adapters have the same name")
    return adapters


def served_model_name(vllm_argv: list[str]) -> str | None:
    """The first --served-model-name among vLLM's flags (read before vLLM's parser is imported)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--served-model-name", "--served_model_name", nargs="+")
    return (parser.parse_known_args(vllm_argv)[0].served_model_name or [None])[0]


def rank_arg(text: str) -> int | str:
    if text == "full":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer or 'full', not {text!r}")
    return int(text)


def fail(message: str) -> NoReturn:
    print(f"rlvrx: error: {message}", file=sys.stderr)
    sys.exit(2)


def port_in_use(args: argparse.Namespace) -> str:
    return f"{args.host or '0.0.0.0'} port {args.port} is already in use (another server? choose one with --port)"


def check_listen_address(args: argparse.Namespace) -> None:
    """Fail now, before the engine starts, if vLLM will not be able to bind its address (it binds
    the same way, and only then starts the engine)."""
    from vllm.entrypoints.launchers.launcher import create_server_socket

    if args.uds:
        return
    try:
        create_server_socket((args.host or "", args.port), reuse_port=False).close()
    except OSError as exc:
        fail(port_in_use(args) if exc.errno == errno.EADDRINUSE
             else f"cannot listen on {args.host or '0.0.0.0'} port {args.port}: {exc.strerror or exc}")


def apply_pair(args: argparse.Namespace, pair: dict, vllm_argv: list[str]) -> None:
    """Set the pair's engine arguments on vLLM's parsed `args`. The user's --tokenizer is kept and
    their --hf-overrides are merged under the pair's own keys (they reach both streams: the streams
    share one config); flags that would replace the pair's own are refused, never silently dropped."""
    given = {arg.split("=", 1)[0].replace("_", "-") for arg in vllm_argv if arg.startswith("--")}
    if "--model" in given:
        fail("--model: the served pair is given with --rl and --base")
    if "--logits-processors" in given:
        fail("--logits-processors: the pair's combine is the engine's logits processor; others are not supported")
    if "--logprobs-mode" in given and args.logprobs_mode != pair["logprobs_mode"]:
        fail(f"--logprobs-mode: the pair reports {pair['logprobs_mode']} (log q of the served rule), "
             f"not {args.logprobs_mode}")
    overrides = dict(args.hf_overrides or {})
    owned = [key for key in overrides if key == "architectures" or key.startswith("rlvrx_")]
    if owned:
        fail(f"--hf-overrides: {owned[0]!r} is set by rlvrx serve for the pair")
    for key, value in pair.items():
        if not (key == "tokenizer" and "--tokenizer" in given):
            setattr(args, key, value)
    args.hf_overrides = {**overrides, **pair["hf_overrides"]}


def serve(ours: argparse.Namespace, vllm_argv: list[str]) -> None:
    # This run's files, removed at exit: prometheus-client's multiprocess folder (set before
    # anything imports prometheus-client: the engine's metrics, server.engine.metrics, reach
    # /metrics through it whether the engine runs in this process or not), and the file where
    # vLLM's processes record their first error (server.engine.startup_error).
    run_dir, owner = tempfile.mkdtemp(prefix="rlvrx-"), os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(run_dir, ignore_errors=True))
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(run_dir, "metrics")
        os.mkdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    error_file = os.environ[startup_error.ENV] = os.path.join(run_dir, "engine-error.txt")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # An engine that fails to start leaves its shared-memory queues to multiprocessing's resource
    # tracker, which removes them and would warn after our last line.
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, (os.environ.get("PYTHONWARNINGS"), "ignore::UserWarning:multiprocessing.resource_tracker")))
    # The V1 logits-processor interface; Model Runner V2 (CUDA default) refuses it.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    adapters = served_adapters(ours, served_model_name(vllm_argv))
    try:
        defaults = settings_mod.parse(
            {"gamma": ours.gamma, "tau": tau_arg(ours.tau), "generator": ours.generator, "candidates": ours.candidates}
        )
        runtime = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").strip().lower() in ("1", "true")
        # before vLLM's import: a bad pair fails in one line
        pair = engine_kwargs(ours.rl, ours.base, adapters, runtime_loading=runtime and adapters is not None,
                             max_loras=ours.max_loras, max_lora_rank=ours.max_lora_rank)
    except settings_mod.SettingsError as exc:
        fail(f"--{exc.field}: {exc}")
    except PairError as exc:
        fail(str(exc))

    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from rlvrx.server.api.middleware import ApiConfig
    from rlvrx.server.engine.stats import ENV as STATS_ENV
    from rlvrx.server.engine.stats import StatsTable

    cli_env_setup()
    args = make_arg_parser(FlexibleArgumentParser(prog="rlvrx serve")).parse_args(vllm_argv)
    if not any(a.startswith("--shutdown-timeout") for a in vllm_argv):
        # Drain on SIGTERM: in-flight requests finish (vLLM's default, 0, aborts them and
        # leaves their streams hanging).
        args.shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT
    if args.api_server_count not in (None, 1):
        fail("--api-server-count must be 1: run more replicas behind a load balancer instead")
    if args.pipeline_parallel_size > 1:
        fail("--pipeline-parallel-size must be 1: the pair's wrapper model has no pipeline stages "
             "(use --tensor-parallel-size)")
    try:
        check_serving_flags(ours.rl, ours.base, adapters, prompt_embeds=args.enable_prompt_embeds,
                            quantization=args.quantization)
    except PairError as exc:
        fail(str(exc))
    check_listen_address(args)
    apply_pair(args, pair, vllm_argv)
    try:
        args.speculative_config = draft_gate.apply(args.speculative_config, args.hf_overrides)
    except draft_gate.DraftGateError as exc:
        fail(f"--speculative-config: {exc}")
    names = list(adapters) if adapters else [(args.served_model_name or [Path(ours.rl).resolve().name])[0]]
    name = names[0]
    args.served_model_name = [served for n in names for served in (n, f"{n}:rl", f"{n}:base")]
    args.middleware = [*args.middleware, *MIDDLEWARE]
    validate_parsed_serve_args(args)
    settings_mod.set_server_defaults(defaults)

    vocab_size = json.loads((Path(pair["model"]) / "config.json").read_text())["vocab_size"]
    stats = StatsTable.create()
    os.environ[STATS_ENV] = stats.path  # the one table the engine writes to (its processes inherit this)
    args.rlvrx = ApiConfig(defaults=defaults, vocab_size=vocab_size, stats_path=stats.path, served_name=name,
                           adapters=pair["hf_overrides"].get("rlvrx_adapters", {}),
                           max_loras=pair["hf_overrides"].get("rlvrx_max_loras", 0),
                           max_lora_rank=pair["hf_overrides"].get("rlvrx_max_lora_rank", 0),
                           protect_metrics=ours.protect_metrics, max_n=ours.max_n,
                           allow_custom_roles=ours.allow_custom_roles)
    tau = defaults.tau if math.isfinite(defaults.tau) else ("null" if defaults.tau > 0 else "-inf")
    print(f"rlvrx: serving {', '.join(names)} (extrapolated: gamma={defaults.gamma} tau={tau} "
          f"generator={defaults.generator} candidates={defaults.candidates}), with :rl and :base of each",
          file=sys.stderr)
    try:
        uvloop.run(run_server(args))
    except (ValueError, RuntimeError) as exc:  # vLLM's config checks (pydantic's ValidationError is a ValueError)
        # or a failure in its engine processes, whose cause they recorded
        fail(f"vLLM refused to start: {startup_error.read(error_file) or startup_error.first_message(exc)}")
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        fail(port_in_use(args))  # taken since check_listen_address: vLLM binds before starting the engine
    finally:
        stats.remove()


def demo(ours: argparse.Namespace) -> None:
    from dataclasses import replace

    from rlvrx.server.arith_pair import TrainConfig, train_pair, train_rl

    cfg = replace(TrainConfig(), alpha=ours.alpha, lora_rank=ours.lora)
    if ours.rl_steps is not None:
        cfg = replace(cfg, rl_steps=ours.rl_steps)
    log = lambda line: print(f"rlvrx demo: {line}", file=sys.stderr, flush=True)  # noqa: E731
    if ours.lora:
        base, rl = Path(ours.out) / "base", Path(ours.out) / "lora"
        if not (base / "config.json").is_file():
            fail(f"no demo base model in {base}: train the pair first (rlvrx demo --out {ours.out})")
        train_rl(base, rl, cfg, log)
    else:
        base, rl = train_pair(ours.out, cfg, log)
    print(f"rlvrx: trained demo pair: base={base} rl={rl}", file=sys.stderr)


def evaluate(ours: argparse.Namespace) -> None:
    import openai

    from rlvrx.server import evaluation

    try:
        gammas = [float(g) for g in ours.gamma.split(",")]
        taus = [None if t.strip().lower() in ("null", "none") else float(t) for t in ours.tau.split(",")]
        ks = [int(k) for k in ours.k.split(",")]
        problems = evaluation.load_problems(ours.data)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    presets = [p for p in ours.presets.split(",") if p]
    settings = evaluation.grid(gammas, taus, ours.generator, ours.candidates, presets, ours.selection)
    sampling = {"temperature": ours.temperature, "top_p": ours.top_p, "max_tokens": ours.max_tokens}
    if ours.seed is not None:
        sampling["seed"] = ours.seed
    client = openai.OpenAI(base_url=ours.url, api_key=ours.api_key, max_retries=3, timeout=3600)
    results = Path(ours.out)
    suffix = evaluation.PROMPT_SUFFIX if ours.prompt_suffix is None else ours.prompt_suffix
    evaluation.run(client, ours.model, problems, settings, ours.n, sampling, results, ours.concurrency,
                   suffix=suffix, scoring=ours.scoring)
    rows = evaluation.summarize(results, ks)
    print(evaluation.format_table(rows, ks))
    results.with_suffix(".summary.json").write_text(json.dumps(rows, indent=2))
    evaluation.plot(rows, Path(ours.plot) if ours.plot else results.with_suffix(".png"))


def lora_extract(ours: argparse.Namespace) -> None:
    from rlvrx.tools import lora_extract as tool

    out = Path(ours.out)
    if not ours.out.strip():
        fail("--out: give the directory to write")
    if out.exists() and not out.is_dir():
        fail(f"--out: {ours.out!r} is a file, not a directory")
    if out.resolve() in (Path(ours.base).resolve(), Path(ours.rl).resolve()):
        fail(f"--out: {ours.out!r} is one of the two checkpoints; write the adapter into a directory of its own")
    targets = tuple(ours.targets or tool.PROJECTIONS)
    unknown = sorted(set(targets) - set(tool.PROJECTIONS))
    if unknown:
        fail(f"--targets: {', '.join(unknown)} is not one of {', '.join(tool.PROJECTIONS)}")
    try:
        if ours.report:
            ranks = tuple(rank_arg(r) for r in ours.ranks.split(",") if r != "full")
            print(tool.energy_report(ours.base, ours.rl, ours.out, ranks, targets))
            return
        if ours.rank is None:
            fail("lora-extract needs --rank (or --report)")
        rows = tool.extract(ours.base, ours.rl, None if ours.rank == "full" else ours.rank, ours.out, targets)
    except argparse.ArgumentTypeError as exc:
        fail(f"--ranks: {exc}")
    except PairError as exc:
        fail(str(exc))
    print(tool.format_groups(rows))
    print(f"rlvrx: wrote the adapter to {ours.out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ours, rest = our_parser().parse_known_args(argv)
    if ours.command == "serve":
        serve(ours, rest)
        return
    if rest:
        fail(f"unknown arguments: {' '.join(rest)}")
    if ours.command == "eval":
        evaluate(ours)
    elif ours.command == "lora-extract":
        lora_extract(ours)
    else:
        demo(ours)


if __name__ == "__main__":
    main()
