"""The HTTP additions to vLLM's OpenAI server: request fields, presets, usage statistics."""
