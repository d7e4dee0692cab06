"""The statistics table and the processor's bookkeeping, without an engine: slots, private
keys at admission, positions sampled more than once, async scheduling's placeholder ids."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import BatchUpdate

from rlvrx.server.engine import host_reads, metrics
from rlvrx.server.engine import processor as processor_mod
from rlvrx.server.engine import stats
from rlvrx.server.engine.processor import TEMPERATURE_KEY, TOP_P_KEY, ExtrapolationLogitsProcessor
from rlvrx.server.engine.step import STEP


@pytest.fixture
def table(tmp_path, monkeypatch):
    created = stats.StatsTable(str(tmp_path / "table.f64"), create=True)
    monkeypatch.setenv(stats.ENV, created.path)
    return created


def test_slots_are_handed_out_after_the_longest_rest_and_never_while_held(table):
    held = table.allocate()
    table.add(held, 0, 0.75)
    for _ in range(3 * stats.SLOTS):  # many short requests come and go
        other = table.allocate()
        assert other != held
        table.release(other)
    assert table.kept(held, 1) == 0.75
    rest = [table.allocate() for _ in range(stats.SLOTS - 1)]
    assert held not in rest and table.allocate() is None  # all in flight: the middleware answers 503
    table.release(rest[0])
    assert table.allocate() == rest[0]


def test_positions_past_the_response_are_left_out(table):
    slot = table.allocate()
    for position in range(10):
        table.add(slot, position, 0.1 * (position + 1))
    assert table.kept(slot, 10) == pytest.approx(5.5)
    assert table.kept(slot, 7) == pytest.approx(sum(0.1 * (p + 1) for p in range(7)))
    assert table.kept(slot, 7, choices=2) == pytest.approx(5.5)  # several choices: lengths unknown apart
    fresh = table.allocate()
    assert table.kept(fresh, 0) == 0.0 and table.kept(fresh, 5) == 0.0


def admitted(**extra_args) -> SamplingParams:
    params = SamplingParams(temperature=0.7, top_p=0.9, extra_args=extra_args)
    ExtrapolationLogitsProcessor.validate_params(params)
    return params


BAD_PRIVATE = [
    (TEMPERATURE_KEY, "hot"), (TEMPERATURE_KEY, 0.5), (TOP_P_KEY, -1), (TOP_P_KEY, 0.5),
    (stats.SLOT_KEY, -1), (stats.SLOT_KEY, "0"), (stats.SLOT_KEY, 3), (stats.SLOT_KEY, 10 ** 9),
    (stats.ADMISSION_KEY, "guess"), ("_rlvrx_stats_file", "/etc/passwd"), ("_rlvrx_anything", 1),
]


@pytest.mark.parametrize("key,value", BAD_PRIVATE)
def test_a_client_value_under_a_private_key_is_refused_at_admission(key, value):
    with pytest.raises(VLLMValidationError) as info:
        admitted(**{key: value})
    assert info.value.parameter == f"vllm_xargs.{key}" and key in str(info.value)


@pytest.mark.parametrize("slot", [-1, stats.SLOTS, True, 1.5])
def test_the_server_own_values_are_checked_too(slot):
    with pytest.raises(VLLMValidationError) as info:
        admitted(**stats.admit(slot))
    assert info.value.parameter == f"vllm_xargs.{stats.SLOT_KEY}"


def test_admission_accepts_the_server_slot_and_is_idempotent():
    params = admitted(**stats.admit(5), gamma=0.2)
    args = dict(params.extra_args)
    assert args[stats.SLOT_KEY] == 5 and args[TEMPERATURE_KEY] == 0.7
    ExtrapolationLogitsProcessor.validate_params(params)
    assert params.extra_args == args


class CopiedLater:
    """Stands in for a CUDA event: the worker thread waits on it like on a device copy."""

    def __init__(self):
        self.done = threading.Event()

    def synchronize(self):
        self.done.wait(timeout=30)


def new_processor(monkeypatch, table, deferred: bool) -> ExtrapolationLogitsProcessor:
    """A processor on CPU tensors; `deferred`: the GPU way (copies finish later, in a thread)."""
    monkeypatch.setattr(processor_mod, "get_tensor_model_parallel_rank", lambda: 0)
    config = SimpleNamespace(model_config=SimpleNamespace(served_model_name=["unit"]))
    processor = ExtrapolationLogitsProcessor(config, torch.device("cpu"), False)
    if deferred:
        events = []

        def start_copies(tensors):
            events.append(CopiedLater())
            threading.Timer(0.05, events[-1].done.set).start()
            return [t.clone() for t in tensors], events[-1]

        monkeypatch.setattr(host_reads, "start_copies", start_copies)
        processor.reads = host_reads.HostReads(True, table.mark_submitted, table.mark_done)
    return processor


def written(table) -> None:
    """What the API server does before reading usage: wait for the engine's submitted writes."""
    submitted = table.submitted()
    deadline = time.monotonic() + 30
    while not table.written_since(submitted):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def delta_count() -> float:
    return REGISTRY.get_sample_value("rlvrx:delta_logp_count", {"model_name": "unit", "preset": "extrapolated"}) or 0.0


