"""The RL model's generation config on the stacked path.

vLLM takes a model's sampling defaults and extra stop tokens from the generation_config.json of
the engine's model path (`--generation-config auto`, its default). On the stacked path that path
is the base, and the RL model is base + adapter: when the adapter directory carries a
generation_config.json (`rlvrx lora-extract` copies the RL checkpoint's; PEFT's save_pretrained and
the trainers built on it write none), that file is the RL model's, and `<name>` and `<name>:rl`
must get it as vLLM serving the merged model would. vLLM has no plugin surface for where "auto"
reads from, and `--generation-config DIR` is not the same thing (vLLM then also caps every
request's max_tokens at DIR's max_new_tokens, which "auto" does not), so
`ModelConfig.try_get_generation_config` is wrapped: under "auto", for a stacked engine whose
adapter has the file, it reads the adapter directory. Without the file the base's config stands
for both models, as it does for PEFT's own `generate`.
"""

import copy
from pathlib import Path

FILE = "generation_config.json"


def rl_generation_config_dir(model_config) -> str | None:
    """The adapter directory whose generation config "auto" means for this engine, if any."""
    adapter = getattr(model_config.hf_config, "rlvrx_adapter_path", None)
    if model_config.generation_config == "auto" and adapter and (Path(adapter) / FILE).is_file():
        return adapter
    return None


def install() -> None:
    """Wrap ModelConfig.try_get_generation_config (called in every vLLM process)."""
    from vllm.config import ModelConfig

    original = ModelConfig.try_get_generation_config
    if getattr(original, "reads_adapter_dir", False):
        return

    def try_get_generation_config(self) -> dict:
        adapter = rl_generation_config_dir(self)
        if adapter is None:
            return original(self)
        rl = copy.copy(self)
        rl.generation_config = adapter
        return original(rl)

    try_get_generation_config.reads_adapter_dir = True
    ModelConfig.try_get_generation_config = try_get_generation_config
