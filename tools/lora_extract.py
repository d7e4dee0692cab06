"""`rlvrx lora-extract`: a full RLVR checkpoint as a LoRA adapter of its base, for the stacked model.

Each targeted projection's delta ΔW = W_rl − W_base becomes its truncated SVD at rank R,
U_R·S_R·V_Rᵀ, the best rank-R approximation (Eckart–Young): lora_B = U_R·√S_R,
lora_A = √S_R·V_Rᵀ, scaling 1 (lora_alpha = r). The RL model's other tensors that the stacked
model holds per stream (embeddings, lm_head, norms, q/k/v biases) are copied exactly into
`rlvrx_rl_tensors.safetensors` beside the adapter when they differ from the base; any other
difference (an untargeted projection, …) is dropped. A table gives, per tensor group, the
relative size of the delta that was kept, truncated or dropped. The RL checkpoint's tokenizer
(chat template included) and generation config are written beside the adapter, so that the
served pair is the RL model in those too.

A pair whose config ties the output head to the embedding (tie_word_embeddings) may still store
an `lm_head.weight`. Each model's head is then what transformers and vLLM load: the stored one if
it differs from the embedding (they untie it), else the embedding. A stored copy equal to the
embedding is left out. When either model has a head of its own, the RL model's head (its own, or
its embedding) is compared with the base's and copied beside the adapter where the stacked model
would not otherwise give the RL stream that head (it gives it the RL embedding's copy, else the
base's head).

Memory: both checkpoints' safetensors files (single or sharded) are memory-mapped and read one
tensor at a time (their pages are the page cache's, not the process's). What the tool allocates
is one projection's float32 delta, its SVD and its A and B at a time; norms are summed in float64
over chunks of CHUNK elements; the adapter and the RL copies are spooled to disk as they are made
(tools/safetensors_writer.py). The peak is thus a small multiple of the largest tensor's size
whatever the rank and the number of layers (tests/test_lora_extract.py measures it: at most 3×
the largest tensor's float64 size).

`--report` writes, instead of an adapter, how much of each projection delta's energy its top-R
singular values capture (Σ_{i≤R} σ_i² / Σ σ_i²): a table, a JSON file and a PNG.
"""

import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from rlvrx.server.engine.adapter import ATTENTION, CONFIG_FILE, MLP, RL_TENSORS_FILE, STREAM_TENSOR, WEIGHTS_FILE, weight_name
from rlvrx.server.engine.adapter_generation_config import FILE as GENERATION_CONFIG_FILE
from rlvrx.server.engine.pair import PairError, check_pair, loaded_config, read_config
from rlvrx.tools.safetensors_writer import SafetensorsWriter

PROJECTIONS = ATTENTION + MLP
PROJECTION_WEIGHT = re.compile(r"(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+_proj))\.weight")
REPORT_RANKS = (1, 4, 16, 64)
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
CHUNK = 1 << 20  # elements of a norm's float64 temporaries
SAFETENSORS_METADATA = {"format": "pt"}


class Checkpoints:
    """A base/RL pair of safetensors checkpoints with the same tensor names and shapes.

    Under a tied config `lm_head.weight` is read only when either model has a head of its own
    (one that differs from its embedding), each side's head being its own or its embedding; an
    RL head of its own is in `copied`, to be copied whether or not it equals the base's."""

    def __init__(self, base: str | Path, rl: str | Path):
        check_pair(str(rl), str(base))  # one architecture, config and tokenizer
        self.base, self.rl = open_tensors(Path(base), "base"), open_tensors(Path(rl), "RL")
        self.copied: set[str] = set()
        if loaded_config(str(rl), read_config(str(rl), "RL")).get("tie_word_embeddings"):
            self.resolve_tied_heads()
        only = sorted(self.base.keys() ^ self.rl.keys())
        if only:
            side = "base" if only[0] in self.base else "RL"
            raise PairError(f"{only[0]!r} is in the {side} checkpoint only ({len(only)} tensors are in one of the two)")
        for name in self.base:
            shapes = [tuple(files[name].get_slice(name).get_shape()) for files in (self.base, self.rl)]
            if shapes[0] != shapes[1]:
                raise PairError(f"{name!r} is {shapes[1]} in the RL checkpoint and {shapes[0]} in the base")
        self.names = sorted(self.base)

    def resolve_tied_heads(self) -> None:
        for files in (self.base, self.rl):
            if HEAD in files and torch.equal(files[HEAD].get_tensor(HEAD), files[EMBEDDING].get_tensor(EMBEDDING)):
                del files[HEAD]  # a stored copy of the tied head
        if HEAD in self.rl:
            self.copied.add(HEAD)  # else the stacked model would give the RL stream its embedding
        if HEAD in self.rl or HEAD in self.base:
            for files in (self.base, self.rl):
                files.setdefault(HEAD, Renamed(files[EMBEDDING], EMBEDDING))

    def read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(base, RL) copies of one tensor, in their stored dtype."""
        return self.base[name].get_tensor(name), self.rl[name].get_tensor(name)


class Renamed:
    """One tensor of an open safetensors file, read under another name."""

    def __init__(self, file, name: str):
        self.file, self.name = file, name

    def get_tensor(self, _name: str) -> torch.Tensor:
        return self.file.get_tensor(self.name)

    def get_slice(self, _name: str):
        return self.file.get_slice(self.name)


def open_tensors(path: Path, role: str) -> dict[str, object]:
    """Tensor name → the open safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {file: safe_open(str(path / file), "pt") for file in set(weight_map.values())}
        return {name: files[file] for name, file in weight_map.items()}
    if not (path / "model.safetensors").is_file():
        raise PairError(f"the {role} checkpoint {str(path)!r} has no model.safetensors (only safetensors are read)")
    file = safe_open(str(path / "model.safetensors"), "pt")
    return dict.fromkeys(file.keys(), file)


