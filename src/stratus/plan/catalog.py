"""The hardware catalog as data: GPUs, links, networks, node presets, software profiles and CPU hosts.

The built-in catalog.toml ships with the package; a user TOML file with the same tables adds
entries or replaces an entry of the same name whole, so a site can describe its own nodes
without touching stratus.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stratus.errors import StratusError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BUILTIN = Path(__file__).with_name("catalog.toml")
ENV_VAR = "STRATUS_PLAN_CATALOG"
TABLES = ("gpu", "link", "network", "node", "software", "cpu")


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    bf16_tflops: float
    hbm_gb: float
    hbm_gbps: float
    gemm_fraction: float  # best fraction of peak a large bf16 matmul reaches on the real chip
    link: str
    cuda_name: str = ""  # what torch.cuda.get_device_name contains for this GPU ("" = never matched)
    # bytes per activation element at the compute dtype stratus uses on the device (its
    # dtype = "auto": bf16 on a GPU, fp32 on a CPU); bf16_tflops is the peak at that dtype
    compute_bytes: int = 2

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12


@dataclass(frozen=True)
class Link:
    key: str
    name: str
    gbps_per_gpu: float  # bidirectional total, as vendors quote NVLink
    hop_latency_us: float

    @property
    def bytes_per_s(self) -> float:
        """One direction: what a ring collective can push out of each GPU."""
        return self.gbps_per_gpu * 1e9 / 2


@dataclass(frozen=True)
class Network:
    key: str
    name: str
    port_gbit: float
    ports_per_node: int
    hop_latency_us: float

    @property
    def port_bytes_per_s(self) -> float:
        return self.port_gbit * 1e9 / 8


@dataclass(frozen=True)
class Software:
    key: str
    name: str
    flash_attention: bool
    sequence_parallel: bool
    tp_overlap: float
    dp_overlap: bool
    p2p_overlap: bool
    grad_bytes: int
    fused_elementwise: bool
    zero_levels: tuple[int, ...] = (1, 2, 3)  # the sharding levels the framework runs
    stratus: bool = False  # stratus itself: a layout must pass the trainer's own checks

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero_levels", tuple(self.zero_levels))  # TOML gives a list


@dataclass(frozen=True)
class Cpu:
    """A CPU host as measured by benchmarks/cpu_entry.py: what a CPU run of stratus (fp32,
    gloo) is planned with (plan/host.py turns it into per-rank figures)."""

    key: str
    name: str
    cores: int
    ram_gb: float
    fp32_gflops_per_core: float  # a large matmul on one thread
    gemm_half_dim: float  # the matmul size curve's half point, from a small matmul's rate
    attention_fraction: float  # SDPA's causal forward + backward rate / the large matmul's
    core_gbps: float  # copy bandwidth (read + write) of one thread
    dram_gbps: float  # ... of all threads
    kernel_us: float  # fixed cost per kernel of a block's forward + backward
    gloo_gbps: float  # all-reduce bus bandwidth over loopback
    gloo_latency_us: float  # a 4-byte all-reduce
    rss_baseline_gb: float  # resident memory before the model: torch, the trainer, kernels


@dataclass(frozen=True)
class Cluster:
    gpu: Gpu
    link: Link
    network: Network
    gpus_per_node: int
    nodes: int
    preset: str | None = None

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def describe(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "gpu": self.gpu.key,
            "gpus": self.gpus,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "network": self.network.key,
            "intra_node_link": self.link.key,
            "peak_tflops_per_gpu": self.gpu.bf16_tflops,
            "hbm_gb": self.gpu.hbm_gb,
        }


class Catalog:
    def __init__(self, tables: dict[str, dict[str, dict[str, Any]]]):
        self.tables = tables

    def _entry(self, table: str, key: str) -> dict[str, Any]:
        entries = self.tables.get(table, {})
        if key not in entries:
            known = ", ".join(sorted(entries))
            raise StratusError(f"unknown {table} {key!r}; known: {known} (or add it in a --catalog file)")
        return entries[key]

    def _build(self, cls: type, table: str, key: str) -> Any:
        raw = self._entry(table, key)
        declared = cls.__dataclass_fields__
        fields = [f for f in declared if f != "key"]
        missing = [f for f in fields if f not in raw and declared[f].default is dataclasses.MISSING]
        if missing:
            raise StratusError(f"catalog {table}.{key} lacks {', '.join(missing)}")
        return cls(key=key, **{f: raw[f] for f in fields if f in raw})

    def gpu(self, key: str) -> Gpu:
        return self._build(Gpu, "gpu", key)

    def link(self, key: str) -> Link:
        return self._build(Link, "link", key)

    def network(self, key: str) -> Network:
        return self._build(Network, "network", key)

    def software(self, key: str) -> Software:
        return self._build(Software, "software", key)

    def cpu(self, key: str) -> Cpu:
        return self._build(Cpu, "cpu", key)

    def gpu_for_device(self, device_name: str, memory_gib: float | None = None) -> Gpu | None:
        """The catalog's entry for a GPU as torch names it ("NVIDIA H100 80GB HBM3"): the
        longest cuda_name it contains, and of equal names the memory closest to the device's.
        The trainer's MFU and the planner use this one table."""
        found = [g for g in map(self.gpu, self.names("gpu")) if g.cuda_name and g.cuda_name in device_name]
        if not found:
            return None
        return min(
            found,
            key=lambda g: (-len(g.cuda_name), abs(g.hbm_gb - memory_gib) if memory_gib is not None else 0.0),
        )

    def names(self, table: str) -> list[str]:
        return sorted(self.tables.get(table, {}))

    def cluster(
        self,
        *,
        preset: str | None = None,
        nodes: int | None = None,
        gpu: str | None = None,
        gpus: int | None = None,
        gpus_per_node: int | None = None,
        network: str | None = None,
    ) -> Cluster:
        """A cluster from a node preset and a node count, or from a GPU, a GPU count and a network."""
        if preset is not None:
            node = self._entry("node", preset)
            gpu = gpu or node["gpu"]
            network = network or node["network"]
            gpus_per_node = gpus_per_node or int(node["gpus_per_node"])
            if nodes is None and gpus is None:
                raise StratusError("--cluster needs --nodes N (or --gpus N)")
        if gpu is None:
            raise StratusError("give the cluster as --cluster PRESET --nodes N, or --gpu GPU --gpus N")
        g = self.gpu(gpu)
        gpus_per_node = gpus_per_node or 8
        if nodes is None:
            if gpus is None:
                raise StratusError("give the cluster size: --gpus N or --nodes N")
            if gpus < 1 or gpus % gpus_per_node and gpus > gpus_per_node:
                raise StratusError(f"--gpus {gpus} is not a whole number of {gpus_per_node}-GPU nodes")
            if gpus < gpus_per_node:
                gpus_per_node, nodes = gpus, 1
            else:
                nodes = gpus // gpus_per_node
        if nodes < 1 or gpus_per_node < 1:
            raise StratusError("the cluster needs at least one node of at least one GPU")
        net = self.network(network or "ib-ndr-400x8")
        return Cluster(g, self.link(g.link), net, gpus_per_node, nodes, preset)


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StratusError(f"catalog file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise StratusError(f"catalog file {path} is not valid TOML: {e}") from None


def load_catalog(user_file: str | Path | None = None) -> Catalog:
    """The built-in catalog, with a user file's entries (argument, else $STRATUS_PLAN_CATALOG) on top."""
    tables: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in TABLES}
    user = user_file or os.environ.get(ENV_VAR) or None
    for path in [BUILTIN] + ([Path(user)] if user else []):
        for table, entries in _read(path).items():
            if table not in TABLES or not isinstance(entries, dict):
                raise StratusError(
                    f"catalog file {path}: unknown table [{table}]; known: {', '.join(TABLES)}"
                )
            tables[table].update(entries)  # a same-named entry is replaced whole
    return Catalog(tables)
