"""Direct preference optimization (Rafailov et al., 2023): `train.objective = "dpo"`.

On a pair (prompt, chosen y+, rejected y-) the loss is

    -log sigmoid(beta * ((log p(y+) - log ref(y+)) - (log p(y-) - log ref(y-))))

where log p sums the policy's log-probabilities over the answer's tokens and ref is the
frozen reference: the model the run starts from (the SFT model, through train.init_from).
The reference's log-probabilities are computed once, before the first update, by the same
sharded model (so the reference is sharded exactly as the policy, under any layout), and
stored in the run directory: a resumed run reads them back instead of scoring with weights
that have since moved. Reported: the loss, the reward margin (beta times the difference
above) and the preference accuracy (the share of pairs with a positive margin).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from stratus.atomic import atomic_file
from stratus.data.packing import IGNORE, PairSampler
from stratus.distributed import env as denv
from stratus.errors import StratusError

log = logging.getLogger("stratus.train")
REFERENCE_FILE = "reference_logps.npy"


def answer_logps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> torch.Tensor:
    """Each row's summed log-probability of its targets that are trained on (the answer)."""
    with autocast:
        logits = model(x)
    per_token = F.cross_entropy(
        logits.float().flatten(0, 1), y.flatten(), reduction="none", ignore_index=IGNORE
    )
    return -per_token.view(y.shape).sum(dim=-1)


class DPOLoss:
    stat_names = ("reward_margin", "preference_accuracy", "chosen_reward", "rejected_reward")

    def __init__(self, beta: float, reference: torch.Tensor):
        self.beta, self.reference = beta, reference  # (pairs, 2): chosen, rejected

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...], autocast) -> tuple:
        x, y, pairs = batch
        logps = answer_logps(model, x, y, autocast).view(-1, 2)
        ref = self.reference[pairs]
        rewards = self.beta * (logps - ref)  # implicit rewards of chosen and rejected
        margin = rewards[:, 0] - rewards[:, 1]
        loss = -F.logsigmoid(margin).sum()
        stats = torch.stack(
            [margin.sum(), (margin > 0).float().sum(), rewards[:, 0].sum(), rewards[:, 1].sum()]
        )
        return loss, stats


@torch.no_grad()
def reference_logps(job, autocast: contextlib.AbstractContextManager, resuming: bool) -> torch.Tensor:
    """Collective: the starting model's answer log-probabilities of every training pair,
    (pairs, 2), computed once and kept in the run directory."""
    env, sampler = job.env, job.sampler
    path = Path(job.run) / REFERENCE_FILE
    n = sampler.n_windows
    if path.is_file():
        table = np.load(path)
        if table.shape != (n, 2):
            raise StratusError(
                f"{path} holds reference log-probabilities of {table.shape[0]} pairs, the data {n}: "
                "the data changed under the run; start a new run.dir"
            )
        return torch.from_numpy(table).to(env.device)
    if resuming:
        raise StratusError(
            f"{path} is missing: a DPO run resumes with the reference log-probabilities it started "
            "with; start a new run.dir"
        )
    model, micro, dp, dp_rank = job.model, job.cfg.train.micro_batch, job.layout.dp, job.dp_rank
    was_training = model.training
    model.eval()
    table = torch.full((n, 2), -torch.inf, dtype=torch.float64, device=env.device)
    batches = -(-n // micro)
    # Every rank runs the same number of forwards (FSDP and TP gather inside them); a rank
    # past the end repeats the first batch and drops it.
    for round_ in range(-(-batches // dp)):
        b = round_ * dp + dp_rank
        first = (b if b < batches else 0) * micro
        pairs = np.arange(first, min(first + micro, n))
        x, y, idx = (t.to(env.device) for t in sampler.pairs(pairs))
        logps = answer_logps(model, x, y, autocast).double().view(-1, 2)
        if b < batches:
            table[idx] = logps
    if env.distributed:
        dist.all_reduce(table, op=dist.ReduceOp.MAX)  # tensor-parallel peers hold the same values
    model.train(was_training)
    if env.is_main:
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, table.cpu().numpy())
    denv.barrier(env)
    log.info("reference log-probabilities of %d pairs computed and stored in %s", n, path)
    return table


def build_objective(job, autocast, resuming: bool) -> DPOLoss:
    """Collective (every rank raises the same errors, before any collective of its own)."""
    if not isinstance(job.sampler, PairSampler):
        raise StratusError(
            "train.objective = dpo needs preference pairs: prepare them with --format preferences"
        )
    if job.cfg.parallel.loss_parallel:
        raise StratusError(
            "train.objective = dpo needs each answer's log-probability, which parallel.loss_parallel "
            "does not give: set parallel.loss_parallel = false"
        )
    return DPOLoss(job.cfg.train.dpo_beta, reference_logps(job, autocast, resuming))
