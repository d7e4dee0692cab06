"""The verifiable task of the real RLVR pair: short arithmetic word problems, generated with a seed.

Each problem takes one or two steps of small integer arithmetic in words (counting, sharing,
time); the reward is 1 when the last integer of the answer equals the reference. The
held-out split is fixed by a hash of the problem's text, so no held-out problem is ever
trained on, whatever the seeds and counts of the two sets.
"""

import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

from rlvrx.server import evaluation

INSTRUCTION = "Answer with the final number after 'Answer:'."
HELD_OUT_EVERY = 5  # one problem text in five belongs to the held-out split


NAMES = ["Sam", "Mia", "Leo", "Ana", "Tom", "Eva"]
ITEMS = ["apples", "marbles", "stickers", "cards", "books", "shells"]


def _gets_more(rng: random.Random) -> tuple[str, int]:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(3, 30), rng.randrange(2, 20)
    return f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b


def _gives_away(rng: random.Random) -> tuple[str, int]:
    name, item, a = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(5, 40)
    b = rng.randrange(1, a)
    return f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b


def _groups(rng: random.Random) -> tuple[str, int]:
    groups, each = rng.randrange(2, 10), rng.randrange(2, 10)
    return f"There are {groups} bags with {each} candies in each bag. How many candies are there?", groups * each


def _hours(rng: random.Random) -> tuple[str, int]:
    hours, minutes = rng.randrange(1, 6), rng.choice([0, 10, 15, 20, 30, 45])
    extra = f" and {minutes} minutes" if minutes else ""
    return f"How many minutes are there in {hours} hours{extra}?", 60 * hours + minutes


def _two_steps(rng: random.Random) -> tuple[str, int]:
    name, item, a, b = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(5, 20), rng.randrange(2, 10)
    c = rng.randrange(1, a + b)
    return f"{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} does {name} have now?", \
        a + b - c


TEMPLATES: list[Callable[[random.Random], tuple[str, int]]] = [_gets_more, _gives_away, _groups, _hours, _two_steps]


def is_held_out(question: str) -> bool:
    return hashlib.sha256(question.encode()).digest()[0] % HELD_OUT_EVERY == 0


def problems(split: str, count: int, seed: int) -> list[dict]:
    """`count` distinct problems of `split` ("train" or "heldout"): {id, problem, answer}."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < count:
        question, answer = rng.choice(TEMPLATES)(rng)
        if question in seen or is_held_out(question) != (split == "heldout"):
            continue
        seen.add(question)
        out.append({"id": len(out), "problem": f"{question} {INSTRUCTION}", "answer": str(answer)})
    return out


def reward(completion: str, answer: str) -> float:
    """1 where the last integer of the completion (after 'Answer:' when there is one) is the answer."""
    return 1.0 if evaluation.is_correct(completion, answer, "number") else 0.0


def write_jsonl(items: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path
