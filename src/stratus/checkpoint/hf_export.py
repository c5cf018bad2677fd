"""`stratus export --format hf`: a Hugging Face Llama directory (model.safetensors with
transformers' parameter names, config.json as a LlamaConfig, generation_config.json and
tokenizer files) that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load.

stratus's RoPE rotates halves (x1, x2 = first and second half of each head), as HF's
LlamaAttention does with `rotate_half`, and uses the same inverse frequencies, so q and k
weights are copied as they are: no permutation (the one Meta's interleaved checkpoints
need). RMSNorm, SwiGLU (gate = w1, up = w3, down = w2) and grouped-query heads map one to
one. tests/test_hf_export.py holds the logits of both equal within 1e-4.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from stratus.checkpoint.atomic import atomic_directory, refuse_existing
from stratus.checkpoint.load import load_trained
from stratus.data.tokenizer import EOS, load_tokenizer
from stratus.errors import StratusError


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


def export_hf(source: str | Path, out: str | Path, force: bool = False) -> Path:
    out = Path(out)
    refuse_existing(out, force)
    trained = load_trained(source)
    if not trained.tokenizer_path.is_file():
        raise StratusError(f"no tokenizer.json next to {trained.source}: the run directory is incomplete")
    tokenizer = load_tokenizer(trained.tokenizer_path)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise StratusError(f"the tokenizer has no {EOS} token: it was not made by `stratus prepare`")
    model, cfg = trained.model, trained.model.cfg
    names = hf_names(cfg.n_layers)
    weights = {names[k]: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight")  # tie_word_embeddings: transformers ties it on load
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")

    with atomic_directory(out) as tmp:
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", llama_config(cfg, eos, dtype))
        _write_json(
            tmp / "generation_config.json", {"bos_token_id": eos, "eos_token_id": eos, "do_sample": False}
        )
        shutil.copyfile(trained.tokenizer_path, tmp / "tokenizer.json")
        special = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
        _write_json(tmp / "special_tokens_map.json", special)
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.max_seq_len,
                "add_bos_token": False,  # stratus's tokenizer.json has no post-processor; callers add it
                "add_eos_token": False,
                "clean_up_tokenization_spaces": False,
                **special,
            },
        )
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
