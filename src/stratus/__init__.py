"""stratus: train, survive, plan and serve GPT-style language models."""

__version__ = "0.1.0"
