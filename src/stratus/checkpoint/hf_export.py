"""`stratus export --format hf`: a Hugging Face Llama directory (model.safetensors with
transformers' parameter names, config.json as a LlamaConfig, generation_config.json and
tokenizer files) that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` load.

stratus's RoPE rotates halves (x1, x2 = first and second half of each head), as HF's
LlamaAttention does with `rotate_half`, and uses the same inverse frequencies, so q and k
weights are copied as they are: no permutation (the one Meta's interleaved checkpoints
need). RMSNorm, SwiGLU (gate = w1, up = w3, down = w2) and grouped-query heads map one to
one. tests/test_hf_export.py holds the logits of both equal within 1e-4.

stratus reads such a directory back (`generate`, `serve`, `eval`): config.json also carries
the exact ModelConfig and step under "stratus" (transformers keeps an unknown key as a plain
attribute and ignores it); an export without that block, or another Llama model of the same
architecture, is rebuilt from the Llama fields. tests/test_hf_load.py holds both equal to the run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from stratus.atomic import atomic_directory, refuse_existing
from stratus.checkpoint.hf_format import STRATUS_KEY, hf_names, llama_config
from stratus.checkpoint.load import load_trained
from stratus.data.chat_template import find_template, write_config
from stratus.data.tokenizer import EOS, load_tokenizer
from stratus.errors import StratusError


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
        config = llama_config(cfg, eos, dtype)
        config[STRATUS_KEY] = {"step": trained.step, "source": str(trained.source), "model": cfg.model_dump()}
        _write_json(tmp / "config.json", config)
        # The chat contract: the template the model was trained with, and its end of turn,
        # on which transformers and vLLM stop generating (as they stop on EOS).
        template = find_template(trained.tokenizer_path.parent)
        stops = [eos, *(i for i in template.stop_ids(tokenizer) if i != eos)]
        _write_json(
            tmp / "generation_config.json",
            {"bos_token_id": eos, "eos_token_id": stops if len(stops) > 1 else eos, "do_sample": False},
        )
        shutil.copyfile(trained.tokenizer_path, tmp / "tokenizer.json")
        write_config(tmp, template, cfg.max_seq_len)
        special = {"bos_token": EOS, "eos_token": template.end_of_turn, "unk_token": EOS, "pad_token": EOS}
        _write_json(tmp / "special_tokens_map.json", special)
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
