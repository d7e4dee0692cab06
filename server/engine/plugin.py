"""vLLM general plugin: registers the wrapper architecture in every vLLM process, and
records vLLM's first error there for `rlvrx serve`'s start-up message."""

from server.engine import startup_error
from server.engine.pair import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "server.engine.model:ExtrapolationForCausalLM")
    startup_error.record_in_this_process()
