"""The schema of every setting outside LPTConfig: the sweep's keys, experiments/single_run.py's, the demo's
pretraining recipe. Plain dataclasses and nothing else imported, so the ablation registry and any tool can read
them without Hydra, torch or timm; experiments/compose.py types the composed command line into them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DemoPretrainConfig:
    """The recipe: 8 epochs over the 18,000 default source images reach 93% source test accuracy (chance 1.7%) in
    about 3.5 min on two cores; 5 epochs reach 73%, and the demo's phase 1 / phase 2 lose 5 points with it."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5  # linear warm-up, then cosine to 0, per step
    label_smoothing: float = 0.1
    crop_min_scale: float = 0.5  # random resized crop (area fraction) of each source image
    flip: bool = True  # the source label (texture, hue) is mirror invariant
    seed: int = 0


# the LPTConfig fields the pretrained backbone depends on (what backbone_hash reads: the architecture, and the
# source split, which data.options shapes): an ablation over any of them changes the demo's pretrain stage
PRETRAIN_FIELDS = ("backbone.name", "backbone.model_kwargs", "backbone.norm_eps", "data.options")


@dataclass
class AblationChoice:
    """`ablation=<name>`: axis, stages and metric are the experiments/ablations.py entry of that name."""

    name: str
    values: list[Any] | None = None  # narrow the axis to these row labels (None = all)


@dataclass
class SearchSettings:
    # grid: every point of the ablation's axis, times every seed. optuna: Ray Tune's OptunaSearch over the
    # ablation's continuous space (seeded); its state survives resume
    name: Literal["grid", "optuna"] = "grid"
    num_samples: int = 8  # optuna: trials in all
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    max_concurrent: int = 2
    mode: Literal["max", "min"] = "max"


@dataclass
class ClusterSettings:
    # local: Ray started in-process on this machine, dashboard off, everything bound to 127.0.0.1. ray: join a
    # running Ray cluster (`ray start --head` on one node, `ray start --address=<head>:6379` on the others)
    name: Literal["local", "ray"] = "local"
    address: str | None = None  # ray: auto | <head-ip>:6379 | ray://<head-ip>:10001
    num_cpus: int | None = None  # local: None = all cores
    num_gpus: float | None = None
    dashboard: bool = False
    connect_timeout_s: float = 60.0


# the options of the search and cluster groups (`search=optuna`): what each sets besides its own name
GROUP_OPTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "search": {"grid": {}, "optuna": {}},
    "cluster": {"local": {}, "ray": {"address": "auto"}},
}


@dataclass
class SweepLocation:
    name: str | None = None  # default: <ablation>-<experiment>
    root: str = "outputs/sweeps"  # sweep folders (reports, tuner state) live under root/name
    storage: str | None = None  # Ray Tune storage: a path or any URI pyarrow.fs accepts; default root/name/tune


@dataclass
class StageSettings:
    cache: bool = True  # share each distinct phase 1 between trials and sweeps (False: every trial trains its own)
    root: str = "outputs/stages"  # stage outputs keyed by content hash; on a shared filesystem on a cluster


@dataclass
class TrackingSettings:
    uri: str | None = None  # default sqlite:///<sweep.root>/mlflow.db, shared by every sweep; or an `mlflow server`
    experiment: str | None = None  # the MLflow experiment; default: the experiment's name (demo, places_lt, ...)
    flush_timeout_s: float = 120.0  # how long a finished stage waits for an unreachable server before moving on
    # the sweep's own `mlflow server` over a store that is not a server: auto = on a cluster of several nodes (the
    # trials then never open the store themselves: one writer), on = always, off = never (refused for SQLite on
    # several nodes)
    server: Literal["auto", "on", "off"] = "auto"
    server_port: int = 0  # its port on the driver's node; 0 = a free one


@dataclass
class Resources:
    cpu: float = 1.0  # per trial
    gpu: float = 0.0  # per trial, fractional to pack small models (0.25 = four trials per GPU)


@dataclass
class DebugSettings:
    """Fault injection and hooks for tests."""

    fail_at_epoch: int | None = None  # raise after this epoch's checkpoint ...
    fail_stage: Literal["phase1", "phase2", "joint"] = "phase2"  # ... in this stage ...
    fail_times: int = 1  # ... this many times per trial (tests of retry / resume)
    oom_at_epoch: int | None = None  # a real allocator failure (an impossible allocation) after this epoch
    fail_row: str | int | float | None = None  # inject faults into this row's trials only (None: every trial)
    epoch_sleep_s: float = 0.0  # stretch every epoch (tests that must catch a trial mid-training)
    event_dir: str | None = None  # a trial writes <stage>.<row>.seed<s>.epoch<n> here after each epoch's checkpoint
    hold_at_epoch: int | None = None  # after that event (fail_stage, fail_row), wait for <event_dir>/release


@dataclass
class SweepSettings:
    """Every key of the composed config that is not an LPTConfig field (nor experiment_name / pretrain): the
    schema both command lines check, and (register_configs) the defaults they start from.
    orchestration/plan/sweep_plan.py adds the sweep's own checks on top."""

    ablation: AblationChoice | None = None
    search: SearchSettings = field(default_factory=SearchSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    sweep: SweepLocation = field(default_factory=SweepLocation)
    stages: StageSettings = field(default_factory=StageSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    resources: Resources = field(default_factory=Resources)
    seeds: list[int] = field(default_factory=lambda: [0])  # each ablation point is repeated once per seed
    resume: bool = False  # True: finish an interrupted / partly failed sweep of the same name
    dry_run: bool = False  # print the plan (rows, distinct stages, trials, cached, a compute estimate); run nothing
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    scheduler: Literal["fifo", "asha"] = "fifo"  # asha early-stops weak phase-2 trials on the ablation's metric
    max_failures: int = 2  # automatic retries of a crashed trial (from its last checkpoint)
    # phase-2 rows that share their phase 1, seed and data stream train fused in one trial, paying for the frozen
    # backbone once per batch (lpt_core.fused). auto: when the cluster has fewer trial slots than rows (with a
    # slot per row, separate trials finish sooner); off: one trial per row. Either way the same stage keys
    fuse: Literal["auto", "off"] = "auto"
    fuse_max_rows: int = 8  # rows in one fused trial at most (each row adds its own activations of blocks K+1..L)
    min_free_disk_gb: float = 1.0  # refuse to start a sweep when the storage has less free space
    debug: DebugSettings = field(default_factory=DebugSettings)
    # experiments/single_run.py's keys, ignored by the sweep
    # phase2 needs init_from=<phase-1 checkpoint>; training=joint runs the joint stage whatever this says
    stage: Literal["phase1", "phase2"] = "phase1"
    init_from: str | None = None
    evaluate: str | None = None  # the authors' released checkpoint: evaluate it instead of training
    workdir: str | None = None  # default outputs/runs/<experiment>-<stage>-<time>
