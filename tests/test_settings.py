"""Per-request settings: parsing, errors naming the field, and admission in the processor."""

import math

import pytest
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError

from rlvrx.server.engine import settings
from rlvrx.server.engine.processor import TEMPERATURE_KEY, TOP_P_KEY, ExtrapolationLogitsProcessor


def test_parse_fills_defaults_and_reads_infinities():
    s = settings.parse({"tau": None, "gamma": 0.5})
    assert s.tau == math.inf and s.gamma == 0.5 and s.generator == "base" and s.candidates == 50
    assert settings.parse({"tau": "-inf"}).passthrough == "base"
    assert settings.parse({"tau": "-inf", "generator": "rl"}).passthrough == "rl"
    assert settings.parse({"preset": "rl", "tau": 0.3}).passthrough == "rl"
    assert settings.parse({"tau": -0.3}).passthrough is None
    assert settings.parse(settings.parse({"tau": None}).as_xargs()) == settings.parse({"tau": None})


def test_selection_criteria_and_their_pass_throughs():
    assert settings.parse({}).selection == "delta_logp"
    entropy = settings.parse({"selection": "entropy", "tau": 2.0})
    assert entropy.passthrough is None and settings.parse(entropy.as_xargs()) == entropy
    # A threshold no position reaches, or a coin that never lands, leaves the generator alone.
    assert settings.parse({"selection": "entropy", "tau": "inf"}).passthrough == "base"
    assert settings.parse({"selection": "entropy", "tau": "-inf"}).passthrough is None
    assert settings.parse({"selection": "random", "tau": 0, "generator": "rl"}).passthrough == "rl"
    assert settings.parse({"selection": "random", "tau": 0.2}).passthrough is None


@pytest.mark.parametrize("values,field", [
    ({"gamma": True}, "gamma"), ({"gamma": 11}, "gamma"), ({"tau": "up"}, "tau"), ({"tau": math.nan}, "tau"),
    ({"generator": "RL"}, "generator"), ({"candidates": -2}, "candidates"), ({"candidates": 1.5}, "candidates"),
    ({"preset": "both"}, "preset"), ({"selection": "kl"}, "selection"), ({"selection": None}, "selection"),
    ({"selection": "random"}, "tau"), ({"selection": "random", "tau": 1.5}, "tau"), ({"selection": "random", "tau": None}, "tau"),
])
def test_bad_values_name_the_field(values, field):
    with pytest.raises(settings.SettingsError) as info:
        settings.parse(values)
    assert info.value.field == field and field in str(info.value)


def test_admission_resolves_server_defaults_and_takes_over_temperature_and_top_p():
    previous = settings.server_defaults()
    settings.set_server_defaults(settings.Extrapolation(gamma=0.3, tau=-0.1))
    try:
        params = SamplingParams(temperature=0.8, top_p=0.9, extra_args={"candidates": 7})
        ExtrapolationLogitsProcessor.validate_params(params)
        args = params.extra_args
        assert (args["gamma"], args["tau"], args["candidates"]) == (0.3, -0.1, 7)
        assert (args[TEMPERATURE_KEY], args[TOP_P_KEY]) == (0.8, 0.9)
        assert (params.temperature, params.top_p) == (1.0, 1.0)
        ExtrapolationLogitsProcessor.validate_params(params)  # admitting twice changes nothing
        assert params.extra_args == args and params.temperature == 1.0

        plain = SamplingParams(temperature=0.8, top_p=0.9, extra_args={"preset": "rl"})
        ExtrapolationLogitsProcessor.validate_params(plain)
        assert (plain.temperature, plain.top_p) == (0.8, 0.9) and TEMPERATURE_KEY not in plain.extra_args

        greedy = SamplingParams(temperature=0.0)
        ExtrapolationLogitsProcessor.validate_params(greedy)
        assert greedy.temperature == 0.0 and greedy.extra_args[TEMPERATURE_KEY] == 0.0
    finally:
        settings.set_server_defaults(previous)


def test_admission_refuses_bad_values_with_the_field():
    with pytest.raises(VLLMValidationError) as info:
        ExtrapolationLogitsProcessor.validate_params(SamplingParams(extra_args={"generator": "teacher"}))
    assert info.value.parameter == "generator"
