"""The transformer and its KV cache (its parameter and FLOP counts are stratus.counts)."""

from stratus.model.kv_cache import KVCache
from stratus.model.llama import Transformer

__all__ = ["KVCache", "Transformer"]
