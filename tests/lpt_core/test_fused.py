"""Fused phase-2 rows (lpt_core.fused) against the same rows trained alone by run_stage: the same logits (to the
float rounding of a larger matrix product), the same metrics, checkpoints either runner resumes, a NaN row that
fails alone, and a killed fused run that resumes each row from its own newest checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from lpt_core.backbone import create_backbone, normalization
from lpt_core.checkpoint import load_checkpoint, read_meta
from lpt_core.config import LPTConfig
from lpt_core.data import Normalization, build_dataset
from lpt_core.fused import FusedRow, check_fusable, run_fused_stage
from lpt_core.model import LPTModel
from lpt_core.stages import fusion_key
from lpt_core.train import NonFiniteLossError, run_stage

from .conftest import QuietHooks, assert_same, without_timing

LOGIT_TOLERANCE = 1e-5
# three epochs of three steps per branch: the rows' pools drift apart from the first step on; every epoch
# evaluated, and the query features' K-NN accuracy and gamma at the end (computed for all rows in one pass)
THREE_EPOCHS = {"phase2": {"epochs": 3, "steps_per_epoch": 3, "base_lr": 0.5},
                "eval": {"every_epochs": 1, "feature_stats": True}}


def _test_logits(cfg: LPTConfig, checkpoint: Path) -> torch.Tensor:
    """The cosine logits [N, C] of the test split under the phase-2 checkpoint's prompts and classifier."""
    backbone = create_backbone(cfg.backbone)
    bundle = build_dataset(cfg.data, Normalization(*normalization(backbone)))
    model = LPTModel(backbone, bundle.num_classes, cfg.prompt).eval()
    state, _ = load_checkpoint(checkpoint)
    model.load_state_dict(state["model"], strict=False)
    images = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])
    with torch.no_grad():
        return model(images, "phase2").logits


def _assert_same_results(a, b) -> None:
    """The same metrics and history (timing aside), NaN where the other has NaN (a class group without classes)."""
    assert {"query_knn_acc", "query_gamma"} <= set(a.metrics)
    assert_same(without_timing([a.metrics, *a.history]), without_timing([b.metrics, *b.history]))


def _alone(cfg: LPTConfig, phase1: Path, workdir: Path):
    return run_stage(cfg, "phase2", workdir, QuietHooks(), init_from=phase1)


def _assert_rows_equal(configs: list[LPTConfig], phase1: Path, tmp_path: Path) -> None:
    fused = run_fused_stage([FusedRow(cfg, tmp_path / f"fused{i}", QuietHooks(), init_from=phase1)
                             for i, cfg in enumerate(configs)])
    for i, (cfg, outcome) in enumerate(zip(configs, fused)):
        assert outcome.error is None
        alone = _alone(cfg, phase1, tmp_path / f"alone{i}")
        difference = (_test_logits(cfg, outcome.result.checkpoint_dir)
                      - _test_logits(cfg, alone.checkpoint_dir)).abs().max().item()
        assert difference <= LOGIT_TOLERANCE, (i, difference)
        _assert_same_results(outcome.result, alone)
        assert outcome.result.predictions.equals(alone.predictions)


def test_group_sizes_fused_equal_each_row_alone(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                               tmp_path: Path) -> None:
    configs = [make_config({**THREE_EPOCHS, "prompt": {"pool_size": m}}) for m in (2, 4, 8)]
    _assert_rows_equal(configs, phase1_checkpoint, tmp_path)


def test_query_functions_share_only_what_they_share(make_config: Callable[..., LPTConfig],
                                                    phase1_checkpoint: Path, tmp_path: Path) -> None:
    """phase1 and pretrained queries (and a top-2 concatenation, another prompt shape) in one fused run."""
    configs = [make_config({**THREE_EPOCHS, "prompt": {"query": "phase1"}}),
               make_config({**THREE_EPOCHS, "prompt": {"query": "pretrained"}}),
               make_config({**THREE_EPOCHS, "prompt": {"top_k": 2, "ensemble": "concat"}})]
    _assert_rows_equal(configs, phase1_checkpoint, tmp_path)


def test_rows_with_another_data_stream_are_refused(make_config: Callable[..., LPTConfig]) -> None:
    same = [make_config({"prompt": {"pool_size": m}, "phase2": {"base_lr": lr}}) for m, lr in ((2, 1.0), (8, 3.0))]
    check_fusable(same)
    assert fusion_key(same[0]) == fusion_key(same[1])
    for other in ({"phase2": {"batch_size": 8}}, {"seed": 1}, {"phase2": {"loss": {"name": "ce"}}},
                  {"phase1": {"epochs": 1}}, {"phase2": {"sampling": "instance"}}):
        with pytest.raises(ValueError, match="cannot train fused"):
            check_fusable([same[0], make_config(other)])


def test_a_diverging_row_fails_alone_and_the_others_finish(make_config: Callable[..., LPTConfig],
                                                           phase1_checkpoint: Path, tmp_path: Path) -> None:
    good = make_config({**THREE_EPOCHS, "prompt": {"pool_size": 2}})
    diverging = make_config({**THREE_EPOCHS, "phase2": {**THREE_EPOCHS["phase2"], "base_lr": 1e38}})
    hooks = [QuietHooks(), QuietHooks()]
    outcomes = run_fused_stage([FusedRow(diverging, tmp_path / "bad", hooks[0], init_from=phase1_checkpoint),
                                FusedRow(good, tmp_path / "good", hooks[1], init_from=phase1_checkpoint)])
    assert isinstance(outcomes[0].error, NonFiniteLossError) and outcomes[0].result is None
    assert "phase2 epoch 0" in str(outcomes[0].error) and hooks[0].epochs == []
    alone = _alone(good, phase1_checkpoint, tmp_path / "alone")
    _assert_same_results(outcomes[1].result, alone)
    assert [e for e, _, _ in hooks[1].epochs] == [0, 1, 2]


