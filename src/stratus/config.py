"""One typed config tree: a TOML file plus dotted CLI overrides, validated once at the edge.

Every field carries a one-line description with its unit; `stratus config show` prints them.
A mistake (unknown key, wrong type, out-of-range or inconsistent values) raises StratusError
with one line that names the key, which the CLI turns into exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stratus.errors import StratusError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelConfig(Section):
    """The transformer's shape; changing any of these makes old checkpoints unloadable."""

    vocab_size: int = Field(
        0,
        ge=0,
        description="vocabulary size in tokens; 0 = the prepared tokenizer's, rounded up to a multiple of 64",
    )
    n_layers: int = Field(6, ge=1, description="number of transformer blocks")
    d_model: int = Field(384, ge=8, description="hidden width (channels per token)")
    n_heads: int = Field(6, ge=1, description="attention (query) heads; must divide d_model")
    n_kv_heads: int | None = Field(
        None, ge=1, description="key/value heads for grouped-query attention; none = n_heads"
    )
    ffn_hidden: int | None = Field(
        None,
        ge=1,
        description="SwiGLU hidden width; none = int(8/3 d_model) rounded up to ffn_multiple_of (as Llama)",
    )
    ffn_multiple_of: int = Field(
        256, ge=1, description="rounding multiple for the default SwiGLU width (channels)"
    )
    max_seq_len: int = Field(1024, ge=1, description="longest sequence the RoPE table covers (tokens)")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    tie_embeddings: bool = Field(False, description="share the token embedding with the output projection")
    init_std: float = Field(
        0.02, gt=0, description="std of the normal init; output projections are scaled by 1/sqrt(2 n_layers)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model / model.n_heads = {self.d_model // self.n_heads} must be even for RoPE"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_kv_heads ({self.kv_heads}) must divide model.n_heads ({self.n_heads})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        m = self.ffn_multiple_of
        return m * -(-(8 * self.d_model // 3) // m)


class DataConfig(Section):
    path: str = Field(
        "data/stdlib", description="prepared data directory (from `stratus prepare`), holding manifest.json"
    )
    seq_len: int = Field(256, ge=1, description="tokens per training sequence; at most model.max_seq_len")
    verify: bool = Field(
        True,
        description="check every shard's sha256 against the manifest, in the background while training (each rank a share); sizes are always checked at start",
    )
    format: Literal["text", "chat"] = Field(
        "text",
        description="text = a plain token stream (pretraining); chat = conversations from `stratus prepare --format chat`, packed whole, trained on the assistant's tokens only",
    )


class TrainConfig(Section):
    steps: int = Field(
        1000, ge=0, description="optimizer steps to train in total (a resumed run continues to this)"
    )
    stop_at: int = Field(
        0,
        ge=0,
        description="end this invocation at this step (with a checkpoint) without changing the schedule; 0 = train.steps",
    )
    seed: int = Field(1337, ge=0, description="seed for init and data order")
    deterministic: bool = Field(
        False, description="deterministic kernels, so a resumed run matches an uninterrupted one bit for bit"
    )
    micro_batch: int = Field(8, ge=1, description="sequences per forward/backward pass on each rank")
    global_batch: int = Field(
        0,
        ge=0,
        description="sequences per optimizer step over all ranks; 0 = micro_batch x ranks (no accumulation)",
    )
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(3e-5, ge=0, description="learning rate at the end of the cosine decay")
    warmup_steps: int = Field(100, ge=0, description="steps of linear warmup from 0 to lr")
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW decoupled weight decay (matrices only, not norms)"
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 = off")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="compute dtype; auto = bf16 autocast on GPU, fp32 on CPU"
    )
    compile: bool = Field(False, description="torch.compile each transformer block")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default")
    objective: Literal["lm", "dpo"] = Field(
        "lm",
        description="lm = next-token loss (pretraining, and SFT on chat data); dpo = direct preference optimization on pairs from `stratus prepare --format preferences`, against the starting model (train.init_from) as the frozen reference",
    )
    dpo_beta: float = Field(
        0.1, gt=0, description="DPO's beta: how far the policy may move from the reference (larger = less)"
    )
    init_from: str = Field(
        "",
        description="start from the weights of this run, checkpoint or export (fine-tuning: the model's shape is taken from it; a fresh optimizer and schedule); ignored when the run resumes from a checkpoint of its own",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.stop_at > self.steps:
            raise ValueError(f"train.stop_at ({self.stop_at}) is beyond train.steps ({self.steps})")
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        return self


class ParallelConfig(Section):
    """How ranks share the work: data parallel (replicated x sharded) x tensor parallel."""

    dp_replicate: int = Field(
        1,
        ge=1,
        description="data-parallel replicas (HSDP's replicate degree): groups that hold whole copies of the sharded state",
    )
    dp_shard: int = Field(
        -1,
        ge=-1,
        description="FSDP shard degree: ranks that split parameters, gradients and optimizer state; -1 = the ranks left over",
    )
    tp: int = Field(
        1,
        ge=1,
        description="tensor-parallel degree (with sequence parallelism); must divide the heads, KV heads and MLP width; keep it within a node",
    )
    pp: int = Field(
        1,
        ge=1,
        description="pipeline-parallel degree: stages of consecutive layers on successive groups of ranks (outermost, so across nodes)",
    )
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv", "dualpipev"] = Field(
        "1f1b",
        description="pipeline schedule (torch.distributed.pipelining): gpipe and 1f1b run one stage a rank; interleaved_1f1b and interleaved_zb (zero bubble) run parallel.pp_stages_per_rank stages a rank in a loop; zbv and dualpipev run two a rank in a V",
    )
    pp_microbatches: int = Field(
        0,
        ge=0,
        description="micro batches per pipeline round (each of train.micro_batch sequences); 0 = all of a step's micro batches in one round, the smallest bubble",
    )
    pp_stages_per_rank: int = Field(
        0,
        ge=0,
        description="virtual pipeline stages a rank holds; 0 = what the schedule needs (1 for gpipe and 1f1b, 2 otherwise)",
    )
    loss_parallel: bool = Field(
        False,
        description="with tp > 1, compute the loss on vocabulary-sharded logits instead of gathering them",
    )
    activation_checkpoint: Literal["none", "selective", "full"] = Field(
        "none",
        description="recompute activations in backward: none, selective (keep matmul and attention outputs), full (every block)",
    )
    init: Literal["auto", "full", "meta"] = Field(
        "auto",
        description="full = every rank builds the whole model from the seed, then shards it (identical in every layout); meta = shapes only, shard, then initialize each shard in place (for models larger than one device); auto = meta on GPU with more than one rank",
    )
    timeout_s: float = Field(
        600.0, gt=0, description="seconds before process-group set-up or a collective is declared hung"
    )

    @field_validator("activation_checkpoint", mode="before")
    @classmethod
    def _none_is_a_mode(cls, v: Any) -> Any:
        return "none" if v is None else v  # `--parallel.activation_checkpoint=none` reads as None

    @model_validator(mode="after")
    def _consistent(self) -> ParallelConfig:
        if self.dp_shard == 0:
            raise ValueError("parallel.dp_shard must be -1 (the ranks left over) or at least 1")
        if self.pp_stages_per_rank > 1 and self.pp_schedule in ("gpipe", "1f1b"):
            raise ValueError(
                f"parallel.pp_schedule = {self.pp_schedule} runs one stage a rank: set "
                "parallel.pp_stages_per_rank = 1, or choose interleaved_1f1b or interleaved_zb"
            )
        if self.pp_stages_per_rank not in (0, 2) and self.pp_schedule in ("zbv", "dualpipev"):
            raise ValueError(
                f"parallel.pp_schedule = {self.pp_schedule} runs exactly two stages a rank (a V): "
                "set parallel.pp_stages_per_rank = 2 or 0"
            )
        return self

    @property
    def stages_per_rank(self) -> int:
        if self.pp_stages_per_rank:
            return self.pp_stages_per_rank
        return 1 if self.pp_schedule in ("gpipe", "1f1b") else 2


class CheckpointConfig(Section):
    interval: int = Field(
        500, ge=0, description="save every this many steps (and at the end); 0 = only at the end"
    )
    keep: int = Field(3, ge=1, description="keep the newest this many checkpoints")
    keep_every: int = Field(
        0, ge=0, description="also keep every checkpoint whose step is a multiple of this; 0 = none"
    )
    resume: Literal["auto", "never"] = Field(
        "auto",
        description="auto = continue from the newest verified checkpoint; never = refuse a run dir that has one",
    )
    every: Literal["steps", "minutes", "auto"] = Field(
        "steps",
        description="steps = every checkpoint.interval steps; minutes = every checkpoint.minutes; auto = the Young/Daly interval from the measured save cost and reliability.mtbf_hours",
    )
    minutes: float = Field(
        30.0, gt=0, description="minutes between checkpoints when checkpoint.every = minutes"
    )
    async_save: bool = Field(
        False,
        description="write in the background (DCP async save): the loop blocks only while state is staged to CPU memory",
    )
    on_failure: Literal["continue", "stop"] = Field(
        "continue",
        description="a failed save (full disk, I/O error): continue with the previous checkpoint kept, or stop",
    )
    local_dir: str = Field(
        "",
        description="the node-local tier: a directory on each node's own disk or /dev/shm where every rank saves its shards often, each also copied to a rank on the next node; recovery takes the newest tier that survives; empty = global checkpoints only",
    )
    local_interval: int = Field(
        50,
        ge=1,
        description="steps between node-local saves (with checkpoint.every = auto, until a save's cost is measured)",
    )
    local_keep: int = Field(2, ge=1, description="node-local steps kept on each node")
    local_covers: float = Field(
        0.9,
        ge=0.0,
        lt=1.0,
        description="with checkpoint.every = auto and a local tier: the share of failures the local tier recovers (a process, a rank, a node replaced at the same size); the global interval is chosen for the rest",
    )


class ReliabilityConfig(Section):
    """Surviving faults without a person: watchdog, anomalies, stragglers, restarts, fault injection."""

    hang_timeout_s: float = Field(
        300.0,
        gt=0,
        description="seconds without a finished step before the watchdog dumps every thread's stack and exits the rank (far below NCCL's 10 minutes)",
    )
    startup_timeout_s: float = Field(
        300.0,
        gt=0,
        description="seconds start-up (joining the group, loading data and model, restoring a checkpoint) may take before the watchdog ends the rank; at least hang_timeout_s",
    )
    checkpoint_timeout_s: float = Field(
        600.0,
        gt=0,
        description="seconds a checkpoint save or restore may go without progress (a file written or checksummed) before the watchdog ends the rank; at least hang_timeout_s",
    )
    max_restarts: int = Field(
        0,
        ge=0,
        description="`stratus train` restarts a failed run this many times (torchrun --max-restarts does the same for many ranks)",
    )
    min_nodes: int = Field(
        0,
        ge=0,
        description="when a node is lost, go on with as few as this many (torchrun --nnodes MIN:N, written by `stratus launch`; the global batch stays, accumulation absorbs the lost ranks); 0 = the job's nodes, none lost",
    )
    rejoin_timeout_s: float = Field(
        60.0,
        gt=0,
        description="after a node is lost, seconds the others wait for a spare (or the lost node, back) before going on without it (the rendezvous's last call)",
    )
    crash_loop: int = Field(
        3, ge=2, description="stop, with a diagnosis, after this many failures in a row at the same step"
    )
    spike_zscore: float = Field(
        6.0, gt=0, description="a loss this many standard deviations above the running window is a spike"
    )
    spike_window: int = Field(50, ge=5, description="steps in the running window of the spike detector")
    spike_min_steps: int = Field(20, ge=2, description="steps in the window before spikes are judged")
    spike_skip_steps: int = Field(
        10, ge=0, description="after a rollback, also skip this many global batches of data past the spike"
    )
    max_spikes: int = Field(3, ge=1, description="stop the run after this many spikes")
    straggler_interval: int = Field(
        50,
        ge=0,
        description="compare ranks' own compute per step on the first logged step this many steps after the last comparison; 0 = never",
    )
    straggler_threshold: float = Field(
        0.10,
        gt=0,
        description="a rank whose compute per step is this much above the median is reported (0.10 = 10%)",
    )
    straggler_zscore: float = Field(
        3.0,
        gt=0,
        description="with 4 or more ranks, it must also stand this many robust standard deviations (MAD) above its peers",
    )
    mtbf_hours: float = Field(
        24.0, gt=0, description="mean time between failures of the whole job, for checkpoint.every = auto"
    )
    faults: str = Field(
        "",
        description="faults to inject, e.g. kill@step=37:rank=1,nan@step=20 (also STRATUS_FAULTS); each fires once per run",
    )


class EvalConfig(Section):
    interval: int = Field(250, ge=0, description="validate every this many steps (and at the end); 0 = never")
    batches: int = Field(
        20, ge=1, description="validation batches of train.micro_batch sequences per evaluation"
    )


class LogConfig(Section):
    interval: int = Field(10, ge=1, description="write metrics every this many steps")
    tensorboard: bool = Field(True, description="write TensorBoard event files to RUN/events")
    progress: Literal["auto", "rich", "plain"] = Field(
        "auto", description="auto = a rich progress bar on a terminal, plain lines otherwise"
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="device peak TFLOP/s for MFU; none = the GPU's entry in the hardware catalog (plan/catalog.toml, or $STRATUS_PLAN_CATALOG)",
    )
    prometheus_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="serve Prometheus metrics on this port from rank 0 (http://HOST:PORT/metrics); none = off",
    )
    trackers: list[Literal["wandb", "mlflow"]] = Field(
        default_factory=list,
        description="experiment trackers that get the same metrics and config; offline (wandb) or a local file store (mlflow) unless their own environment variables say otherwise",
    )


class RunConfig(Section):
    dir: str = Field("runs/default", description="run directory: config, metrics, events, checkpoints, log")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    reliability: ReliabilityConfig = Field(default_factory=ReliabilityConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) is above model.max_seq_len ({self.model.max_seq_len})"
            )
        return self

    def hash(self) -> str:
        """sha256 of the whole resolved config (short), stored in every checkpoint."""
        blob = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --- loading -------------------------------------------------------------------------------


