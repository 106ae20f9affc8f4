"""The job spec as frozen dataclasses: the one shape every part of ftsup reads.

`supervisor/spec.py` turns a `job.toml` into a `JobSpec`; the daemon, the
restart policy and the built-in trainer only ever see these types, never raw
TOML. Durations are seconds (float), sizes are bytes (int), paths are absolute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any


def _empty_env() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a job file (a refusal, or a warning such as a deprecated key);
    `key` is dotted from the root, e.g. `restart.backoff`."""

    file: Path
    line: int | None
    key: str
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        return self.render()

    def render(self, *, hint: bool = True) -> str:
        """`job.toml:12: [restart] backof: unknown key; did you mean "backoff"?`"""
        parts = [str(self.file) if self.line is None else f"{self.file}:{self.line}"]
        if self.key:
            parts.append(_render_key(self.key))
        text = ": ".join([*parts, self.message])
        return f"{text}; {self.hint}" if hint and self.hint else text

    def to_json(self) -> dict[str, Any]:
        """The JSON shape `ftsup check --json` and the daemon report."""
        return {
            "file": str(self.file),
            "line": self.line,
            "key": self.key,
            "message": self.message,
            "hint": self.hint,
        }


def _render_key(key: str) -> str:
    table, _, rest = key.partition(".")
    return f"[{table}] {rest}" if rest else f"[{table}]"


MIN_PRIORITY, MAX_PRIORITY = -1000, 1000  # `[job] priority`, `ftsup priority`


@dataclass(frozen=True)
class JobSection:
    name: str
    output_dir: Path
    # The GPU queue: higher first, then submission order; `after`: start only once
    # these jobs finished; `preemptible`: a higher-priority job may take its GPUs.
    priority: int = 0
    after: tuple[str, ...] = ()
    preemptible: bool = False


@dataclass(frozen=True)
class CommandSection:
    """Any training command; `resume_args` are appended only when resuming."""

    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str] = field(default_factory=_empty_env)
    resume_args: tuple[str, ...] = ()
    # Put ftsup's bootstrap on the command's PYTHONPATH: FtsupCallback joins every
    # transformers Trainer it creates (live progress, graceful stop, save now).
    instrument: bool = True


@dataclass(frozen=True)
class TrainSection:
    """The built-in trainer (`python -m ftsup.trainer`); names follow transformers."""

    model: str
    dataset: tuple[str, ...]
    tokenizer: str | None = None
    format: str = "auto"  # auto | alpaca | chat
    cutoff_len: int = 512
    finetuning_type: str = "lora"  # lora | qlora | full
    lora_rank: int = 8
    lora_alpha: int | None = None  # None: 2 * lora_rank
    lora_dropout: float = 0.0
    lora_target: tuple[str, ...] = ("all",)
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    save_steps: int | None = None
    save_every: float | None = None  # seconds
    save_total_limit: int = 3
    logging_steps: int = 1
    val_size: float = 0.0  # 0: no eval split; < 1 a fraction; >= 1 a whole row count
    eval_steps: int | None = None
    report_to: tuple[str, ...] = ()
    dataloader_num_workers: int = 0
    # Multi-node: each node writes its own copy of every checkpoint into its own
    # (node-local) output folder, HF's TrainingArguments(save_on_each_node=True).
    save_on_each_node: bool = False


