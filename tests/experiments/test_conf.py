"""The Hydra tree composes for every experiment, model and ablation, and validates into LPTConfig at the edge."""
from __future__ import annotations


import pytest

from experiments.ablations import ABLATIONS
from experiments.run import stage_name
from experiments.settings import CONF_DIR, apply_overrides, build_lpt, compose_config, split
from lpt_core.config import ConfigError, LPTConfig

EXPERIMENTS = ("demo", "places_lt", "imagenet_lt", "imagenet_sketch", "inat18", "cifar100_lt")
MODELS = ("micro", "vit_t", "vit_s", "vit_b", "vit_l")
SIZES = {"vit_t": "tiny", "vit_s": "small", "vit_b": "base", "vit_l": "large"}
# what a real experiment needs on the command line
REQUIRED = {"imagenet_sketch": ["data.root=/data/imagenet", "data.options.sketch_root=/data/sketch"]}


def required(experiment: str) -> list[str]:
    if experiment == "demo":
        return []
    return REQUIRED.get(experiment, ["data.root=/data/x"])


def validated(overrides: list[str]) -> LPTConfig:
    return build_lpt(split(compose_config(overrides)).lpt)


@pytest.fixture(scope="module")
def demo_lpt() -> dict:
    return split(compose_config([])).lpt


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    spec = split(compose_config([f"experiment={experiment}", *required(experiment)]))
    cfg = build_lpt(spec.lpt)
    assert spec.name == experiment
    assert cfg.data.name == experiment
    if experiment != "demo":
        assert cfg.data.root == "/data/imagenet" if experiment == "imagenet_sketch" else cfg.data.root == "/data/x"
        assert spec.pretrain is None


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e != "demo"])
def test_real_experiment_without_data_root_names_the_key(experiment: str) -> None:
    extra = ["data.options.sketch_root=/x"] if experiment == "imagenet_sketch" else []
    cfg = compose_config([f"experiment={experiment}", *extra])
    with pytest.raises(ConfigError, match=r"data\.root"):
        split(cfg)


def test_imagenet_sketch_needs_the_sketch_root() -> None:
    cfg = compose_config(["experiment=imagenet_sketch", "data.root=/data/imagenet"])
    with pytest.raises(ConfigError, match=r"data\.options\.sketch_root"):
        split(cfg)
    cfg = validated(["experiment=imagenet_sketch", "data.root=/r", "data.options.sketch_root=/x"])
    assert cfg.data.options == {"sketch_root": "/x"}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("experiment", ["demo", "places_lt"])
def test_every_model_composes_and_validates(model: str, experiment: str) -> None:
    cfg = validated([f"experiment={experiment}", f"model={model}", *required(experiment)])
    if model == "micro":
        assert cfg.backbone.model_kwargs["embed_dim"] == 128 and not cfg.backbone.pretrained
    else:
        assert cfg.backbone.name == f"vit_{SIZES[model]}_patch16_224.augreg_in21k" and cfg.backbone.pretrained
        assert cfg.backbone.model_kwargs == {}


def test_real_experiments_default_to_vit_b() -> None:
    assert validated(["experiment=places_lt", "data.root=/r"]).backbone.name == "vit_base_patch16_224.augreg_in21k"


def test_ablation_yamls_and_registry_match_one_to_one() -> None:
    yamls = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))
    assert yamls == sorted(ABLATIONS)
    for stem in yamls:  # the file names its own registry entry
        text = (CONF_DIR / "ablation" / f"{stem}.yaml").read_text()
        assert f"name: {stem}\n" in text


@pytest.mark.parametrize("ablation", sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml")))
def test_every_ablation_yaml_composes(ablation: str) -> None:
    spec = split(compose_config([f"ablation={ablation}"]))
    assert spec.rest["ablation"] == {"name": ablation, "values": None}
    assert spec.rest["ablation"]["name"] in ABLATIONS
    build_lpt(spec.lpt)


def test_unknown_cli_key_fails_naming_it() -> None:
    with pytest.raises(Exception) as info:
        compose_config(["prompt.pool_sze=3"])
    assert "prompt.pool_sze" in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("prompt.top_k=50", "prompt.top_k"),
    ("phase1.base_lr=-1", "phase1.base_lr"),
    ("prompt.pool_size=abc", "prompt.pool_size"),
    ("phase2.sampling=sometimes", "phase2.sampling"),
    ("data.img_size=4", "data.img_size"),
])
def test_bad_values_fail_naming_the_dotted_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        validated([override])
    assert key in str(info.value)


def test_apply_overrides_refuses_unknown_keys_with_a_suggestion(demo_lpt: dict) -> None:
    with pytest.raises(ConfigError, match=r"prompt\.pool_sze.*did you mean 'prompt\.pool_size'"):
        apply_overrides(demo_lpt, {"prompt.pool_sze": 3})
    with pytest.raises(ConfigError, match=r"no config key 'promt'.*did you mean 'prompt'"):
        apply_overrides(demo_lpt, {"promt.top_k": 1})
    with pytest.raises(ConfigError, match=r"seed\.x"):
        apply_overrides(demo_lpt, {"seed.x": 1})  # a leaf is not a mapping


def test_apply_overrides_copies_and_sets(demo_lpt: dict) -> None:
    out = apply_overrides(demo_lpt, {"prompt.pool_size": 5, "phase2.loss.eta": 0.25})
    assert out["prompt"]["pool_size"] == 5 and out["phase2"]["loss"]["eta"] == 0.25
    assert demo_lpt["prompt"]["pool_size"] == 20  # the input is untouched


def test_apply_overrides_allows_new_keys_in_open_mappings(demo_lpt: dict) -> None:
    out = apply_overrides(demo_lpt, {"data.options.tau": 50, "backbone.model_kwargs.drop_path_rate": 0.0})
    assert out["data"]["options"] == {"tau": 50}
    assert out["backbone"]["model_kwargs"]["drop_path_rate"] == 0.0
    assert "tau" not in demo_lpt["data"]["options"]
    build_lpt(out)


def test_demo_experiment_sets_name_and_pretraining() -> None:
    spec = split(compose_config([]))
    assert spec.name == "demo"
    assert spec.pretrain is not None and spec.pretrain["epochs"] >= 1
    assert spec.lpt["data"]["name"] == "demo" and spec.lpt["backbone"]["weights_file"] is None
    assert "experiment_name" not in spec.rest and "pretrain" not in spec.rest


@pytest.mark.parametrize("phase, training, expected", [
    (1, "decoupled", "phase1"), ("1", "decoupled", "phase1"), (2, "decoupled", "phase2"),
    ("phase2", "decoupled", "phase2"), (1, "joint", "joint"), ("bad", "joint", "joint"),
])
def test_run_stage_name(phase, training: str, expected: str) -> None:
    assert stage_name(phase, training) == expected


def test_run_stage_name_refuses_an_unknown_phase() -> None:
    with pytest.raises(ConfigError, match="phase='bad'"):
        stage_name("bad", "decoupled")
    with pytest.raises(ConfigError, match="phase=3"):
        stage_name(3, "decoupled")