def delta_buckets() -> dict[float, float]:
    """Cumulative bucket counts by upper bound (the histogram has no _sum: it takes negative values)."""
    return {bound: REGISTRY.get_sample_value("rlvrx:delta_logp_bucket", {
        "model_name": "unit", "preset": "extrapolated", "le": str(bound)}) or 0.0 for bound in metrics.DELTA_BUCKETS}


def step(processor, rl: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    STEP.publish(rl.clone(), base.clone())
    return processor.apply(rl.clone())


@pytest.mark.parametrize("deferred", [False, True], ids=["cpu", "deferred"])
def test_a_position_sampled_again_replaces_its_value_and_placeholders_are_read_when_real(table, monkeypatch, deferred):
    """A prompt prefilled in two chunks samples position 0 twice (M written once); async
    scheduling appends -1 for the token in flight and replaces it before the next step's
    processors run; a placeholder still there (a finished request) is skipped. Deferred: the
    values reach the host later, as from a GPU, and the figures are the same once written."""
    processor = new_processor(monkeypatch, table, deferred)
    slot = table.allocate()
    outputs = [[], []]
    everywhere = {"gamma": 0.5, "tau": None, "generator": "rl", "candidates": 0}
    rows = [admitted(**everywhere, **stats.admit(slot)), admitted(**everywhere)]
    for params in rows:
        params.temperature = 0.0
    processor.update_state(BatchUpdate(batch_size=2, removed=[], moved=[],
                                       added=[(i, rows[i], [1, 2, 3], outputs[i]) for i in range(2)]))
    generator = torch.Generator().manual_seed(0)
    rl, base = torch.randn(2, 40, generator=generator), torch.randn(2, 40, generator=generator)
    delta = torch.log_softmax(rl, -1) - torch.log_softmax(base, -1)
    count, buckets = delta_count(), delta_buckets()

    step(processor, rl, base)  # a non-final chunk: vLLM throws its sample away
    if deferred:  # the engine's thread went on without waiting for the copy
        assert table.submitted() == 1 and not table.written_since(1)
    step(processor, rl, base)  # the last chunk of the prompt
    written(table)
    assert delta_count() == count  # nothing was kept from the first chunk
    assert table.kept(slot, 1) == pytest.approx(1.0)  # not 2: the position was sampled twice
    for out in outputs:
        out.append(-1)  # async scheduling: the token is still on its way when the batch is updated
    processor.update_state(None)
    outputs[0][-1], outputs[1][-1] = 7, 11  # ... and arrives before the next step's processors
    step(processor, rl, base)
    written(table)
    assert delta_count() == count + 2
    observed = (float(delta[0, 7]), float(delta[1, 11]))
    assert {bound: value - buckets[bound] for bound, value in delta_buckets().items()} == {
        bound: sum(v <= bound for v in observed) for bound in metrics.DELTA_BUCKETS}
    outputs[0].append(-1)  # the first request finishes with its last token never read back
    outputs[1].append(3)
    step(processor, rl, base)
    written(table)
    assert delta_count() == count + 3
    assert table.kept(slot, 2) == pytest.approx(2.0) and table.kept(slot, 3) == pytest.approx(3.0)
    assert table.kept(slot, 4) == pytest.approx(3.0)  # nothing written past what was sampled
