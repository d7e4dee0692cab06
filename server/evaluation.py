"""`rlvrx eval`: accuracy of any OpenAI-compatible endpoint on {problem, answer} JSONL.

Prompts as the paper does (the problem, then "Please reason step by step, and put your
final answer within \\boxed{}."), samples `n` answers per problem, scores the last
`\\boxed{}` with math-verify, and reports avg@n and unbiased pass@k per setting. Settings
are a grid over γ × τ (with the request's generator, candidates and selection criterion)
plus presets sent as model-name suffixes (`:rl`, `:base`) for reference. Each finished (setting, problem) is
appended to a JSONL at once, so an interrupted run resumes where it stopped.
"""

import json
import math
import re
import statistics
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from rlvrx.server.engine.settings import tau_json

PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Setting:
    """One way of decoding: a preset (`rl`, `base`) or extrapolation with these fields."""

    preset: str = "extrapolate"
    gamma: float | None = None
    tau: float | None = None  # None: +inf (always extrapolate)
    generator: str | None = None
    candidates: int | None = None
    selection: str | None = None  # None: the server's default criterion (Δlog p)

    @property
    def key(self) -> str:
        if self.preset != "extrapolate":
            return self.preset
        tau = "null" if self.tau is None else f"{self.tau:g}"
        key = f"gamma={self.gamma:g},tau={tau},generator={self.generator},candidates={self.candidates}"
        return key if self.selection is None else f"{key},selection={self.selection}"

    def request_fields(self, model: str) -> tuple[str, dict]:
        if self.preset != "extrapolate":
            return f"{model}:{self.preset}", {}
        tau = None if self.tau is None else tau_json(self.tau)
        fields = {"gamma": self.gamma, "tau": tau, "generator": self.generator, "candidates": self.candidates}
        return model, fields if self.selection is None else {**fields, "selection": self.selection}


def grid(gammas: Iterable[float], taus: Iterable[float | None], generator: str, candidates: int,
         presets: Iterable[str], selection: str | None = None) -> list[Setting]:
    settings = [Setting(preset=p) for p in presets]
    settings += [Setting(gamma=g, tau=t, generator=generator, candidates=candidates, selection=selection)
                 for t in taus for g in gammas]
    return settings


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def final_number(text: str) -> str | None:
    """The last integer of `text`, after its last 'Answer:' when one is followed by a number,
    without thousands separators; None when there is none."""
    pattern = r"-?\d[\d,]*"
    numbers = re.findall(pattern, text.rsplit("Answer:", 1)[-1]) or re.findall(pattern, text)
    return numbers[-1].replace(",", "") if numbers else None


def is_correct(response: str, answer: str, scoring: str = "boxed") -> bool:
    """`boxed`: math-verify on the last \\boxed{} of the response against the reference
    answer; `exact`: the stripped response equals the answer; `number`: the last integer of
    the response (see `final_number`) equals the answer."""
    if scoring == "exact":
        return response.strip() == answer.strip()
    if scoring == "number":
        return final_number(response) == answer.strip()
    from math_verify import parse, verify

    boxed = last_boxed(response)
    if boxed is None:
        return False
    try:
        return bool(verify(parse(f"${answer}$"), parse(f"${boxed}$")))
    except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_problems(path: str) -> list[dict]:
    problems = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            item = json.loads(line)
            if "problem" not in item or "answer" not in item:
                raise ValueError(f"{path}:{line_no}: each line needs 'problem' and 'answer'")
            problems.append({"id": item.get("id", line_no - 1), "problem": item["problem"], "answer": str(item["answer"])})
    return problems


def load_done(results_path: Path) -> set[tuple[str, str]]:
    if not results_path.exists():
        return set()
    return {(r["setting"], str(r["problem_id"])) for r in map(json.loads, results_path.read_text().splitlines()) if r}


def sample(client, model: str, setting: Setting, problem: dict, n: int, sampling: dict, suffix: str) -> dict:
    """n answers to one problem under one setting, with the server's extrapolation counts."""
    name, fields = setting.request_fields(model)
    response = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": problem["problem"] + suffix}], n=n,
        extra_body=fields, **sampling,
    )
    usage = response.usage.model_extra or {}
    return {
        "setting": setting.key, "setting_fields": asdict(setting), "problem_id": str(problem["id"]),
        "answer": problem["answer"], "responses": [c.message.content or "" for c in response.choices],
        "completion_tokens": response.usage.completion_tokens,
        "extrapolated_tokens": usage.get("extrapolated_tokens", 0.0),
    }


