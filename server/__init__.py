"""rlvr-extrapolate: serve the extrapolated policy of an RLVR model with vLLM."""
