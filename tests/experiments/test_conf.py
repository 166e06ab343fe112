"""The Hydra tree composes for every experiment, model and ablation, and validates into LPTConfig at the edge."""
from __future__ import annotations

import dataclasses

import pytest
from hydra.core.config_store import ConfigStore
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from experiments.ablations import ABLATIONS, Ablation, register, sweep
from experiments.suites import SUITES
from experiments.pretrain_demo import DemoPretrainConfig
from experiments.single_run import run
from experiments.schema import AblationChoice, ClusterSettings, Resources, SearchSettings, SweepSettings
from experiments.compose import CONF_DIR, check_command_line, compose_config, register_configs, split
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
    return split(compose_config(overrides)).lpt


@pytest.fixture(scope="module")
def demo_lpt() -> LPTConfig:
    return split(compose_config([])).lpt


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment: str) -> None:
    spec = split(compose_config([f"experiment={experiment}", *required(experiment)]))
    cfg = spec.lpt
    assert isinstance(cfg, LPTConfig)
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


def _stored_options(group: str) -> list[str]:
    register_configs()
    return sorted(name.removesuffix(".yaml") for name in ConfigStore.instance().list(group))


def test_ablation_group_and_registry_match_one_to_one() -> None:
    options = _stored_options("ablation")
    assert options == sorted({*ABLATIONS, *SUITES})  # every ablation, and every suite of them (ablation=paper)
    for name in options:  # the option names its own registry entry
        node = ConfigStore.instance().load(f"ablation/{name}.yaml").node
        assert node["name"] == name and node["values"] is None
    assert not (CONF_DIR / "ablation").exists()  # the registry is the only place an ablation is named


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_option_composes(ablation: str) -> None:
    spec = split(compose_config([f"ablation={ablation}"]))
    assert spec.settings.ablation == AblationChoice(name=ablation, values=None)
    assert spec.settings.ablation.name in ABLATIONS
    assert isinstance(spec.lpt, LPTConfig)  # typed and validated by split