def run(client, model: str, problems: list[dict], settings: list[Setting], n: int, sampling: dict,
        results_path: Path, concurrency: int, suffix: str = PROMPT_SUFFIX, scoring: str = "boxed",
        progress: bool = True) -> None:
    """Sample every (setting, problem) not yet in `results_path`, appending as they finish."""
    from tqdm import tqdm

    done = load_done(results_path)
    todo = [(s, p) for s in settings for p in problems if (s.key, str(p["id"])) not in done]
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(concurrency) as pool, results_path.open("a") as out, \
            tqdm(total=len(todo), disable=not progress, desc="eval") as bar:
        futures = [pool.submit(sample, client, model, s, p, n, sampling, suffix) for s, p in todo]
        for future in as_completed(futures):
            record = future.result()
            record["correct"] = [is_correct(r, record["answer"], scoring) for r in record["responses"]]
            out.write(json.dumps(record) + "\n")
            out.flush()
            bar.update()


def summarize(results_path: Path, ks: list[int]) -> list[dict]:
    """Per setting: avg@n with its 95% confidence interval over problems (`ci95`, the
    half-width: 1.96 standard errors of the per-problem accuracies), pass@k, extrapolation
    rate, problems."""
    by_setting: dict[str, list[dict]] = {}
    for line in results_path.read_text().splitlines():
        if line:
            record = json.loads(line)
            by_setting.setdefault(record["setting"], []).append(record)
    rows = []
    for key, records in by_setting.items():
        accuracies = [sum(r["correct"]) / len(r["correct"]) for r in records]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        row = {"setting": key, **records[0]["setting_fields"], "problems": len(records),
               "avg@n": statistics.fmean(accuracies), "ci95": 1.96 * spread / math.sqrt(len(accuracies))}
        for k in ks:
            usable = [r for r in records if len(r["correct"]) >= k]
            row[f"pass@{k}"] = (sum(pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in usable) / len(usable)
                                if usable else None)
        tokens = sum(r["completion_tokens"] for r in records)
        row["extrapolation_rate"] = sum(r["extrapolated_tokens"] for r in records) / tokens if tokens else 0.0
        rows.append(row)
    return rows


def format_table(rows: list[dict], ks: list[int]) -> str:
    header = f"{'setting':<60} {'problems':>8} {'avg@n':>7} {'±ci95':>6} " + " ".join(f"{'pass@' + str(k):>7}" for k in ks) + \
             f" {'extrap':>7}"
    lines = [header]
    for row in rows:
        passes = " ".join(f"{row[f'pass@{k}']:>7.3f}" if row[f"pass@{k}"] is not None else f"{'-':>7}" for k in ks)
        lines.append(f"{row['setting']:<60} {row['problems']:>8} {row['avg@n']:>7.3f} {row['ci95']:>6.3f} {passes} "
                     f"{row['extrapolation_rate']:>7.3f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy (avg@n) against γ, one line per (selection, τ); and accuracy against the
    extrapolated fraction of tokens, one line per (selection, γ, generator) over its τ
    sweep — the paper's token-replacement curve when γ = 0 and the generator is the base
    model. A panel is drawn when it has a line of two points or more (the γ panel at least);
    the presets are horizontal reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[tuple[float, float]]]] = {"γ": {}, "extrapolated (replaced) fraction of tokens": {}}
    for row in rows:
        if row["preset"] == "extrapolate":
            selection = row.get("selection") or "delta_logp"
            tau = "null" if row["tau"] is None else f"{row['tau']:g}"
            panels["γ"].setdefault(f"{selection}, τ = {tau}", []).append((row["gamma"], row["avg@n"]))
            panels["extrapolated (replaced) fraction of tokens"].setdefault(
                f"{selection}, γ = {row['gamma']:g}, gen {row['generator']}", []).append(
                (row["extrapolation_rate"], row["avg@n"]))
    drawn = {x: curves for x, curves in panels.items() if any(len(points) > 1 for points in curves.values())}
    drawn = drawn or {"γ": panels["γ"]}
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.5 * len(drawn), 4), squeeze=False)
    for ax, (xlabel, curves) in zip(axes[0], drawn.items()):
        for label, points in sorted(curves.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for row in rows:
            if row["preset"] != "extrapolate":
                ax.axhline(row["avg@n"], linestyle="--", color="gray" if row["preset"] == "base" else "black",
                           label=f"{row['preset']} alone")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("avg@n accuracy")
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