@dataclass
class Group:
    """Squared Frobenius norms summed over the tensors of one group (names up to the layer index)."""

    how: str
    tensors: int = 0
    base: float = 0.0  # ‖W_base‖²
    delta: float = 0.0  # ‖ΔW‖²
    dropped: float = 0.0  # ‖the part of ΔW not served‖²

    def add(self, base: float, delta: float, dropped: float) -> None:
        """One tensor's ‖W_base‖², ‖ΔW‖² and ‖dropped part‖²."""
        self.tensors += 1
        self.base += base
        self.delta += delta
        self.dropped += dropped

    def row(self, name: str) -> dict:
        return {"group": name, "how": self.how if self.delta else "equal", "tensors": self.tensors,
                "delta_over_base": (self.delta / self.base) ** 0.5 if self.base else 0.0,
                "dropped_over_delta": (self.dropped / self.delta) ** 0.5 if self.delta else 0.0}


def squared_norm(a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """‖a − b‖² (‖a‖² without b), summed in float64 over chunks of CHUNK elements: no float64
    copy of a whole tensor is made."""
    a, b = a.reshape(-1), None if b is None else b.reshape(-1)
    total = 0.0
    for start in range(0, a.numel(), CHUNK):
        x = a[start:start + CHUNK].to(torch.float64, copy=True)
        if b is not None:
            x -= b[start:start + CHUNK]
        total += x.square_().sum().item()
    return total


def difference(w_rl: torch.Tensor, w_base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_rl − w_base in `dtype`, in one allocation (the checkpoints' tensors are not written to)."""
    delta = w_rl.to(dtype, copy=True)
    delta -= w_base
    return delta


def truncated_svd(w_rl: torch.Tensor, w_base: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [r, in], B [out, r], ‖ΔW − B·A‖²) of the rank-r truncated SVD of ΔW = w_rl − w_base
    (float32); rank None = full."""
    u, s, vh = torch.linalg.svd(difference(w_rl, w_base, torch.float32), full_matrices=False)
    r = len(s) if rank is None else min(rank, len(s))
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous(), s[r:].double().square().sum().item()


def extract(base: str | Path, rl: str | Path, rank: int | None, out: str | Path,
            targets: tuple[str, ...] = PROJECTIONS) -> list[dict]:
    """Write the adapter of `rl` on `base` at `rank` (None: each projection's full rank) into `out`;
    return the per-group report rows."""
    from transformers import AutoTokenizer

    pair, out = Checkpoints(base, rl), Path(out)
    ranks, groups = {}, {}
    out.mkdir(parents=True, exist_ok=True)
    with (SafetensorsWriter(out / WEIGHTS_FILE, SAFETENSORS_METADATA) as lora,
          SafetensorsWriter(out / RL_TENSORS_FILE, SAFETENSORS_METADATA) as rl_tensors):
        for name in tqdm(pair.names, desc="lora-extract", unit="tensor", file=sys.stderr):
            w_base, w_rl = pair.read(name)
            same = torch.equal(w_base, w_rl)
            norms = squared_norm(w_base), 0.0 if same else squared_norm(w_rl, w_base)
            projection = PROJECTION_WEIGHT.fullmatch(name)
            group_name = re.sub(r"\.\d+\.", ".N.", name)
            if projection and projection[2] in targets:
                dropped = 0.0
                if not same:
                    key = projection[1]
                    a, b, dropped = truncated_svd(w_rl, w_base, rank)
                    lora.add(weight_name(key, "A"), a)
                    lora.add(weight_name(key, "B"), b)
                    ranks[key] = a.shape[0]
                    del a, b  # before the next tensor's SVD
                groups.setdefault(group_name, Group("LoRA" if rank is None else f"LoRA rank {rank}")).add(*norms, dropped)
            elif not projection and STREAM_TENSOR.fullmatch(name):
                if not same or name in pair.copied:
                    rl_tensors.add(name, w_rl)
                groups.setdefault(group_name, Group("RL copy")).add(*norms, 0.0)
            else:
                groups.setdefault(group_name, Group("dropped")).add(*norms, norms[1])
        if not ranks:
            raise PairError(f"no projection of {', '.join(targets)} differs between the checkpoints: nothing to extract")
        if not rl_tensors.entries:
            (out / RL_TENSORS_FILE).unlink(missing_ok=True)  # an earlier run's

    top = max(ranks.values())
    pattern = {key: r for key, r in ranks.items() if r != top}
    (out / CONFIG_FILE).write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(Path(base).resolve()),
        "r": top, "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": pattern,
        "target_modules": sorted(ranks), "bias": "none", "lora_dropout": 0.0, "inference_mode": True,
    }, indent=2))
    AutoTokenizer.from_pretrained(str(rl)).save_pretrained(str(out))
    write_generation_config(Path(rl), out)
    return [group.row(name) for name, group in groups.items()]


def write_generation_config(rl: Path, out: Path) -> None:
    """The RL model's generation config into the adapter directory, where the stacked engine reads
    it: the checkpoint's file, or, without one, what transformers and vLLM derive from its config."""
    from transformers import AutoConfig, GenerationConfig

    if (rl / GENERATION_CONFIG_FILE).is_file():
        shutil.copyfile(rl / GENERATION_CONFIG_FILE, out / GENERATION_CONFIG_FILE)
    else:
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(rl)).save_pretrained(out)


def served_rl_model(base: str | Path, adapter_dir: str | Path, dtype: torch.dtype = torch.float64):
    """The RL model that the stacked engine serves for an extracted adapter, as a transformers
    model: the base with the adapter merged by peft and the RL tensors beside it loaded."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    rl_tensors = Path(adapter_dir) / RL_TENSORS_FILE
    tensors = {k: v.to(dtype) for k, v in load_file(str(rl_tensors)).items()} if rl_tensors.is_file() else {}
    head = tensors.pop(HEAD, None)
    result = model.load_state_dict(tensors, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    # The RL head as the stacked model holds it: its own; else, under a tied config, its embedding's
    # copy; else the base's.
    if head is not None:  # untied from the embedding if transformers had tied them
        model.lm_head.weight = torch.nn.Parameter(head)
    elif EMBEDDING in tensors and AutoConfig.from_pretrained(base).tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    return model.eval()


def format_groups(rows: list[dict]) -> str:
    lines = [f"{'tensor group':<48} {'tensors':>7} {'|ΔW|/|W_base|':>13} {'|dropped|/|ΔW|':>14}  served as"]
    lines += [f"{r['group']:<48} {r['tensors']:>7} {r['delta_over_base']:>13.4g} {r['dropped_over_delta']:>14.4g}  {r['how']}"
              for r in rows]
    return "\n".join(lines)


def energy_report(base: str | Path, rl: str | Path, out: str | Path, ranks: tuple[int, ...] = REPORT_RANKS,
                  targets: tuple[str, ...] = PROJECTIONS) -> str:
    """Write rank_energy.json ({projection: captured energy at rank 1, 2, …, full}), rank_energy.md
    (the table at `ranks` and full) and rank_energy.png into `out`; return the table."""
    pair, out = Checkpoints(base, rl), Path(out)
    energy = {}
    for name in tqdm(pair.names, desc="lora-extract --report", unit="tensor", file=sys.stderr):
        projection = PROJECTION_WEIGHT.fullmatch(name)
        if projection is None or projection[2] not in targets:
            continue
        w_base, w_rl = pair.read(name)
        s2 = torch.linalg.svdvals(difference(w_rl, w_base, torch.float64)).square()
        if s2.sum() > 0:
            energy[projection[1]] = (s2.cumsum(0) / s2.sum()).tolist()
    if not energy:
        raise PairError(f"no projection of {', '.join(targets)} differs between the checkpoints")
    header = "| projection | " + " | ".join(f"rank {r}" for r in ranks) + " | singular values |"
    lines = [header, "|---" * (len(ranks) + 2) + "|"]
    for key, captured in energy.items():
        cells = [f"{captured[min(r, len(captured)) - 1]:.3f}" for r in ranks]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {len(captured)} |")
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_energy.json").write_text(json.dumps(energy))
    (out / "rank_energy.md").write_text(
        f"Energy of each projection delta captured by its top-R singular values, Σ_(i≤R) σ_i² / Σ σ_i²\n\n{table}\n")
    plot_energy(energy, out / "rank_energy.png")
    return table


def plot_energy(energy: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(PROJECTIONS, plt.get_cmap("tab10").colors))
    for key, captured in energy.items():
        module = key.rsplit(".", 1)[1]
        ax.plot(range(1, len(captured) + 1), captured, color=colors[module], alpha=0.6, lw=1)
    for module, color in colors.items():
        ax.plot([], [], color=color, label=module)
    ax.set(xscale="log", xlabel="rank R", ylabel="energy captured by the top-R singular values", ylim=(0, 1.02),
           title="RL − base projection deltas")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
