"""The Hugging Face Llama format as stratus reads and writes it: parameter names, the
config.json fields, and the way back from them to a ModelConfig and stratus's weights.
Shared by the export (hf_export.py) and the loader (load.py); it imports neither."""

from __future__ import annotations

import torch
from pydantic import ValidationError

from stratus.config import ModelConfig

STRATUS_KEY = "stratus"
# What decides the function a model computes: the stored config and the Llama fields must agree on these.
SAME_MODEL = (
    "vocab_size",
    "n_layers",
    "d_model",
    "n_heads",
    "kv_heads",
    "head_dim",
    "ffn_width",
    "max_seq_len",
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
)


def hf_names(n_layers: int) -> dict[str, str]:
    """stratus parameter name -> transformers LlamaForCausalLM parameter name."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    names["output.weight"] = "lm_head.weight"
    per_layer = {
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight",
        "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight",
        "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def llama_config(cfg, eos: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_width,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # ... and 5.x this
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # documents start after end-of-text in training: it plays BOS as well as EOS
        "bos_token_id": eos,
        "eos_token_id": eos,
        "pad_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


def _validated(raw: dict) -> ModelConfig:
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as e:
        raise ValueError(one_line(e)) from None


def _from_llama_fields(info: dict) -> ModelConfig:
    """The inverse of llama_config, for a Llama config whose model stratus's Transformer
    computes exactly; ValueError (one line) naming the first field it cannot."""
    architectures = info.get("architectures") or ["LlamaForCausalLM"]
    if "LlamaForCausalLM" not in architectures:
        raise ValueError(f"architectures {architectures} has no LlamaForCausalLM")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(info.get(key), int):
            raise ValueError(f"config.json gives no {key}")
    if info.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"hidden_act {info['hidden_act']!r}: stratus's SwiGLU uses silu")
    for flag in ("attention_bias", "mlp_bias"):
        if info.get(flag):
            raise ValueError(f"{flag} is true: stratus's projections have no bias")
    for key in ("rope_scaling", "rope_parameters"):
        rope = info.get(key)
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if kind != "default":
            raise ValueError(f"{key} is {kind!r}: stratus has plain RoPE only")
    d_model, heads = info["hidden_size"], info["num_attention_heads"]
    head_dim = info.get("head_dim")
    if head_dim is not None and head_dim * heads != d_model:
        raise ValueError(f"head_dim {head_dim} x {heads} heads is not hidden_size {d_model}")
    rope = info.get("rope_parameters") if isinstance(info.get("rope_parameters"), dict) else {}
    # absent fields take LlamaConfig's defaults, as transformers would
    return _validated(
        {
            "vocab_size": info["vocab_size"],
            "n_layers": info["num_hidden_layers"],
            "d_model": d_model,
            "n_heads": heads,
            "n_kv_heads": info.get("num_key_value_heads") or heads,
            # explicit: rounding 8/3 d_model need not give back the width of a model trained elsewhere
            "ffn_hidden": info["intermediate_size"],
            "max_seq_len": info.get("max_position_embeddings", 2048),
            "rope_theta": float(rope.get("rope_theta", info.get("rope_theta", 10000.0))),
            "norm_eps": info.get("rms_norm_eps", 1e-6),
            "tie_embeddings": bool(info.get("tie_word_embeddings", False)),
            "init_std": info.get("initializer_range", 0.02),
        }
    )


def model_config_from_hf(info: dict) -> tuple[ModelConfig, int]:
    """(model config, step) of a Llama config.json: the ModelConfig export_hf stored beside
    the Llama fields, or for a directory without one the Llama fields mapped back (step 0,
    unknown). ValueError (one line) when stratus cannot compute the model, or the two disagree
    (config.json was edited), since transformers would then run another model than stratus."""
    mapped = _from_llama_fields(info)
    block = info.get(STRATUS_KEY)
    if not isinstance(block, dict) or "model" not in block:
        return mapped, 0
    stored = _validated(block["model"])
    for name in SAME_MODEL:
        if getattr(stored, name) != getattr(mapped, name):
            raise ValueError(
                f"its {STRATUS_KEY}.model gives {name} = {getattr(stored, name)} but its Llama fields "
                f"{getattr(mapped, name)}: config.json was edited"
            )
    return stored, int(block.get("step") or 0)


def stratus_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' parameter names -> stratus's, the inverse of export_hf's renaming. Names
    hf_names does not know are kept as they are, so that the load names them as unexpected."""
    ours = {theirs: mine for mine, theirs in hf_names(cfg.n_layers).items()}
    if cfg.tie_embeddings:  # transformers ties lm_head to the embedding on load, ignoring a stored one
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    return {ours.get(k, k): v for k, v in weights.items()}


def one_line(e: ValidationError) -> str:
    """pydantic's message spans lines; the CLI prints one."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'model'}: {err['msg']}" for err in e.errors())
