"""From the command line to one typed, validated configuration: the edge where everything is checked once.

The composed config holds the LPTConfig fields at the top level (so `data.root=...` works on the command line)
next to the keys of experiments/schema.py's `SweepSettings`. Every command starts with `start_cli`, which refuses
an override whose key or group option does not exist (naming the closest valid one) before Hydra composes
anything; `split` then types the whole config: the base `LPTConfig` (validated), the demo's pretraining recipe and
the settings (an unknown key from a yaml file is refused there too).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from experiments.ablations import ABLATIONS
from experiments.suites import SUITES
from experiments.schema import GROUP_OPTIONS, AblationChoice, DemoPretrainConfig, SweepSettings
from lpt_core.config import OPEN_MAPPINGS, ConfigError, LPTConfig, build_dataclass, from_dict, no_such_key, to_dict
from lpt_core.suggest import did_you_mean

CONF_DIR = Path(__file__).resolve().parent / "conf"
LPT_KEYS = tuple(f.name for f in dataclasses.fields(LPTConfig))
# the options of the groups register_configs stores from code: one per registered ablation, the search and
# cluster options, the demo's pretraining recipe
STORED_OPTIONS: dict[str, tuple[str, ...]] = {"ablation": (*ABLATIONS, *SUITES), "pretrain": ("demo",),
                                              **{group: tuple(options) for group, options in GROUP_OPTIONS.items()}}
# config groups chosen on the command line (`model=vit_b`): the folders of conf/ and the stored groups
CONFIG_GROUPS = frozenset({*(p.name for p in CONF_DIR.iterdir() if p.is_dir()), *STORED_OPTIONS})


def register_configs() -> None:
    """Puts every default in Hydra's ConfigStore from the code that owns it, so no yaml file repeats one:
    lpt_defaults (LPTConfig), sweep_defaults (SweepSettings), and the options of the stored groups."""
    defaults = to_dict(LPTConfig())
    # mandatory for Hydra: an experiment yaml's `root: ???` merged onto "" would keep "" (OmegaConf never
    # overwrites a value with MISSING), so the check "data.root not set" must start from MISSING here
    defaults["data"]["root"] = MISSING
    store = ConfigStore.instance()
    store.store(name="lpt_defaults", node=defaults)
    store.store(name="sweep_defaults", node=dataclasses.asdict(SweepSettings()))
    for name in (*ABLATIONS, *SUITES):
        store.store(group="ablation", name=name, node=dataclasses.asdict(AblationChoice(name)))
    for group, options in GROUP_OPTIONS.items():
        for name, values in options.items():
            store.store(group=group, name=name, node={"name": name, **values})
    store.store(group="pretrain", name="demo", node=dataclasses.asdict(DemoPretrainConfig()), package="pretrain")


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Hydra's compose API on experiments/conf: the same config the commands get, for tests and tools."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def _to_plain(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        key = err.full_key or f"{err}".splitlines()[0]
        raise ConfigError(f"{key}: missing mandatory value (set it on the command line, e.g. {key}=/path)") from err
    except Exception as err:  # other omegaconf errors (interpolation, ...): keep their first line
        raise ConfigError(f"{err}".splitlines()[0]) from err


@dataclass(frozen=True)
class ExperimentSpec:
    """The command line, typed: what every row and seed of a sweep (or the single run) starts from."""

    name: str
    lpt: LPTConfig  # validated; a sweep's rows are lpt.with_overrides(row)
    pretrain: DemoPretrainConfig | None  # demo micro-ViT pretraining, None for real backbones
    settings: SweepSettings  # everything else: the sweep's keys and experiments/single_run.py's


def split(cfg: DictConfig | dict) -> ExperimentSpec:
    """Types the composed config: an unknown key, a wrong type or an invalid value is refused here, by name."""
    plain = copy.deepcopy(cfg) if isinstance(cfg, dict) else _to_plain(cfg)
    lpt = from_dict({k: plain.pop(k) for k in LPT_KEYS if k in plain})
    name = plain.pop("experiment_name")
    pretrain = plain.pop("pretrain", None)
    return ExperimentSpec(name, lpt, build_dataclass(DemoPretrainConfig, pretrain, "pretrain") if pretrain else None,
                          build_dataclass(SweepSettings, plain))


def check_command_line(argv: list[str]) -> None:
    """Refuses a command-line override whose key the composed config cannot have, or a group option that does not
    exist, naming the closest valid one.

    Hydra alone would refuse `resourses.cpu=1` without naming `resources`, answer `ablation=nonexistent` with its
    config search path, and accept `+model.not_a_key=3` as a new key that nothing reads. Hydra's flags
    (`--multirun`, `--cfg job`), Hydra's own keys and overrides Hydra cannot parse are left to Hydra.
    """
    parser, tree = OverridesParser.create(), _key_tree()
    for arg in argv:
        if arg.startswith("-") or not ("=" in arg or arg.startswith("~")):
            continue
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue
        key = override.key_or_group
        root = key.split(".")[0]
        if key in CONFIG_GROUPS:
            _check_group_option(key, override.value())
            continue
        if root == "hydra" or "/" in key:
            continue
        if root in CONFIG_GROUPS and root not in tree:  # model, experiment: groups that set keys elsewhere
            raise ConfigError(f"override '{key}': no config key '{root}'; '{root}' is a config group, chosen with "
                              f"{root}=<name>, not a key")
        _check_key(tree, key)


def group_options(group: str) -> tuple[str, ...]:
    """The options of a config group: stored from code, or the yaml files of its conf/ folder."""
    if group in STORED_OPTIONS:
        return STORED_OPTIONS[group]
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def _check_group_option(group: str, value: Any) -> None:
    if not isinstance(value, str):  # a list or a sweep: Hydra's own syntax, Hydra reports it
        return
    options = group_options(group)
    if value not in options:
        raise ConfigError(f"{group}={value!r}: no such {group}; {did_you_mean(value, options, what='options')}")


def _key_tree() -> dict[str, Any]:
    """Every key the composed config can hold, as nested dicts (the optional sections filled in)."""
    return {**to_dict(LPTConfig()), **dataclasses.asdict(SweepSettings(ablation=AblationChoice(name=""))),
            "experiment_name": "", "pretrain": dataclasses.asdict(DemoPretrainConfig())}


def _check_key(tree: dict[str, Any], dotted: str) -> None:
    """A key that does not exist is an error naming it and the closest key at the level where it went wrong."""
    node, parts = tree, dotted.split(".")
    for depth, part in enumerate(parts):
        if ".".join(parts[:depth]) in OPEN_MAPPINGS:
            return
        if not isinstance(node, dict) or part not in node:
            raise no_such_key(dotted, depth, list(node) if isinstance(node, dict) else None)
        node = node[part]


def start_cli(main: Callable[[], None], argv: list[str]) -> None:
    """What every command runs first: an unknown key or option ends the process with exit code 2 and one
    `error: ...` line, before Hydra composes the config and before any work."""
    try:
        check_command_line(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    register_configs()
    main()