@dataclass(frozen=True)
class LaunchSection:
    """More than one process (or node) runs through torchrun."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_backend: str = "c10d"
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None
    # Elastic nodes: the run goes on with as few as min_nodes (global batch kept).
    min_nodes: int | None = None
    # How long the rendezvous waits for more nodes once min_nodes are there (torchrun: 30 s).
    rdzv_last_call: float | None = None
    deepspeed: str | None = None
    # Not a key: the stage of `deepspeed`'s config, read when the job file is parsed
    # (the daemon compares it at resume without reading the user's file again).
    zero_stage: int = 0
    # full_shard or shard_grad_op: HF Trainer's FSDP (FSDP2), [train] jobs only.
    fsdp: str | None = None

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1

    @property
    def world_size(self) -> int:
        """Processes in the whole run (what rng_state_<rank> files and fingerprints count)."""
        return self.nproc_per_node * self.nnodes

    @property
    def elastic_nodes(self) -> bool:
        """The run may go on with fewer nodes than `nnodes` (`min_nodes` below it)."""
        return self.min_nodes is not None and self.min_nodes < self.nnodes


@dataclass(frozen=True)
class RestartSection:
    max_restarts: int = 10
    backoff: float = 10.0
    backoff_max: float = 600.0
    crash_loop: int = 3
    stop_grace: float = 120.0
    standby: bool = True  # a warm standby trainer ([train] jobs, one process)
    standby_count: int = 1  # standbys kept warm at once (2: kills closer than a warm-up)


@dataclass(frozen=True)
class HealthSection:
    hang_timeout: float | None = None  # None: "auto", adapted to the step time
    hang_floor: float = 120.0
    hang_ceiling: float = 3600.0
    startup_timeout: float = 1800.0
    loss_anomaly: str = "rollback"  # rollback | stop | warn
    loss_spike_factor: float = 10.0


@dataclass(frozen=True)
class CheckpointSection:
    keep_last: int | None = None  # None: ftsup deletes nothing (the trainer rotates)
    keep_every: int | None = None
    keep_best: str | None = None  # metric name, e.g. "eval_loss"
    async_save: bool = True  # `async`, its old TOML name, is read with a warning
    min_free: int | None = None  # bytes; None: "auto"
    allow_scratch: bool = True  # start from scratch when no valid checkpoint exists
    watch: str = "auto"  # auto | inotify | polling
    # The memory tier (issue 18): a snapshot in RAM every N steps; 0 off; None
    # ("auto"): memory_tier.AUTO_EVERY (every step for LoRA/QLoRA, off for full).
    memory_every: int | None = None
    memory_dir: str | None = None  # None: the daemon's folder in RAM (memory_root)
    # The most of training time snapshots may take (0: every `memory_every` step
    # whatever it costs); None: the trainer's default (memory_tier.DEFAULT_MAX_OVERHEAD).
    memory_overhead: float | None = None


@dataclass(frozen=True)
class GpuSection:
    """`devices`: exactly these GPUs; `count`: any N free, healthy ones; neither: no GPU."""

    devices: tuple[int, ...] | None = None
    count: int | None = None
    xid_actions: Mapping[int, str] = field(default_factory=lambda: MappingProxyType({}))
    # [train] jobs with `count`: go on with fewer GPUs (a divisor of count) when too
    # few healthy ones are left, keeping the global batch; back to `count` later.
    elastic: bool = False


@dataclass(frozen=True)
class NotifySection:
    webhook: str | None = None
    command: tuple[str, ...] | None = None
    on: tuple[str, ...] = ("failed", "gave_up", "finished", "gpu_fault", "degraded")


@dataclass(frozen=True)
class JobSpec:
    """A fully validated job. `source` is the job file; `text` its TOML as submitted."""

    source: Path
    text: str
    job: JobSection
    command: CommandSection | None = None
    train: TrainSection | None = None
    launch: LaunchSection = field(default_factory=LaunchSection)
    restart: RestartSection = field(default_factory=RestartSection)
    health: HealthSection = field(default_factory=HealthSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    gpu: GpuSection = field(default_factory=GpuSection)
    notify: NotifySection = field(default_factory=NotifySection)
    # Accepted, but worth fixing (a deprecated key, settings that contradict each
    # other): `ftsup check` and `ftsup start` print them. Not part of the job itself.
    warnings: tuple[SpecIssue, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def output_dir(self) -> Path:
        return self.job.output_dir


DEFAULT_FOREIGN_MEMORY_LIMIT = 1 << 30  # bytes


@dataclass(frozen=True)
class DaemonGpuSection:
    """`[gpu]` in daemon.toml. `foreign_memory_limit`: a GPU where processes that are
    no ftsup job's hold this much or more is busy; a (re)launch waits until it is not."""

    foreign_memory_limit: int = DEFAULT_FOREIGN_MEMORY_LIMIT


@dataclass(frozen=True)
class DaemonStandbySection:
    """`[standby]` in daemon.toml. `spares`: warm trainers the daemon keeps before any
    job asks (`ftsup.supervisor.daemon.spares`); 0 turns them off."""

    spares: int = 1


@dataclass(frozen=True)
class DaemonConfig:
    """`daemon.toml` in the state folder: defaults for every job of one daemon."""

    source: Path | None = None
    notify: NotifySection | None = None  # used by jobs whose own [notify] names no receiver
    gpu: DaemonGpuSection = field(default_factory=lambda: DaemonGpuSection())
    standby: DaemonStandbySection = field(default_factory=lambda: DaemonStandbySection())
