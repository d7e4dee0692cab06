"""The fused Triton kernel under TRITON_INTERPRET=1 on CPU tensors, against the float64
reference and against the PyTorch path. Shapes are small: the interpreter is slow."""

import math

import numpy as np
import pytest
import torch

from rlvrx.kernels import reference as ref
from rlvrx.kernels import rule
from rlvrx.kernels import triton_combine  # interpreted: tests/conftest.py sets TRITON_INTERPRET=1
from tests.test_rule import random_pair, to_row_settings

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
VOCAB = 301  # not a multiple of the block
BLOCK = 64


def extreme_settings(rng, rows):
    out = []
    for i in range(rows):
        out.append(ref.Settings(
            gamma=float(rng.choice([0.0, 0.1, -1.0, 10.0])),
            tau=float(rng.choice([-math.inf, -0.3, 0.5, math.inf])),
            generator=str(rng.choice(["base", "rl"])),
            candidates=int(rng.choice([0, 1, 7, VOCAB, 10 * VOCAB])),
            temperature=0.0 if i % 3 == 0 else float(rng.choice([0.05, 0.7, 1.0, 2.0])),
            top_p=float(rng.choice([0.01, 0.6, 0.95, 1.0])),
        ))
    return out


def masked_pair(rng, rows):
    rl, base = random_pair(rng, rows, vocab=VOCAB)
    both = rng.random((rows, VOCAB)) < 0.2
    rl_only = rng.random((rows, VOCAB)) < 0.05
    both[:, :3] = rl_only[:, :3] = False
    rl[both | rl_only] = -np.inf
    base[both] = -np.inf
    return rl, base


def check_against_reference(rl, base, settings, got):
    for i, s in enumerate(settings):
        if s.temperature == 0:
            assert int(torch.argmax(got.out[i])) == ref.greedy_token(rl[i], base[i], s), s
        else:
            expected = ref.two_stage_distribution(rl[i], base[i], s)
            np.testing.assert_allclose(got.out[i].exp().double().numpy(), expected, atol=3e-5, err_msg=str(s))
        assert float(got.prob[i]) == pytest.approx(ref.extrapolation_probability(rl[i], base[i], s), abs=3e-5)


