"""Tokenizer, corpus preparation (corpus -> shards + manifest), and the deterministic loader."""
