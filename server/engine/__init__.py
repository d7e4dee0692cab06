"""The vLLM plugin: the two-backbone wrapper model and the extrapolating logits processor."""
