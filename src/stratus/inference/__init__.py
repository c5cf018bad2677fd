"""Sampling and generation with a KV cache."""
