"""From a composed Hydra config to typed settings: the edge where everything is validated once.

The composed config holds the LPTConfig fields at the top level (so `data.root=...` works on the command line)
next to the keys of the sweep and of experiments/run.py, whose schema is `SweepSettings` below. Both command lines
start with `start_cli`, which refuses an override whose key the config does not have (naming the closest valid
one) before Hydra composes anything; `split` separates the composed config and types everything but the LPTConfig
fields (an unknown key from a yaml file is refused there); `apply_overrides` applies an ablation point's dotted keys.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lpt_core.config import ConfigError, LPTConfig, build_dataclass, from_dict, to_dict

if TYPE_CHECKING:
    from experiments.pretrain_demo import DemoPretrainConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"
LPT_KEYS = tuple(f.name for f in dataclasses.fields(LPTConfig))
# groups whose options register_configs stores from code: one per registered ablation, the search and cluster
# options below, the demo's pretraining recipe
STORED_GROUPS = ("ablation", "search", "cluster", "pretrain")
# config groups chosen on the command line (`model=vit_b`): the folders of conf/ and the stored groups
CONFIG_GROUPS = frozenset({*(p.name for p in CONF_DIR.iterdir() if p.is_dir()), *STORED_GROUPS})


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
    orchestration/settings.py adds the sweep's own checks on top."""

    ablation: AblationChoice | None = None
    search: SearchSettings = field(default_factory=SearchSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    sweep: SweepLocation = field(default_factory=SweepLocation)
    stages: StageSettings = field(default_factory=StageSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    resources: Resources = field(default_factory=Resources)
    seeds: list[int] = field(default_factory=lambda: [0])  # each ablation point is repeated once per seed
    resume: bool = False  # True: finish an interrupted / partly failed sweep of the same name
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's resources allow
    scheduler: Literal["fifo", "asha"] = "fifo"  # asha early-stops weak phase-2 trials on the ablation's metric
    max_failures: int = 2  # automatic retries of a crashed trial (from its last checkpoint)
    min_free_disk_gb: float = 1.0  # refuse to start a sweep when the storage has less free space
    debug: DebugSettings = field(default_factory=DebugSettings)
    # experiments/run.py's keys, ignored by the sweep
    phase: Any = 1  # 1, or 2 with init_from=<phase-1 checkpoint>; training=joint runs joint
    init_from: str | None = None
    evaluate: str | None = None  # the authors' released checkpoint: evaluate it instead of training
    workdir: str | None = None  # default outputs/runs/<experiment>-<stage>-<time>


def register_configs() -> None:
    """Puts every default in Hydra's ConfigStore from the code that owns it, so no yaml file repeats one:
    lpt_defaults (LPTConfig), sweep_defaults (SweepSettings), and the options of the stored groups."""
    from experiments.ablations import ABLATIONS
    from experiments.pretrain_demo import DemoPretrainConfig

    defaults = to_dict(LPTConfig())
    # mandatory for Hydra: an experiment yaml's `root: ???` merged onto "" would keep "" (OmegaConf never
    # overwrites a value with MISSING), so the check "data.root not set" must start from MISSING here
    defaults["data"]["root"] = MISSING
    store = ConfigStore.instance()
    store.store(name="lpt_defaults", node=defaults)
    store.store(name="sweep_defaults", node=dataclasses.asdict(SweepSettings()))
    for name in ABLATIONS:
        store.store(group="ablation", name=name, node=dataclasses.asdict(AblationChoice(name)))
    for group, options in GROUP_OPTIONS.items():
        for name, values in options.items():
            store.store(group=group, name=name, node={"name": name, **values})
    store.store(group="pretrain", name="demo", node=dataclasses.asdict(DemoPretrainConfig()), package="pretrain")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Hydra's compose API on experiments/conf: the same config sweep.py and run.py get, for tests and tools."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def to_plain(cfg: DictConfig | dict) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = err.full_key or f"{err}".splitlines()[0]
        raise ConfigError(f"{key}: missing mandatory value (set it on the command line, e.g. {key}=/path)") from err
    except Exception as err:  # other omegaconf errors (interpolation, ...): keep their first line
        raise ConfigError(f"{err}".splitlines()[0]) from err


@dataclass
class ExperimentSpec:
    name: str
    lpt: dict[str, Any]  # nested LPTConfig fields, not yet validated (ablation points still apply)
    pretrain: DemoPretrainConfig | None  # demo micro-ViT pretraining, None for real backbones
    settings: SweepSettings  # everything else: the sweep's keys and experiments/run.py's


def split(cfg: DictConfig | dict) -> ExperimentSpec:
    """Separates the LPTConfig fields and types the rest; an unknown key outside LPTConfig is refused here."""
    from experiments.pretrain_demo import DemoPretrainConfig

    plain = to_plain(cfg)
    lpt = {k: plain.pop(k) for k in LPT_KEYS if k in plain}
    name = plain.pop("experiment_name")
    pretrain = plain.pop("pretrain", None)
    return ExperimentSpec(name, lpt, build_dataclass(DemoPretrainConfig, pretrain, "pretrain") if pretrain else None,
                          build_dataclass(SweepSettings, plain))


def check_command_line(argv: list[str]) -> None:
    """Refuses a command-line override whose key the composed config cannot have, naming the closest valid key.

    Hydra alone would refuse `resourses.cpu=1` without naming `resources`, and would accept `+model.not_a_key=3`
    as a new key that nothing reads. Hydra's flags (`--multirun`, `--cfg job`), group choices (`model=vit_b`),
    Hydra's own keys and overrides Hydra cannot parse are left to Hydra, which reports them itself.
    """
    parser, tree = OverridesParser.create(), _key_tree()
    for arg in argv:
        if arg.startswith("-") or not ("=" in arg or arg.startswith("~")):
            continue
        try:
            key = parser.parse_override(arg).key_or_group
        except HydraException:
            continue
        root = key.split(".")[0]
        if key in CONFIG_GROUPS or root == "hydra" or "/" in key:
            continue
        if root in CONFIG_GROUPS and root not in tree:  # model, experiment: groups that set keys elsewhere
            raise ConfigError(f"override '{key}': no config key '{root}'; '{root}' is a config group, chosen with "
                              f"{root}=<name>, not a key")
        apply_overrides(tree, {key: None})


def _key_tree() -> dict[str, Any]:
    """Every key the composed config can hold, as nested dicts (the optional sections filled in)."""
    from experiments.pretrain_demo import DemoPretrainConfig

    return {**to_dict(LPTConfig()), **dataclasses.asdict(SweepSettings(ablation=AblationChoice(name=""))),
            "experiment_name": "", "pretrain": dataclasses.asdict(DemoPretrainConfig())}


def start_cli(main: Callable[[], None], argv: list[str]) -> None:
    """What experiments/run.py and orchestration/sweep.py run first: an unknown key ends the process with exit
    code 2 and one `error: ...` line, before Hydra composes the config and before any work."""
    try:
        check_command_line(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    register_configs()
    main()


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `values` with dotted keys set; a key that does not exist is an error naming it."""
    result = copy.deepcopy(values)
    for dotted, value in overrides.items():
        node, parts = result, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or (part not in node and not _is_open_mapping(parts[:i])):
                raise ConfigError(f"override '{dotted}': no config key '{'.'.join(parts[:i + 1])}'"
                                  f"{_closest(parts[:i], part, node)}")
            if i == len(parts) - 1:
                node[part] = copy.deepcopy(value)
            else:
                node = node[part]
    return result


def _closest(path: list[str], part: str, node: Any) -> str:
    """The closest valid key at that level, or all of them when none is close; nothing below a plain value."""
    if not isinstance(node, dict):
        return f"; '{'.'.join(path)}' holds a value, not keys"
    close = difflib.get_close_matches(part, list(node), n=1)
    if close:
        return f"; did you mean '{'.'.join(path + [close[0]])}'?"
    return f"; valid keys{' under ' + '.'.join(path) if path else ''}: {', '.join(node)}"


def _is_open_mapping(path: list[str]) -> bool:
    """Free-form mappings whose keys belong to a dataset or timm model, not to the config schema."""
    return path in (["data", "options"], ["backbone", "model_kwargs"])


def build_lpt(values: dict[str, Any]) -> LPTConfig:
    return from_dict(values)


def resolve_backbone(cfg: LPTConfig, pretrain: DemoPretrainConfig | None, log=print) -> LPTConfig:
    """The demo's backbone is pretrained by the project itself (cached by content hash); real ones load as is."""
    if pretrain is None or cfg.backbone.weights_file is not None:
        return cfg
    from experiments.pretrain_demo import ensure_demo_backbone

    path = ensure_demo_backbone(cfg.backbone, cfg.data, pretrain, Path(cfg.data.cache_dir), log=log)
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights_file=str(path)))