@pytest.mark.parametrize("s_cap", [triton_combine.S_CAP, 4], ids=["compacted", "full-rows"])
def test_kernel_equals_float64_reference_with_masks_and_extremes(s_cap):
    """With a scratch row of 4, every S larger than that (k = 7, 0, V, 10V) is searched for
    p_x on the full rows; with the default one, on its compacted values."""
    rng = np.random.default_rng(31)
    rows = 21
    rl, base = masked_pair(rng, rows)
    settings = extreme_settings(rng, rows)
    out = torch.full((rows, VOCAB), float("nan"))  # poison: every element must be written
    got = triton_combine.combine(torch.tensor(rl, dtype=torch.float32), torch.tensor(base, dtype=torch.float32),
                                 to_row_settings(settings), want_delta=True, out=out, block=BLOCK, s_cap=s_cap)
    assert got.out is out and not torch.isnan(out).any()
    check_against_reference(rl, base, settings, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_agrees_with_the_pytorch_path(dtype):
    rng = np.random.default_rng(32 if dtype == torch.float32 else 33)
    rows = 13
    rl, base = random_pair(rng, rows, vocab=VOCAB)
    settings = to_row_settings(extreme_settings(rng, rows))
    rl_t, base_t = torch.tensor(rl, dtype=dtype), torch.tensor(base, dtype=dtype)
    got = triton_combine.combine(rl_t, base_t, settings, want_delta=True, block=BLOCK)
    expected = rule.combine(rl_t, base_t, settings, want_delta=True)
    greedy = settings.temperature == 0
    assert torch.equal(got.out[greedy].argmax(-1), expected.out[greedy].argmax(-1))
    torch.testing.assert_close(got.out[~greedy].exp(), expected.out[~greedy].exp(), atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(got.prob, expected.prob, atol=3e-5, rtol=1e-4)
    torch.testing.assert_close(got.delta, expected.delta, atol=1e-5, rtol=1e-5)


def test_kernel_writes_in_place_over_the_rl_rows():
    rng = np.random.default_rng(34)
    rl, base = random_pair(rng, 5, vocab=VOCAB)
    settings = to_row_settings([ref.Settings(0.3, -0.3, "base", 10, 0.8, 0.9)] * 5)
    rl_t = torch.tensor(rl, dtype=torch.float32)
    expected = rule.combine(rl_t, torch.tensor(base, dtype=torch.float32), settings)
    got = triton_combine.combine(rl_t, torch.tensor(base, dtype=torch.float32), settings, out=rl_t, block=BLOCK)
    assert got.out.data_ptr() == rl_t.data_ptr()
    torch.testing.assert_close(got.out.exp(), expected.out.exp(), atol=3e-5, rtol=1e-4)


def broken_pair(rng):
    """Rows without a distribution (a NaN or +inf logit in either model — an fp16 overflow —
    or every logit −inf), each mixed with healthy rows; returns (rl, base, broken mask)."""
    rl, base = random_pair(rng, 16, vocab=VOCAB)
    rl, base = rl.astype(np.float32), base.astype(np.float32)
    edits = [
        lambda: base.__setitem__(0, np.nan),  # the generator (base) row all NaN
        lambda: (rl.__setitem__(1, np.nan), base.__setitem__(1, np.nan)),  # both rows all NaN
        lambda: rl.__setitem__((2, 7), np.nan),  # one NaN in the RL row
        lambda: base.__setitem__((3, VOCAB - 1), np.inf),  # one +inf in the base row
        lambda: (rl.__setitem__(4, -np.inf), base.__setitem__(4, -np.inf)),  # every token banned
        lambda: base.__setitem__(5, -np.inf),  # the generator row all −inf
    ]
    for edit in edits:
        edit()
    return rl, base, np.arange(16) < len(edits)


def test_rows_without_a_distribution_give_nan_rows_and_no_extrapolation_on_both_paths():
    rng = np.random.default_rng(35)
    rl, base, broken = broken_pair(rng)
    settings = [ref.Settings(0.3, -0.3, "base", 7, 0.0 if i % 2 else 0.8, 0.9) for i in range(16)]
    settings[1] = settings[3] = ref.Settings(0.5, math.inf, "rl", 0, 1.0, 1.0)  # an RL generator, too
    row_settings = to_row_settings(settings)
    rl_t, base_t = torch.tensor(rl), torch.tensor(base)
    out = torch.zeros((16, VOCAB))  # poison: broken rows must be written NaN, not left alone
    for got in (triton_combine.combine(rl_t, base_t, row_settings, want_delta=True, out=out, block=BLOCK),
                rule.combine(rl_t, base_t, row_settings, want_delta=True)):
        assert got.out[broken].isnan().all() and got.delta[broken].isnan().all()
        assert (got.prob[broken] == 0).all()
        assert not got.out[~broken].isnan().any() and not got.prob[~broken].isnan().any()
        check_against_reference(rl[~broken], base[~broken], [s for s, b in zip(settings, broken) if not b],
                                type(got)(got.out[~broken], got.prob[~broken], None))


def rows_read(monkeypatch, rl, base, settings, s_cap):
    """How many times the kernel reads the RL and the base rows: logits loaded from each
    tensor (counted in the interpreter's loads) over its size."""
    from triton.runtime import interpreter

    spans = {name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in (("rl", rl), ("base", base))}
    loaded = dict.fromkeys(spans, 0)
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, *args):
        for name, (lo, hi) in spans.items():
            loaded[name] += int(np.count_nonzero(mask.data & (ptrs.data >= lo) & (ptrs.data < hi)))
        return original(self, ptrs, mask, *args)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting)
    triton_combine.combine(rl, base, settings, block=BLOCK, s_cap=s_cap)
    return loaded["rl"] / rl.numel(), loaded["base"] / base.numel()


@pytest.mark.parametrize("generator, candidates, temperature, top_p, s_cap, generator_reads, other_reads", [
    ("base", 50, 1.0, 0.7, triton_combine.S_CAP, 10, 3),  # the paper's setting
    ("rl", 50, 1.0, 0.7, triton_combine.S_CAP, 10, 3),
    ("base", 50, 0.0, 0.7, triton_combine.S_CAP, 10, 3),  # greedy: the top-k search alone
    ("base", 0, 1.0, 1.0, triton_combine.S_CAP, 3, 3),  # no search
    ("base", 0, 1.0, 0.7, 16, 17, 10),  # S larger than the scratch row: p_x searched on the full rows
])
def test_row_passes(monkeypatch, generator, candidates, temperature, top_p, s_cap, generator_reads, other_reads):
    """The passes of the README's table: the searches on the generator's row read it alone,
    and the p_x search reads the compacted S, not the rows (plus two logits per row for the
    greedy proposal)."""
    rng = np.random.default_rng(36)
    rl, base = (torch.tensor(x, dtype=torch.float32) for x in random_pair(rng, 3, vocab=VOCAB))
    settings = to_row_settings([ref.Settings(0.05, -0.3, generator, candidates, temperature, top_p)] * 3)
    rl_reads, base_reads = rows_read(monkeypatch, rl, base, settings, s_cap)
    expected = (other_reads, generator_reads) if generator == "base" else (generator_reads, other_reads)
    assert (rl_reads, base_reads) == pytest.approx(expected, abs=1 / VOCAB + 1e-9)
