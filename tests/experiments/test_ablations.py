"""The ablation registry: the paper's ablations as data, every point valid on the demo and on a real experiment."""
from __future__ import annotations

import pytest

from experiments.ablations import (ABLATIONS, RUN_UNTIL, Ablation, Distribution, Point, get_ablation, product,
                                   register, sweep, zipit)
from experiments.pretrain_demo import DemoPretrainConfig, backbone_hash
from experiments.compose import compose_config, split
from lpt_core.config import ConfigError, LPTConfig
from lpt_core.stages import stage_chain

REQUIRED = ("group_size", "decoupled_vs_joint", "query_function", "model_size", "loss", "per_phase", "topk",
            "ensemble", "prompt_length", "sampling")


@pytest.fixture(scope="module")
def experiments() -> dict[str, LPTConfig]:
    """experiment name -> the LPTConfig as composed (demo, and places_lt with its data root)."""
    return {name: split(compose_config(overrides)).lpt
            for name, overrides in {"demo": [], "places_lt": ["experiment=places_lt", "data.root=/data/p"]}.items()}


def apply_point(lpt: LPTConfig, point: Point) -> LPTConfig:
    return lpt.with_overrides({k: v for k, v in point.overrides.items() if k != RUN_UNTIL})


def test_registry_has_the_required_ablations() -> None:
    assert set(REQUIRED) <= set(ABLATIONS)
    for name in REQUIRED:
        ablation = ABLATIONS[name]
        assert ablation.name == name and ablation.points and ablation.axis and ablation.description


def test_group_size_sweeps_m() -> None:
    points = get_ablation("group_size").points
    assert [p.overrides for p in points] == [{"prompt.pool_size": m} for m in (5, 10, 20, 40)]
    assert [p.label for p in points] == ["5", "10", "20", "40"]
    assert get_ablation("group_size").paper["20"] == 50.07


def test_topk_ensemble_query_decoupled_prompt_length() -> None:
    def values(name: str, key: str) -> list:
        return [p.overrides[key] for p in get_ablation(name).points]

    assert values("topk", "prompt.top_k") == [1, 2, 3, 4]
    assert values("ensemble", "prompt.ensemble") == ["mean", "concat"]
    assert values("query_function", "prompt.query") == ["phase1", "pretrained"]
    assert values("decoupled_vs_joint", "training") == ["decoupled", "joint"]
    assert "joint" in get_ablation("decoupled_vs_joint").stages
    assert len(values("prompt_length", "prompt.length")) >= 2
    assert "phase1" in get_ablation("prompt_length").stages


def test_sampling_moves_both_phases_together() -> None:
    points = get_ablation("sampling").points
    assert len(points) == 3
    for p in points:
        assert p.overrides["phase1.sampling"] == p.overrides["phase2.sampling"] == p.label
    assert {p.label for p in points} == {"dual", "class_balanced", "instance"}


def test_model_size_has_demo_points() -> None:
    ablation = get_ablation("model_size")
    assert ablation.demo_points and ablation.points_for("demo") == ablation.demo_points
    assert ablation.points_for("places_lt") == ablation.points
    assert all("backbone.name" in p.overrides for p in ablation.points)
    assert all(any(k.startswith("backbone.model_kwargs.") for k in p.overrides) for p in ablation.demo_points)
    assert "pretrain" in ablation.stages


def test_loss_has_an_optuna_space() -> None:
    space = get_ablation("loss").space
    assert set(space) == {"phase2.loss.lambda_pos_ib", "phase2.loss.lambda_neg_ib", "phase2.loss.eta"}
    assert all(isinstance(d, Distribution) and d.low < d.high for d in space.values())


def test_per_phase_rows_stop_after_phase1() -> None:
    points = get_ablation("per_phase").points
    assert len(points) == 5
    assert [p.overrides.get(RUN_UNTIL) for p in points] == ["phase1"] * 4 + [None]
    assert points[-1].label == "full_lpt"


def test_no_ablation_without_search_space_is_searchable() -> None:
    assert [name for name, a in ABLATIONS.items() if a.space] == ["loss"]


@pytest.mark.parametrize("experiment", ["demo", "places_lt"])
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_every_point_applies_and_validates(experiments: dict, experiment: str, name: str) -> None:
    ablation = ABLATIONS[name]
    points = ablation.points_for(experiment)
    assert len({p.label for p in points}) == len(points), "row labels must be unique"
    for point in points:
        cfg = apply_point(experiments[experiment], point)
        for key, value in point.overrides.items():
            if key == RUN_UNTIL:
                continue
            node = cfg
            for part in key.split("."):
                node = node[part] if isinstance(node, dict) else getattr(node, part)
            assert node == value, (name, point.label, key)
    for bound in ("low", "high"):  # both ends of an Optuna space are valid configs too
        if ablation.space:
            experiments[experiment].with_overrides({k: getattr(d, bound) for k, d in ablation.space.items()})


def test_sweep_labels_and_overrides() -> None:
    assert sweep("a.b", [1, 2]) == [Point("1", {"a.b": 1}), Point("2", {"a.b": 2})]
    assert sweep("a.b", [3], label="m={}") == [Point("m=3", {"a.b": 3})]


def test_zipit_merges_point_by_point() -> None:
    zipped = zipit(sweep("x", [1, 2]), sweep("y", ["a", "b"]))
    assert zipped == [Point("1", {"x": 1, "y": "a"}), Point("2", {"x": 2, "y": "b"})]


def test_zipit_refuses_length_mismatch() -> None:
    with pytest.raises(ValueError, match="equal length"):
        zipit(sweep("x", [1, 2]), sweep("y", [1]))