def test_a_registered_ablation_is_a_choice_of_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adding an ablation is one register() entry: nothing else makes `ablation=<name>` work."""
    store = ConfigStore.instance()
    monkeypatch.setitem(store.repo, "ablation", dict(store.repo["ablation"]))  # restored after the test
    before = dict(ABLATIONS)
    register(Ablation("test_head_dropout", "Dropout on the feature", "p", stages=("phase1", "phase2"),
                      points=tuple(sweep("prompt.head_dropout", [0.0, 0.1])), reference="0.1"))
    try:
        spec = split(compose_config(["ablation=test_head_dropout", "ablation.values=[0.1]"]))
    finally:
        ABLATIONS.clear()
        ABLATIONS.update(before)
    assert spec.settings.ablation == AblationChoice(name="test_head_dropout", values=[0.1])


def test_an_unknown_choice_is_refused_listing_the_options() -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_config(["ablation=group_sise"])
    assert "Could not find 'ablation/group_sise'" in str(info.value)
    assert all(f"\t{name}\n" in str(info.value) for name in ABLATIONS)
    with pytest.raises(MissingConfigException, match=r"Available options in 'search':\n\tgrid\n\toptuna\n"):
        compose_config(["search=optunaa"])


def test_sweep_settings_default_to_their_dataclass() -> None:
    assert split(compose_config([])).settings == SweepSettings()
    expected = SweepSettings(ablation=AblationChoice("group_size"))
    assert split(compose_config(["ablation=group_size"])).settings == expected
    optuna = split(compose_config(["ablation=loss", "search=optuna", "search.num_samples=4"])).settings.search
    assert optuna == SearchSettings(name="optuna", num_samples=4)
    assert split(compose_config(["cluster=ray"])).settings.cluster == ClusterSettings(name="ray", address="auto")
    assert split(compose_config(["search=grid", "cluster=local"])).settings == SweepSettings()


def test_an_experiment_sets_its_trial_resources() -> None:
    """The experiment's yaml comes after the sweep defaults (a config.yaml that repeated the defaults after the
    groups used to override it: every real experiment ran with 1 CPU and no GPU per trial)."""
    assert split(compose_config(["experiment=places_lt", "data.root=/r"])).settings.resources == Resources(8, 1)
    assert split(compose_config(["experiment=cifar100_lt", "data.root=/r"])).settings.resources == Resources(4, 0.5)
    assert split(compose_config(["experiment=places_lt", "data.root=/r", "resources.gpu=0.25"])
                 ).settings.resources == Resources(8, 0.25)


def _yaml_leaves(values: dict, prefix: str = "") -> dict[str, object]:
    leaves = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            leaves.update(_yaml_leaves(value, f"{dotted}."))
        else:
            leaves[dotted] = value
    return leaves


def test_no_yaml_repeats_a_sweep_settings_default() -> None:
    """Every default of SweepSettings exists once, in its dataclass: a yaml sets only what differs from it."""
    defaults = _yaml_leaves(dataclasses.asdict(SweepSettings()))
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        leaves = _yaml_leaves(OmegaConf.to_container(OmegaConf.load(path)))
        repeated = {k: v for k, v in leaves.items() if k in defaults and defaults[k] == v}
        assert not repeated, (path.relative_to(CONF_DIR), repeated)


# the cases tests/orchestration/test_cli_errors.py also runs through both command lines
UNKNOWN_KEYS = [
    ("+model.not_a_key=3", "override 'model.not_a_key': no config key 'model'; 'model' is a config group, "
                           "chosen with model=<name>, not a key"),
    ("+data.not_a_key=1", "override 'data.not_a_key': no config key 'data.not_a_key'; valid keys under data: "
                          "name, root, options, img_size,"),
    ("resourses.cpu=1", "override 'resourses.cpu': no config key 'resourses'; did you mean 'resources'?"),
    ("+resourses.cpu=1", "override 'resourses.cpu': no config key 'resourses'; did you mean 'resources'?"),
    ("prompt.pool_sise=3", "override 'prompt.pool_sise': no config key 'prompt.pool_sise'; "
                           "did you mean 'prompt.pool_size'?"),
    ("++pretrain.epoch=3", "override 'pretrain.epoch': no config key 'pretrain.epoch'; "
                           "did you mean 'pretrain.epochs'?"),
    ("~debug.fail_rows", "override 'debug.fail_rows': no config key 'debug.fail_rows'; "
                         "did you mean 'debug.fail_row'?"),
    ("seed.x=1", "override 'seed.x': no config key 'seed.x'; 'seed' holds a value, not keys"),
]


@pytest.mark.parametrize("override, message", UNKNOWN_KEYS)
def test_command_line_refuses_an_unknown_key_naming_the_closest(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_command_line(["stage=phase1", override])
    assert str(info.value).startswith(message)


def test_command_line_leaves_groups_flags_hydra_keys_and_open_mappings_alone() -> None:
    check_command_line(["--multirun", "--cfg", "job", "model=vit_b", "experiment=places_lt", "ablation=group_size",
                        "ablation.values=[5,10]", "pretrain=demo", "~pretrain", "hydra.run.dir=/x",
                        "hydra/job_logging=stdout", "model@backbone=micro", "prompt.pool_size=5,10",
                        "++data.options.tau=10", "backbone.model_kwargs.drop_path_rate=0.1", "seeds=[0,1]",
                        "search.num_samples=4", "debug.hold_at_epoch=1", "init_from=/c", "stage=phase2"])


def test_an_unknown_key_added_from_a_yaml_or_compose_is_refused_by_split() -> None:
    """What check_command_line cannot see (a key added by a config file or the compose API) split refuses."""
    with pytest.raises(ConfigError, match=r"unknown config key 'model'"):
        split(compose_config(["+model.not_a_key=3"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'pretrain\.epoch'; did you mean 'epochs'"):
        split(compose_config(["+pretrain.epoch=3"]))
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.not_a_key'"):
        split(compose_config(["+data.not_a_key=1"])).lpt


@pytest.mark.parametrize("override, message", [
    ("+model.not_a_key=3", "unknown config key 'model'"),
    ("+data.not_a_key=1", "unknown config key 'data.not_a_key'"),
    ("stage=phase3", r"stage: 'phase3' is not one of \['phase1', 'phase2'\]"),
    ("stage=phase2", "stage=phase2 needs init_from"),
])
def test_run_refuses_before_any_work(tmp_path, override: str, message: str) -> None:
    cfg = compose_config([override, f"workdir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert list(tmp_path.iterdir()) == []  # no demo data, no pretrained backbone, no run folder


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


def test_with_overrides_refuses_unknown_keys_with_a_suggestion(demo_lpt: LPTConfig) -> None:
    with pytest.raises(ConfigError, match=r"prompt\.pool_sze.*did you mean 'prompt\.pool_size'"):
        demo_lpt.with_overrides({"prompt.pool_sze": 3})
    with pytest.raises(ConfigError, match=r"no config key 'promt'.*did you mean 'prompt'"):
        demo_lpt.with_overrides({"promt.top_k": 1})
    with pytest.raises(ConfigError, match=r"seed\.x"):
        demo_lpt.with_overrides({"seed.x": 1})  # a leaf is not a mapping


def test_with_overrides_copies_and_sets(demo_lpt: LPTConfig) -> None:
    out = demo_lpt.with_overrides({"prompt.pool_size": 5, "phase2.loss.eta": 0.25})
    assert out.prompt.pool_size == 5 and out.phase2.loss.eta == 0.25
    assert demo_lpt.prompt.pool_size == 20  # the input is untouched


def test_with_overrides_allows_new_keys_in_open_mappings(demo_lpt: LPTConfig) -> None:
    out = demo_lpt.with_overrides({"data.options.tau": 50, "backbone.model_kwargs.drop_path_rate": 0.0})
    assert out.data.options == {"tau": 50}
    assert out.backbone.model_kwargs["drop_path_rate"] == 0.0
    assert "tau" not in demo_lpt.data.options


def test_with_overrides_types_and_validates_the_value(demo_lpt: LPTConfig) -> None:
    with pytest.raises(ConfigError, match=r"prompt\.pool_size: expected int, got 'abc'"):
        demo_lpt.with_overrides({"prompt.pool_size": "abc"})
    with pytest.raises(ConfigError, match=r"prompt\.top_k"):
        demo_lpt.with_overrides({"prompt.top_k": 50})  # valid type, invalid with pool_size 20
    assert demo_lpt.with_overrides({"phase2.loss.eta": 1}).phase2.loss.eta == 1.0  # an int is a fine float


def test_demo_experiment_sets_name_and_pretraining() -> None:
    spec = split(compose_config([]))
    assert spec.name == "demo"
    assert spec.pretrain == DemoPretrainConfig()  # the demo yaml picks the recipe's defaults unchanged
    assert spec.lpt.data.name == "demo" and spec.lpt.backbone.weights_file is None