class _KillAfter(QuietHooks):
    """Ends the process's run after an epoch, as a killed trial would (once its checkpoint is written)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.kill_epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        super().on_epoch_end(epoch, metrics, checkpoint_dir)
        if epoch == self.kill_epoch:
            raise KeyboardInterrupt("killed")


def _newest(workdir: Path) -> Path:
    return sorted((workdir / "checkpoints").glob("epoch_*"))[-1]


def test_a_killed_fused_run_resumes_each_row_from_its_own_checkpoint(make_config: Callable[..., LPTConfig],
                                                                     phase1_checkpoint: Path,
                                                                     tmp_path: Path) -> None:
    """Killed after row 0 saved epoch 1 and before row 1 did (row 1 stands at epoch 1, row 0 at epoch 2): the
    resumed run trains each epoch once per row and ends where the uninterrupted rows end, with no epoch reported
    twice."""
    configs = [make_config({**THREE_EPOCHS, "prompt": {"pool_size": m}}) for m in (2, 8)]
    workdirs = [tmp_path / "row0", tmp_path / "row1"]
    first = [_KillAfter(epoch=1), QuietHooks()]
    with pytest.raises(KeyboardInterrupt):
        run_fused_stage([FusedRow(cfg, w, h, init_from=phase1_checkpoint)
                         for cfg, w, h in zip(configs, workdirs, first)])
    assert read_meta(_newest(workdirs[0]))["epoch"] == 1 and read_meta(_newest(workdirs[1]))["epoch"] == 0
    second = [QuietHooks(), QuietHooks()]
    resumed = run_fused_stage([FusedRow(cfg, w, h, init_from=phase1_checkpoint, resume_from=_newest(w))
                               for cfg, w, h in zip(configs, workdirs, second)])
    assert [e for e, _, _ in second[0].epochs] == [2] and [e for e, _, _ in second[1].epochs] == [1, 2]
    for i, (cfg, outcome) in enumerate(zip(configs, resumed)):
        straight = _alone(cfg, phase1_checkpoint, tmp_path / f"straight{i}")
        _assert_same_results(outcome.result, straight)


def test_an_unfused_run_resumes_a_fused_rows_checkpoint(make_config: Callable[..., LPTConfig],
                                                        phase1_checkpoint: Path, tmp_path: Path) -> None:
    """One checkpoint format, one stage key: a row fused until epoch 1 finishes alone where it would have."""
    configs = [make_config({**THREE_EPOCHS, "prompt": {"pool_size": m}}) for m in (2, 8)]
    with pytest.raises(KeyboardInterrupt):
        run_fused_stage([FusedRow(cfg, tmp_path / f"row{i}", _KillAfter(epoch=1) if i else QuietHooks(),
                                  init_from=phase1_checkpoint) for i, cfg in enumerate(configs)])
    finished = run_stage(configs[1], "phase2", tmp_path / "row1", QuietHooks(), init_from=phase1_checkpoint,
                         resume_from=_newest(tmp_path / "row1"))
    straight = _alone(configs[1], phase1_checkpoint, tmp_path / "straight")
    _assert_same_results(finished, straight)


def test_rows_from_different_phase1_checkpoints_are_refused(make_config: Callable[..., LPTConfig],
                                                            phase1_checkpoint: Path, tmp_path: Path) -> None:
    """Same config, but one row starts from phase 1's epoch 0 and the other from its last epoch: the shared pass
    would run one u for both."""
    earlier = phase1_checkpoint.parent / "epoch_0000"
    assert earlier.is_dir() and earlier != phase1_checkpoint
    cfg = make_config()
    with pytest.raises(ValueError, match="fused rows must start from one phase-1 checkpoint"):
        run_fused_stage([FusedRow(cfg, tmp_path / "a", QuietHooks(), init_from=phase1_checkpoint),
                         FusedRow(cfg, tmp_path / "b", QuietHooks(), init_from=earlier)])


# the demo domain (lpt_core.data.synthetic), as small as the orchestration tests run it
DEMO_DATA = {"name": "demo", "img_size": 16, "resize_size": 16, "eval_batch_size": 64,
             "options": {"num_classes": 10, "num_groups": 5, "n_max": 40, "tau": 10, "test_per_class": 4,
                         "source_per_class": 20, "source_test_per_class": 4}}


@pytest.mark.parametrize("rows", [
    [{"pool_size": 5}, {"pool_size": 10}, {"pool_size": 20}],  # a group_size subset
    [{"query": "phase1"}, {"query": "pretrained"}],  # a query_function pair: they share the embedding only
], ids=["group_size", "query_function"])
def test_demo_rows_fused_equal_each_row_alone(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                              rows: list[dict]) -> None:
    demo = {**THREE_EPOCHS, "data": {**DEMO_DATA, "cache_dir": str(tmp_path / "cache")}}
    phase1 = run_stage(make_config(demo), "phase1", tmp_path / "phase1", QuietHooks()).checkpoint_dir
    _assert_rows_equal([make_config({**demo, "prompt": prompt}) for prompt in rows], phase1, tmp_path)
