"""vLLM general plugin: registers the wrapper architectures in every vLLM process, records
vLLM's first error there for `rlvrx serve`'s start-up message, scores prompts per served name
(server.engine.prompt_scoring), gives each row of a stacked engine its own adapter
(server.engine.adapter_rows) and loads adapters at run time (server.engine.adapter_loading), reads the RL model's generation config from a stacked engine's
adapter (server.engine.adapter_generation_config), makes the engine core and the workers drain
under a signal to the whole process group (server.engine.signals), verifies speculative drafts
against the rule's distribution (server.engine.speculative) and gates the n-gram drafter on the batch size
(server.engine.draft_gate), and works around two vLLM CPU bugs
(server.engine.cpu_seeded_chunks, server.engine.cpu_spec_expand)."""

from rlvrx.server.engine import (adapter_generation_config, adapter_loading, adapter_rows, cpu_seeded_chunks,
                                 cpu_spec_expand, draft_gate, prompt_scoring, signals, speculative, startup_error)
from rlvrx.server.engine.pair import ARCHITECTURE, STACKED_ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "rlvrx.server.engine.model:ExtrapolationForCausalLM")
    if STACKED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(STACKED_ARCHITECTURE, "rlvrx.server.engine.stacked:StackedLoraForCausalLM")
    startup_error.record_in_this_process()
    cpu_seeded_chunks.install()
    cpu_spec_expand.install()
    prompt_scoring.install()
    adapter_generation_config.install()
    signals.install()
    speculative.install()
    draft_gate.install()
    adapter_rows.install()
    adapter_loading.install()
