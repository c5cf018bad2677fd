"""Where a CPU training step's time and memory go, beside the planner's terms: the figures
behind docs/planning.md's "Against stratus's own runs".

    python benchmarks/cpu_profile.py runs/demo     # any CPU run's directory (its config.toml)

Prints, for one process at the run's micro batch:
- the step's time by op family (torch.profiler): matmuls, attention, loss, optimizer, the rest;
- the bytes the eager block moves outside matmuls and attention, per token per layer per
  unit of (h + ffn), counted with a dispatch mode (the planner's elementwise_bytes term);
- the peak RSS after the model, the forward, the backward, the optimizer and four steps.
Asserts nothing.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stratus.config import load_config
from stratus.model import Transformer

COMPUTE = {
    "mm",
    "addmm",
    "bmm",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "embedding",
    "embedding_dense_backward",
}
NO_DATA = {"view", "_unsafe_view", "t", "transpose", "expand", "permute", "unsqueeze", "squeeze", "slice"}
NO_DATA |= {"select", "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "reshape"}
NO_DATA |= {"_reshape_alias", "empty", "empty_like", "new_empty", "zeros", "ones", "zeros_like"}


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class Bytes(TorchDispatchMode):
    """Bytes read and written by every op outside matmuls, attention and views."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in COMPUTE | NO_DATA:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.total += sum(t.numel() * t.element_size() for t in tensors)
        return out


def main() -> None:
    cfg = load_config(f"{sys.argv[1]}/config.toml")
    mc, mb, seq = cfg.model, cfg.train.micro_batch, cfg.data.seq_len
    print(f"import: {rss_gib():.3f} GiB peak RSS")
    torch.manual_seed(0)
    model = Transformer(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, mc.vocab_size, (mb, seq + 1))
    print(f"model: {rss_gib():.3f}")

    def step(say: bool = False) -> None:
        loss = F.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        if say:
            print(f"forward: {rss_gib():.3f}")
        loss.backward()
        if say:
            print(f"backward: {rss_gib():.3f}")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if say:
            print(f"optimizer: {rss_gib():.3f}")

    step(True)
    for _ in range(3):
        step()
    print(f"after 4 steps: {rss_gib():.3f}")
    start = time.perf_counter()
    for _ in range(5):
        step()
    print(f"\nstep: {(time.perf_counter() - start) / 5:.3f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    families: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        name = e.key
        if any(s in name for s in ("aten::mm", "aten::addmm", "aten::bmm")):
            kind = "matmuls"
        elif "attention" in name:
            kind = "attention"
        elif "adam" in name.lower():
            kind = "optimizer"
        elif "softmax" in name or "nll" in name or "cross_entropy" in name:
            kind = "loss"
        else:
            kind = "the rest"
        families[kind] += e.self_cpu_time_total / 3 / 1e6
    for kind, seconds in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:10s} {seconds:.3f} s")
    # elementwise bytes of one block: the difference between three layers and one
    per = []
    for layers in (1, 3):
        net = Transformer(mc.model_copy(update={"n_layers": layers}))
        with Bytes() as counted:
            net(x[:8, :-1]).sum().backward()
        per.append(counted.total)
    tokens, width = 8 * seq, mc.d_model + mc.ffn_width
    bytes_per = (per[1] - per[0]) / 2 / tokens / width
    print(f"\nelementwise: {bytes_per:.1f} B a token a layer per (h + ffn), fp32")


if __name__ == "__main__":
    main()
