"""From a composed Hydra config to lpt_core's typed LPTConfig: the edge where everything is validated once.

The composed config holds the LPTConfig fields at the top level (so `data.root=...` works on the command line)
next to the run/sweep keys. `split` separates them; `apply_overrides` applies an ablation point's dotted keys and
refuses any key the config does not have.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lpt_core.config import ConfigError, LPTConfig, build_dataclass, from_dict, to_dict

CONF_DIR = Path(__file__).resolve().parent / "conf"
LPT_KEYS = tuple(f.name for f in dataclasses.fields(LPTConfig))


def register_configs() -> None:
    """Puts the dataclass defaults in Hydra's ConfigStore, so config.yaml never repeats them."""
    from experiments.pretrain_demo import DemoPretrainConfig

    defaults = to_dict(LPTConfig())
    # mandatory for Hydra: an experiment yaml's `root: ???` merged onto "" would keep "" (OmegaConf never
    # overwrites a value with MISSING), so the check "data.root not set" must start from MISSING here
    defaults["data"]["root"] = MISSING
    store = ConfigStore.instance()
    store.store(name="lpt_defaults", node=defaults)
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
    pretrain: dict[str, Any] | None  # demo micro-ViT pretraining, None for real backbones
    rest: dict[str, Any]  # everything else (sweep, search, cluster, ...) for the orchestrator


def split(cfg: DictConfig | dict) -> ExperimentSpec:
    plain = to_plain(cfg)
    lpt = {k: plain.pop(k) for k in LPT_KEYS if k in plain}
    name = plain.pop("experiment_name")
    pretrain = plain.pop("pretrain", None) or None
    return ExperimentSpec(name, lpt, pretrain, plain)


def apply_overrides(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `values` with dotted keys set; a key that does not exist is an error naming it."""
    result = copy.deepcopy(values)
    for dotted, value in overrides.items():
        node, parts = result, dotted.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or (part not in node and not _is_open_mapping(parts[:i])):
                options = list(node) if isinstance(node, dict) else []
                close = difflib.get_close_matches(part, options, n=1)
                hint = f"; did you mean '{'.'.join(parts[:i] + [close[0]])}'?" if close else ""
                raise ConfigError(f"override '{dotted}': no config key '{'.'.join(parts[:i + 1])}'{hint}")
            if i == len(parts) - 1:
                node[part] = copy.deepcopy(value)
            else:
                node = node[part]
    return result


def _is_open_mapping(path: list[str]) -> bool:
    """Free-form mappings whose keys belong to a dataset or timm model, not to the config schema."""
    return path in (["data", "options"], ["backbone", "model_kwargs"])


def build_lpt(values: dict[str, Any]) -> LPTConfig:
    return from_dict(values)


def build_pretrain(values: dict[str, Any] | None):
    from experiments.pretrain_demo import DemoPretrainConfig

    return None if values is None else build_dataclass(DemoPretrainConfig, values, "pretrain")


def resolve_backbone(cfg: LPTConfig, pretrain: dict[str, Any] | None, log=print) -> LPTConfig:
    """The demo's backbone is pretrained by the project itself (cached by content hash); real ones load as is."""
    if pretrain is None or cfg.backbone.weights_file is not None:
        return cfg
    from experiments.pretrain_demo import ensure_demo_backbone

    path = ensure_demo_backbone(cfg.backbone, cfg.data, build_pretrain(pretrain), Path(cfg.data.cache_dir), log=log)
    return dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, weights_file=str(path)))
