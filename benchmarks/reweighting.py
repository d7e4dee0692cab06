"""Plain GRPO against the paper's training-time reweighting (α = 0.2) on the demo task.

    python benchmarks/reweighting.py --base demo/pair/base --out benchmarks/out/reweighting.json

From the shipped base checkpoint, trains the RL child with α = 0 and α = 0.2 for three seeds
each (same steps, same prompts per seed) and reports greedy and T = 1 accuracy on the
trainer's 512 held-out problems.
"""

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlvrx.server.arith_pair import TrainConfig, train_rl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="demo/pair/base")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/out/reweighting.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for alpha in (0.0, 0.2):
                cfg = replace(TrainConfig(), seed=seed, alpha=alpha)
                scores = train_rl(args.base, Path(tmp) / f"{seed}-{alpha}", cfg, log=lambda _: None)
                rows.append({"seed": seed, "alpha": alpha, **scores})
                print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
