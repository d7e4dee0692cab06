"""The paper's token-replacement curve on the demo pair, via `rlvrx eval`.

    make serve &
    python benchmarks/replacement_curve.py --url http://127.0.0.1:8000/v1 --out benchmarks/out/replacement

The base model generates (T = 1, whole vocabulary, γ = 0); at the positions a criterion
flags, the token is redrawn from the RL model. Sweeping each criterion's threshold τ traces
accuracy against the fraction of replaced tokens:

* `delta_logp` — the proposal's Δlog p = log π_RL − log π_Base ≤ τ (the paper's rule);
* `entropy` — the base model's entropy at the position ≥ τ nats (high-entropy "forking" tokens);
* `random` — each position with probability τ.

Prints one table and writes, under --out, the results JSONL, a summary and a PNG whose right
panel is the curve (x: extrapolated fraction, y: avg@n; base and RL alone as reference lines).
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.demo_accuracy import arguments, run_all, write_problems  # noqa: E402
from rlvrx.server import evaluation  # noqa: E402

THRESHOLDS = {  # τ per criterion, from "replace nothing" to "replace everything"
    "delta_logp": [-math.inf, -4.0, -2.0, -1.5, -1.0, -0.5, -0.2, -0.1, -0.05, 0.0, 0.5, math.inf],
    "entropy": [math.inf, 2.0, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0],
    "random": [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
}


def main() -> None:
    args = arguments(__doc__.splitlines()[0], "benchmarks/out/replacement", 8)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems = write_problems(out, args.problems)
    settings = [setting for selection, taus in THRESHOLDS.items()
                for setting in evaluation.grid([0.0], taus, "base", 0, [], selection)]
    settings += evaluation.grid([], [], "base", 0, ["rl", "base"])
    run_all(args.url, args.model, problems, {"replacement_T1.0": (settings, 1.0, 1.0)}, args.n, out)


if __name__ == "__main__":
    main()