def test_product_is_every_combination() -> None:
    points = product(sweep("x", [1, 2]), sweep("y", ["a", "b"]))
    assert [p.label for p in points] == ["1,a", "1,b", "2,a", "2,b"]
    assert points[1].overrides == {"x": 1, "y": "b"}
    assert len(get_ablation("loss").points) == 4


def test_get_ablation_suggests_the_closest_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'group_size'") as info:
        get_ablation("group_sise")
    assert "topk" in str(info.value)  # the registered names are listed
    with pytest.raises(ConfigError, match="unknown ablation"):
        get_ablation("zzz")


def test_register_refuses_duplicates_and_unknown_stages() -> None:
    before = dict(ABLATIONS)
    with pytest.raises(ValueError, match="registered twice"):
        register(Ablation("group_size", "again", "m", points=(Point("1", {}),)))
    with pytest.raises(ValueError, match="unknown stages"):
        register(Ablation("test_bad_stage", "x", "x", points=(Point("1", {}),), stages=("phase3",)))
    assert ABLATIONS == before


@pytest.mark.parametrize("experiment", ["demo", "places_lt"])
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_stages_are_the_stages_whose_key_the_axis_changes(experiments: dict, experiment: str, name: str) -> None:
    """The README's promise: every stage an ablation does not name has one key for all its rows (one training,
    shared), every stage it names differs between rows (another key, or run by some rows only)."""
    ablation = ABLATIONS[name]
    keys: dict[str, list[str]] = {}
    points = ablation.points_for(experiment)
    for point in points:
        cfg = apply_point(experiments[experiment], point)
        for spec in stage_chain(cfg, point.overrides.get(RUN_UNTIL)):
            keys.setdefault(spec.stage, []).append(spec.key)
        if experiment == "demo":
            keys.setdefault("pretrain", []).append(backbone_hash(cfg.backbone, cfg.data, DemoPretrainConfig()))
    for stage, found in keys.items():
        shared = len(set(found)) == 1 and len(found) == len(points)
        assert shared == (stage not in ablation.stages), (stage, found)


def test_register_refuses_stages_that_are_not_what_the_axis_changes() -> None:
    before = dict(ABLATIONS)
    with pytest.raises(ValueError, match=r"stages=\('phase2',\), but its axis changes \('phase1', 'phase2'\) "
                                         r"\(prompt\.length changes phase1, phase2\)"):
        register(Ablation("test_length", "x", "P", points=tuple(sweep("prompt.length", [1, 2])), reference="1"))
    with pytest.raises(ValueError, match=r"axis changes \('phase1', 'phase2'\) \(eval\.knn_k changes phase1"):
        register(Ablation("test_knn", "x", "k", points=tuple(sweep("eval.knn_k", [5, 10])), reference="5"))
    with pytest.raises(ValueError, match=r"stages=\('phase1', 'phase2'\), but its axis changes \('phase2',\)"):
        register(Ablation("test_pool", "x", "m", points=tuple(sweep("prompt.pool_size", [5, 10])), reference="5",
                          stages=("phase1", "phase2")))
    with pytest.raises(ValueError, match=r"axis changes \('pretrain', 'phase1', 'phase2'\)"):
        register(Ablation("test_width", "x", "w", points=tuple(sweep("backbone.model_kwargs.embed_dim", [64, 128])),
                          reference="64", stages=("phase1", "phase2")))
    with pytest.raises(ValueError, match=r"only some rows run phase2"):
        register(Ablation("test_stop", "x", "r", points=(Point("p1", {RUN_UNTIL: "phase1"}), Point("all", {})),
                          reference="all", stages=()))
    assert ABLATIONS == before


def test_every_grid_names_its_reference_row_and_register_checks_it() -> None:
    for ablation in ABLATIONS.values():
        for experiment in ("places_lt", "demo"):
            labels = [p.label for p in ablation.points_for(experiment)]
            assert ablation.reference_for(experiment) in labels, (ablation.name, experiment)
    assert get_ablation("model_size").reference_for("places_lt") == "vit_b"
    assert get_ablation("model_size").reference_for("demo") == "micro_m"
    assert get_ablation("per_phase").reference == "full_lpt"
    before = dict(ABLATIONS)
    with pytest.raises(ValueError, match=r"reference='3' must be one of its rows \['1', '2'\]"):
        register(Ablation("test_bad_ref", "x", "x", points=tuple(sweep("x", [1, 2])), reference="3"))
    with pytest.raises(ValueError, match="reference=None must be one of its rows"):
        register(Ablation("test_no_ref", "x", "x", points=tuple(sweep("x", [1, 2]))))
    with pytest.raises(ValueError, match=r"demo_reference='a' must be one of its rows \['s', 'l'\]"):
        register(Ablation("test_bad_demo_ref", "x", "x", points=tuple(sweep("x", [1, 2])), reference="1",
                          demo_points=tuple(sweep("y", ["s", "l"])), demo_reference="a"))
    with pytest.raises(ValueError, match=r"step \('2', '3'\) must be two different rows of \['1', '2'\]"):
        register(Ablation("test_bad_step", "x", "x", points=tuple(sweep("x", [1, 2])), reference="1",
                          steps=(("2", "3"),)))
    with pytest.raises(ValueError, match=r"step \('1', '1'\) must be two different rows"):
        register(Ablation("test_self_step", "x", "x", points=tuple(sweep("x", [1, 2])), reference="1",
                          steps=(("1", "1"),)))
    assert ABLATIONS == before
