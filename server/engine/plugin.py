"""vLLM general plugin: registers the wrapper architecture in every vLLM process."""

from server.engine.pair import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "server.engine.model:ExtrapolationForCausalLM")
