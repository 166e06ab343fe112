"""What a stage's checkpoint holds: what the stage trains and what its downstream needs, nothing that depends on
config fields outside the stage's key. So a phase 1 interrupted at one pool size resumes at another, and a
checkpoint that still does not fit is refused by name, not by torch's size-mismatch error."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from lpt_core.checkpoint import META_FILE, CheckpointError, load_checkpoint, read_meta, save_checkpoint
from lpt_core.config import LPTConfig, to_dict
from lpt_core.stages import STAGE_FIELDS, stage_inputs
from lpt_core.train import run_stage

from .conftest import QuietHooks, assert_same, without_timing

PHASE1_PARTS = ["shared_prompt.tokens", "head.weight"]
# two trials that share phase 1's key and differ in fields outside it (the pool, matching, phase 2)
POOL_5 = {"prompt": {"pool_size": 5, "top_k": 1, "block_k": 1}, "phase2": {"epochs": 7}}
POOL_20 = {"prompt": {"pool_size": 20, "top_k": 3}}


class _Preempted(Exception):
    """Stands for the process being killed mid-phase (raised from a hook after an epoch's checkpoint)."""


class PreemptAfter(QuietHooks):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        if epoch == self.epoch:
            raise _Preempted


def test_phase1_checkpoints_of_trials_that_share_its_key_are_the_same(make_config: Callable[..., LPTConfig],
                                                                       tmp_path: Path, quiet_hooks) -> None:
    runs = [run_stage(make_config(other), "phase1", tmp_path / name, quiet_hooks)
            for name, other in (("m5", POOL_5), ("m20", POOL_20))]
    (a, meta_a), (b, meta_b) = (load_checkpoint(r.checkpoint_dir) for r in runs)
    assert list(a["model"]) == PHASE1_PARTS  # no pool: its shape is [m, ...]
    assert a["optimizer_params"] == PHASE1_PARTS
    a["history"], b["history"] = without_timing(a["history"]), without_timing(b["history"])
    assert_same(a, b)
    del meta_a["sha256"], meta_b["sha256"]  # state.pt holds the epochs' timings
    assert meta_a == meta_b
    assert meta_a["config"] == stage_inputs(make_config(POOL_20), "phase1")


def test_a_checkpoint_records_exactly_its_stage_fields(make_config: Callable[..., LPTConfig]) -> None:
    cfg = make_config(POOL_5)
    full = to_dict(cfg)
    phase1 = stage_inputs(cfg, "phase1")
    assert set(phase1) == {"backbone", "data", "eval", "seed", "precision", "phase1", "prompt"}
    assert phase1["prompt"] == {"length": 2, "shared": True, "init_std": full["prompt"]["init_std"],
                                "head_dropout": full["prompt"]["head_dropout"]}
    assert phase1["phase1"] == full["phase1"] and phase1["backbone"] == full["backbone"]
    for phase in ("phase2", "joint"):
        assert stage_inputs(cfg, phase) == {name: full[name] for name in STAGE_FIELDS[phase]}


def _resave(checkpoint: Path, folder: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of `checkpoint` whose state `edit` changed, checksummed like any checkpoint."""
    state, _ = load_checkpoint(checkpoint)
    edit(state)
    meta = {k: v for k, v in read_meta(checkpoint).items() if k not in ("sha256", "format_version")}
    return save_checkpoint(folder, state, meta)


def _as_before_the_fix(state: dict) -> None:
    """What the code before this fix wrote into a phase-1 checkpoint: the m=5 pool too, no optimizer names."""
    state["model"]["group_pool.keys"] = torch.randn(5, 32)
    state["model"]["group_pool.prompts"] = torch.randn(5, 2, 2, 32)
    del state["optimizer_params"]


@pytest.mark.parametrize("layout", ["current", "before_the_fix"])
def test_phase1_interrupted_at_one_pool_size_resumes_at_another(make_config: Callable[..., LPTConfig],
                                                                 tmp_path: Path, quiet_hooks, layout: str) -> None:
    phase1 = {"phase1": {"epochs": 3}, "eval": {"every_epochs": 1}}
    straight = run_stage(make_config({**POOL_20, **phase1}), "phase1", tmp_path / "straight", quiet_hooks)

    with pytest.raises(_Preempted):
        run_stage(make_config({**POOL_5, **phase1}), "phase1", tmp_path / "m5", PreemptAfter(epoch=1))
    checkpoint = tmp_path / "m5" / "checkpoints" / "epoch_0001"
    if layout == "before_the_fix":
        checkpoint = _resave(checkpoint, tmp_path / "old" / "epoch_0001", _as_before_the_fix)
    resumed = run_stage(make_config({**POOL_20, **phase1}), "phase1", tmp_path / "m20", quiet_hooks,
                        resume_from=checkpoint)

    assert resumed.extras["resumed_after_epoch"] == 1
    assert_same(without_timing(resumed.history), without_timing(straight.history), "history")
    assert_same(*without_timing([resumed.metrics, straight.metrics]), "metrics")
    assert_same(load_checkpoint(resumed.checkpoint_dir)[0]["model"],
                 load_checkpoint(straight.checkpoint_dir)[0]["model"])


@pytest.mark.parametrize("phase, how", [("phase1", "resume_from"), ("phase2", "init_from")])
def test_a_tensor_that_does_not_fit_is_refused_by_name(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                                       tmp_path: Path, quiet_hooks, phase: str, how: str) -> None:
    remedy = {
        "resume_from": f"resume it with the config that wrote it ('config' in its {META_FILE}), or train this phase1 "
                       f"from its first epoch: without resume_from, or in a sweep after removing "
                       f"{phase1_checkpoint.parent}",
        "init_from": "init_from must be a phase-1 checkpoint trained with this run's prompt.length and prompt.shared",
    }[how]
    longer = make_config({"prompt": {"length": 3}})
    with pytest.raises(CheckpointError) as caught:
        run_stage(longer, phase, tmp_path, quiet_hooks, **{how: phase1_checkpoint})
    assert str(caught.value) == (f"{phase1_checkpoint}: tensor shared_prompt.tokens has shape [4, 2, 32] in the "
                                 f"checkpoint but [4, 3, 32] in this model; {remedy}")


def test_an_optimizer_state_over_other_parameters_is_refused(make_config: Callable[..., LPTConfig],
                                                             phase1_checkpoint: Path, tmp_path: Path,
                                                             quiet_hooks) -> None:
    probe = make_config({"prompt": {"shared": False, "query": "pretrained"}})  # phase 1 trains the head alone
    with pytest.raises(CheckpointError, match=r"its optimizer state is over \['shared_prompt\.tokens', "
                                              r"'head\.weight'\], this stage trains \['head\.weight'\]; resume it"):
        run_stage(probe, "phase1", tmp_path / "probe", quiet_hooks, resume_from=phase1_checkpoint)


def test_an_optimizer_slot_of_another_shape_is_refused(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                                       tmp_path: Path, quiet_hooks) -> None:
    def damage(state: dict) -> None:
        del state["optimizer_params"]  # as before the names were recorded: only the shapes can be checked
        state["optimizer"]["state"][1]["momentum_buffer"] = torch.zeros(3, 32)

    damaged = _resave(phase1_checkpoint, tmp_path / "epoch_0001", damage)
    with pytest.raises(CheckpointError, match=r"optimizer momentum_buffer of head\.weight has shape \[3, 32\] in "
                                              r"the checkpoint but \[5, 32\] in this model; resume it"):
        run_stage(make_config(), "phase1", tmp_path / "run", quiet_hooks, resume_from=damaged)
