"""The paper's experiments build the authors' function (LayerNorm eps 1e-5), and
`experiments/single_run.py evaluate=<file>` evaluates a checkpoint in the authors' release layout on a miniature
Places-LT folder written in the real layout.

The expected numbers come from the literal re-implementation of the authors' computation in
tests/lpt_core/test_official.py, run on the same preprocessed images.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from experiments.compose import compose_config, split
from lpt_core.checkpoint import CheckpointError
from lpt_core.config import DataConfig
from lpt_core.data import Normalization, build_dataset
from lpt_core.official import AUTHORS_NORM_EPS, evaluate_official
from lpt_core.stages import stage_key
from tests.conftest import run_command

REPO = Path(__file__).resolve().parents[2]
PAPER_EXPERIMENTS = ("places_lt", "imagenet_lt", "imagenet_sketch", "inat18", "cifar100_lt")
REQUIRED = {"imagenet_sketch": ["data.root=/data/imagenet", "data.options.sketch_root=/data/sketch"]}


def _reference_module():
    """tests/lpt_core/test_official.py: the tiny release and the literal reference of the authors' forward."""
    spec = importlib.util.spec_from_file_location("official_reference", REPO / "tests/lpt_core/test_official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REF = _reference_module()
# Places-LT training counts that separate the two split rules: n = 101 (many), 50 (medium), 20 (medium under the
# standard rule, few under the authors'), 19 (few), then one image for each of the other 361 classes
COUNTS = [101, 50, 20, 19] + [1] * 361
IMG, RESIZE = REF.TINY["img_size"], REF.TINY["img_size"] + 4
# classes whose classifier weight is set to their own test image's feature: certainly right, in every group
MADE_RIGHT = [0, 1, 2, 3] + list(range(10, 40))


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (RESIZE, RESIZE, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_places_lt(root: Path) -> Path:
    """Places_LT_{train,val,test}.txt + train/<category>/<n>.jpg and val/<category>/Places365_val_<n>.jpg."""
    rng = np.random.default_rng(0)
    train_jpeg = _jpeg(rng)  # never decoded by an evaluation: one file content for all training images
    rows = {"train": [], "val": [], "test": []}
    for c, n in enumerate(COUNTS):
        category = f"category_{c:03d}"
        for i in range(n):
            rows["train"].append((f"train/{category}/{i:08d}.jpg", c))
        rows["val"].append((f"train/{category}/{0:08d}.jpg", c))
        rows["test"].append((f"val/{category}/Places365_val_{c:08d}.jpg", c))
    for split_name, split_rows in rows.items():
        for path, _ in split_rows:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            if not (root / path).exists():
                (root / path).write_bytes(train_jpeg if split_name != "test" else _jpeg(rng))
        (root / f"Places_LT_{split_name}.txt").write_text("".join(f"{p} {c}\n" for p, c in split_rows))
    return root


def data_config(root: Path, cache: Path) -> DataConfig:
    return DataConfig(name="places_lt", root=str(root), img_size=IMG, resize_size=RESIZE, eval_batch_size=128,
                      cache_dir=str(cache))


@pytest.fixture(scope="module")
def places(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """(data root, release file, expected {key: (correct, images)}) for a 365-class tiny LPT release."""
    base = tmp_path_factory.mktemp("places_lt")
    root = write_places_lt(base / "places365_standard")
    test = build_dataset(data_config(root, base / "cache"), Normalization()).test
    images = torch.stack([test[i][0] for i in range(len(test))])  # [365, 3, 32, 32], label i
    release = REF.tiny_release()
    release["prompt_learner.head.weight"] = torch.randn(REF.TINY["embed_dim"], len(COUNTS),
                                                        generator=torch.Generator().manual_seed(5))
    features = _authors_features(release, images)
    release["prompt_learner.head.weight"][:, MADE_RIGHT] = features[MADE_RIGHT].t()
    logits, _ = REF.authors_logits(release, images)
    correct = logits.argmax(dim=-1) == torch.arange(len(COUNTS))
    assert correct[MADE_RIGHT].all()
    path = base / "lpt_places_lt.pth"
    torch.save(release, path)
    return root, path, _expected_counts(correct)


def _authors_features(release: dict, images: torch.Tensor) -> torch.Tensor:
    """The final class-token features of the reference: its logits against an identity classifier [D, D]."""
    dim = REF.TINY["embed_dim"]
    eye = {**release, "prompt_learner.head.weight": torch.eye(dim)}
    with torch.no_grad():
        directions, _ = REF.authors_logits(eye, images)  # cos(feature, e_d) = feature_d / |feature|
    return F.normalize(directions, dim=-1)


def _expected_counts(correct: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Correct / images per group, with the rules written out: authors' few n <= 20, standard few n < 20."""
    n = torch.tensor(COUNTS)
    groups = {
        "acc": torch.ones_like(n, dtype=torch.bool),
        "many": n > 100, "medium": (n > 20) & (n <= 100), "few": n <= 20,
        "many_std": n > 100, "medium_std": (n >= 20) & (n <= 100), "few_std": n < 20,
    }
    return {key: (int(correct[mask].sum()), int(mask.sum())) for key, mask in groups.items()}


def _expected_table(counts: dict[str, tuple[int, int]]) -> list[str]:
    lines = []
    for suffix, label in (("", "authors' rule, few n <= 20"), ("_std", "standard rule, few n < 20")):
        cells = []
        for name, key in (("overall", "acc"), ("many", "many" + suffix), ("medium", "medium" + suffix),
                          ("few", "few" + suffix)):
            right, total = counts[key]
            cells.append(f"{name} {100 * right / total:.2f} ({right}/{total})")
        lines.append(f"{label:<26} " + " | ".join(cells))
    return lines


def tiny_overrides(root: Path, checkpoint: Path, cache: Path) -> list[str]:
    # model=micro: vit_tiny_patch16_224 with model_kwargs, narrowed to the tiny release's shape
    return ["experiment=places_lt", "model=micro", f"data.root={root}", f"evaluate={checkpoint}",
            *(f"backbone.model_kwargs.{k}={v}" for k, v in REF.TINY.items()), f"data.img_size={IMG}",
            f"data.resize_size={RESIZE}", "data.num_workers=0", "data.eval_batch_size=128", f"data.cache_dir={cache}",
            "device=cpu", "precision=fp32", "threads=1"]


@pytest.fixture
def single_run_command(capfd, monkeypatch) -> Callable[[list[str], Path], subprocess.CompletedProcess]:
    """`python experiments/single_run.py ...` as a user types it in a scratch folder (nothing lands in the repo):
    the function its console script runs, in this process (tests/conftest.py's run_command)."""
    from experiments.single_run import cli

    def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        return run_command(cli, [str(REPO / "experiments" / "single_run.py"), *args], capfd, monkeypatch)

    return run


def test_places_lt_expectation_separates_the_split_rules(places) -> None:
    _, _, counts = places
    assert counts["acc"][1] == 365 and counts["few"][1] == 363 and counts["few_std"][1] == 362
    assert counts["medium"] != counts["medium_std"] and counts["few"] != counts["few_std"]


def test_evaluate_command_prints_the_authors_numbers(places, single_run_command, tmp_path: Path) -> None:
    root, checkpoint, counts = places
    result = single_run_command([*tiny_overrides(root, checkpoint, tmp_path / "cache"), f"workdir={tmp_path / 'out'}"],
                     tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith(("authors' rule", "standard rule"))]
    assert table == _expected_table(counts)
    assert "'P': 3, 'm': 5, 'K': 2, 'k': 2, 'ensemble': 'mean', 'query': 'phase1'" in result.stdout
    assert "places_lt test split, 365 images" in result.stdout
    assert (tmp_path / "out" / "result.json").is_file() and (tmp_path / "out" / "per_class.csv").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # nothing else written


def test_evaluate_sets_the_authors_eps_on_a_model_built_with_timm_default(places, tmp_path: Path) -> None:
    """backbone.norm_eps=null on the command line: the import still computes the authors' function."""
    root, checkpoint, counts = places
    overrides = [*tiny_overrides(root, checkpoint, tmp_path / "cache"), "backbone.norm_eps=null"]
    lpt = split(compose_config(overrides)).lpt
    assert lpt.backbone.norm_eps is None
    lines: list[str] = []
    result = evaluate_official(lpt, checkpoint, lines.append)
    assert result.counts == counts
    assert result.metrics["acc"] == 100 * counts["acc"][0] / 365


def test_evaluate_a_missing_checkpoint_names_the_key_and_file(places, single_run_command, tmp_path: Path) -> None:
    root, _, _ = places
    missing = tmp_path / "no_such.pth"
    result = single_run_command(tiny_overrides(root, missing, tmp_path / "cache"), tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: evaluate: {missing}: no such file"


def test_evaluate_refuses_a_checkpoint_of_another_class_count(places, tmp_path: Path) -> None:
    root, _, _ = places
    path = tmp_path / "ten_classes.pth"
    torch.save(REF.tiny_release(), path)  # 11 classes (REF.TC)
    lpt = split(compose_config(tiny_overrides(root, path, tmp_path / "cache"))).lpt
    with pytest.raises(CheckpointError, match=r"classifier for 11 classes, dataset places_lt has 365"):
        evaluate_official(lpt, path, lambda line: None)


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
@pytest.mark.parametrize("model", ["vit_b", "vit_s"])
def test_paper_experiments_use_the_authors_layernorm_eps(experiment: str, model: str) -> None:
    required = REQUIRED.get(experiment, ["data.root=/data/x"])
    lpt = split(compose_config([f"experiment={experiment}", f"model={model}", *required])).lpt
    assert lpt.backbone.norm_eps == AUTHORS_NORM_EPS == 1e-5


def test_demo_keeps_timm_default_eps() -> None:
    assert split(compose_config([])).lpt.backbone.norm_eps is None


def test_norm_eps_is_part_of_every_stage_key() -> None:
    cfg = split(compose_config(["experiment=places_lt", "data.root=/data/x"])).lpt
    timm_default = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, norm_eps=None))
    for stage in ("phase1", "phase2", "joint"):
        assert stage_key(stage, cfg, None) != stage_key(stage, timm_default, None)
