"""`train.init_from`: start a run from the weights of another (fine-tuning).

The model's shape comes from the source; the vocabulary may grow, for the special tokens
that chat data adds after the source's own (so every id the source knows keeps its
meaning). New embedding and output rows start at the mean of the source's rows, so a new
token begins as an average token rather than as noise that dominates the logits. The
optimizer and schedule start fresh. Only rank 0 reads the weights; they reach every rank's
shards (FSDP, TP) through one broadcast.
"""

from __future__ import annotations

import logging

import torch
from tokenizers import Tokenizer
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from stratus.checkpoint.load import load_trained, trained_config
from stratus.config import Config
from stratus.distributed.env import DistEnv
from stratus.errors import StratusError
from stratus.model import Transformer

log = logging.getLogger("stratus.train")
GROWN = ("tok_embeddings.weight", "output.weight")


def resolve_init(cfg: Config, tokenizer_vocab: int, data_tokenizer: Tokenizer) -> Config:
    """cfg with the model shape of train.init_from, its vocabulary grown to hold the data's
    tokenizer. Refuses model keys set to other values than the source's, and data tokenized
    with a tokenizer that does not extend the source's."""
    source = cfg.train.init_from
    src_cfg, src_tok_path = trained_config(source)
    # The vocabulary may grow, and the RoPE table (no weights) may cover a longer context.
    for key in sorted(cfg.model.model_fields_set - {"vocab_size", "max_seq_len"}):
        if getattr(cfg.model, key) != getattr(src_cfg, key):
            raise StratusError(
                f"model.{key} = {getattr(cfg.model, key)!r} but train.init_from {source} has "
                f"{getattr(src_cfg, key)!r}: a fine-tuned model keeps its source's shape; drop model.{key}"
            )
    if src_tok_path.is_file():
        src_vocab = Tokenizer.from_file(str(src_tok_path)).get_vocab(with_added_tokens=True)
        theirs = data_tokenizer.get_vocab(with_added_tokens=True)
        changed = [t for t, i in src_vocab.items() if theirs.get(t) != i]
        if changed:
            raise StratusError(
                f"data.path's tokenizer does not extend the one of train.init_from {source} (token "
                f"{changed[0]!r} differs): prepare the data with --tokenizer {src_tok_path}"
            )
    vocab = max(src_cfg.vocab_size, -(-tokenizer_vocab // 64) * 64, cfg.model.vocab_size)
    max_len = cfg.model.max_seq_len if "max_seq_len" in cfg.model.model_fields_set else src_cfg.max_seq_len
    model = src_cfg.model_copy(update={"vocab_size": vocab, "max_seq_len": max_len})
    return cfg.model_copy(update={"model": model})


def grown(weights: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """The source's weights with embedding and output rows appended up to vocab."""
    out = dict(weights)
    for name in GROWN:
        w = out.get(name)
        if w is None or w.shape[0] >= vocab:
            continue
        extra = w.mean(dim=0, keepdim=True).expand(vocab - w.shape[0], -1)
        out[name] = torch.cat([w, extra])
    return out


def resized(model: Transformer, vocab: int, max_seq_len: int = 0) -> Transformer:
    """model itself if it holds vocab tokens and max_seq_len positions, else a copy with
    grown embedding and output rows (as fine-tuning starts) and a longer RoPE table."""
    cfg = model.cfg
    vocab = max(cfg.vocab_size, -(-vocab // 64) * 64)
    max_seq_len = max(cfg.max_seq_len, max_seq_len)
    if (vocab, max_seq_len) == (cfg.vocab_size, cfg.max_seq_len):
        return model
    bigger = Transformer(cfg.model_copy(update={"vocab_size": vocab, "max_seq_len": max_seq_len}))
    bigger.load_state_dict(grown(model.state_dict(), vocab))
    return bigger.to(next(model.parameters()).device).eval()


def load_initial(model: nn.Module, cfg: Config, env: DistEnv) -> None:
    """Collective: fill the (sharded) model with train.init_from's weights."""
    state: dict = {}
    if env.is_main:
        trained = load_trained(cfg.train.init_from)
        state = grown(trained.model.state_dict(), cfg.model.vocab_size)
        if cfg.model.tie_embeddings:
            state.pop("output.weight", None)
        log.info(
            "initialized from %s (step %d); vocabulary %d -> %d",
            trained.source,
            trained.step,
            trained.model.cfg.vocab_size,
            cfg.model.vocab_size,
        )
    # A pipeline stage's model holds only its own layers: the other stages' weights are
    # expected extras there. Every weight the model does have must be filled.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.distributed, strict=False)
    with torch.no_grad():
        keys = set_model_state_dict(
            model, state if env.is_main or not env.distributed else {}, options=options
        )
    tied = {"output.weight"} if cfg.model.tie_embeddings else set()
    missing = sorted(set(keys.missing_keys) - tied)
    extra = sorted(keys.unexpected_keys) if cfg.parallel.pp == 1 else []
    if missing or extra:
        raise StratusError(
            f"train.init_from = {cfg.train.init_from} does not fit the model: missing {missing[:4]}, "
            f"unexpected {extra[:4]}; initialize from a run of the same model shape"
        )
