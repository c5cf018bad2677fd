"""The transformer, its KV cache, and its parameter/FLOP counts."""

from stratus.model.counts import flops_per_token, param_count
from stratus.model.kv_cache import KVCache
from stratus.model.llama import Transformer

__all__ = ["KVCache", "Transformer", "flops_per_token", "param_count"]