def parse_value(raw: str) -> Any:
    """A CLI value as TOML would read it (`4`, `3e-4`, `true`, `"x"`), else as a plain string."""
    if raw.lower() in ("none", "null"):
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--train.steps=200 --model.n_layers 4` -> {"train.steps": 200, "model.n_layers": 4}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise StratusError(f"unexpected argument {arg!r}: config overrides look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise StratusError(f"--{key} needs a value: --{key}=VALUE")
            i += 1
            raw = args[i]
        out[key] = parse_value(raw)
        i += 1
    return out


def _apply(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    node = tree
    for name in sections:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise StratusError(f"{dotted}: {name} is a value, not a section")
        node = child
    node[leaf] = value


def _describe(err: ValidationError) -> str:
    """The first validation error as one line that names the key."""
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        parent = _section_of(e["loc"][:-1])
        kind = "section" if len(e["loc"]) == 1 else "key"
        known = ", ".join(parent.model_fields) if parent is not None else ""
        return f"{key}: unknown {kind}" + (f"; known {kind}s here: {known}" if known else "")
    if e["type"] == "value_error" or not key:
        return msg  # our own consistency messages name their keys
    got = e.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def _section_of(loc: tuple) -> type[BaseModel] | None:
    cls: type[BaseModel] = Config
    for name in loc:
        field = cls.model_fields.get(str(name))
        if (
            field is None
            or not isinstance(field.annotation, type)
            or not issubclass(field.annotation, BaseModel)
        ):
            return None
        cls = field.annotation
    return cls


def _as_field_type(dotted: str, value: Any) -> Any:
    """A CLI value read as a number or boolean goes back to text for a text field
    (`--run.dir=5` means the directory "5")."""
    *sections, leaf = dotted.split(".")
    section = _section_of(tuple(sections))
    field = section.model_fields.get(leaf) if section is not None else None
    if field is not None and field.annotation is str and isinstance(value, (bool, int, float)):
        return toml_value(value)
    return value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read TOML (if given), apply dotted overrides, validate. Raises StratusError."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise StratusError(f"config file {p} not found: give a TOML file such as configs/demo.toml")
        try:
            tree = _parse(p.read_text(encoding="utf-8"), p)
        except UnicodeDecodeError as e:
            raise StratusError(f"config file {p} is not valid TOML: {e}") from None
    return _validated(tree, overrides)


def config_from_text(text: str, source: str = "config") -> Config:
    """A config from TOML text (what a tool is about to write), checked as load_config checks a file."""
    return _validated(_parse(text, source), None)


def _parse(text: str, source: Any) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise StratusError(f"config file {source} is not valid TOML: {e}") from None


def _validated(tree: dict[str, Any], overrides: dict[str, Any] | None) -> Config:
    for key, value in (overrides or {}).items():
        _apply(tree, key, _as_field_type(key, value))
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise StratusError(f"config error: {_describe(e)}") from None


# --- writing -------------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(cfg: Config, comments: bool = False) -> str:
    """The resolved config as TOML; with comments, each key carries its description."""
    lines: list[str] = []
    for name in Config.model_fields:
        section: BaseModel = getattr(cfg, name)
        lines.append(f"[{name}]")
        for key, f in type(section).model_fields.items():
            value = getattr(section, key)
            text = f"{key} = {toml_value(value)}" if value is not None else f"# {key} = none"
            if comments and f.description:
                text = f"{text:<40} # {f.description}"
            lines.append(text)
        lines.append("")
    return "\n".join(lines)
