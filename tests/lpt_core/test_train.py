"""run_stage end to end on CPU: it learns, resumes exactly, checkpoints, fails loudly, and runs as a CLI."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

import lpt_core.step as step_module
import lpt_core.train as train_module
from lpt_core.metrics import gamma_ratio, knn_accuracy
from lpt_core.backbone import create_backbone, normalization
from lpt_core.checkpoint import STATE_FILE, CheckpointError, read_meta, safe_torch_load, verify_checkpoint
from lpt_core.config import ConfigError, LPTConfig, from_dict
from lpt_core.data import DatasetBundle, Normalization, build_dataset
from lpt_core.model import LPTModel, LPTOutput
from lpt_core.runtime import is_out_of_memory
from lpt_core.sampling import ClassAwareSampler, InstanceSampler
from lpt_core.train import NonFiniteLossError, StageHooks, StageOutOfMemoryError, run_stage

from .conftest import QuietHooks

REPO = Path(__file__).resolve().parents[2]
TIMING_KEYS = {"epoch_time_s", "train_images_per_s"}
NUM_CLASSES = 5  # test_blobs default


def _epoch_folders(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").glob("epoch_*"))


def _model_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return safe_torch_load(Path(checkpoint_dir) / STATE_FILE)["model"]


def _reloaded(cfg: LPTConfig, checkpoint_dir: Path) -> tuple[LPTModel, DatasetBundle]:
    """The model a checkpoint holds, rebuilt from the config and the checkpoint file alone, and its dataset."""
    backbone = create_backbone(cfg.backbone)
    bundle = build_dataset(cfg.data, Normalization(*normalization(backbone)))
    model = LPTModel(backbone, bundle.num_classes, cfg.prompt)
    model.load_state_dict(_model_state(checkpoint_dir), strict=False)
    return model.eval(), bundle


@torch.no_grad()
def _forward_all(model: LPTModel, dataset, phase: str) -> tuple[LPTOutput, torch.Tensor]:
    """The whole split as one batch (the runs below evaluate in one batch as well: eval_batch_size 64)."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return model(torch.stack(images), phase), torch.as_tensor(labels)


def _accuracy(out: LPTOutput, labels: torch.Tensor) -> float:
    return 100.0 * (out.logits.argmax(dim=1) == labels).sum().item() / len(labels)


def _initial_trainable_state(cfg: LPTConfig) -> dict[str, torch.Tensor]:
    """The trainable state run_stage starts from for `cfg` (same seed, same construction order)."""
    from lpt_core.runtime import seed_everything

    seed_everything(cfg.seed, cfg.threads)
    return LPTModel(create_backbone(cfg.backbone), NUM_CLASSES, cfg.prompt).trainable_state()


# --- learning -----------------------------------------------------------------------------------------------------

def test_phase1_and_phase2_beat_chance_by_a_wide_margin(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                                        quiet_hooks) -> None:
    phase = {"epochs": 5, "steps_per_epoch": 6, "optimizer": "adamw", "base_lr": 0.1}
    cfg = make_config({"phase1": phase, "phase2": phase, "eval": {"feature_stats": True}})
    chance = 100.0 / NUM_CLASSES
    r1 = run_stage(cfg, "phase1", tmp_path / "p1", quiet_hooks)
    assert r1.metrics["acc"] > 3 * chance, r1.metrics
    assert r1.history[-1]["loss"] < r1.history[0]["loss"]
    assert r1.match is None and r1.per_class.num_rows == NUM_CLASSES
    # the reported numbers are those of the saved model, recomputed here from its checkpoint
    model, bundle = _reloaded(cfg, r1.checkpoint_dir)
    (test, test_labels), (train, train_labels) = (_forward_all(model, split, "phase1")
                                                  for split in (bundle.test, bundle.train_eval))
    assert r1.metrics["acc"] == pytest.approx(_accuracy(test, test_labels))
    assert r1.metrics["query_knn_acc"] == pytest.approx(
        knn_accuracy(train.query, train_labels, test.query, test_labels, k=cfg.eval.knn_k))
    assert r1.metrics["query_gamma"] == pytest.approx(gamma_ratio(test.query, test_labels))

    r2 = run_stage(cfg, "phase2", tmp_path / "p2", quiet_hooks, init_from=r1.checkpoint_dir)
    assert r2.metrics["acc"] > 3 * chance, r2.metrics
    assert r2.history[-1]["loss"] < r2.history[0]["loss"]
    assert r2.match is not None and "match_consistency" in r2.metrics and "pool_usage" in r2.metrics
    model, bundle = _reloaded(cfg, r2.checkpoint_dir)
    assert r2.metrics["acc"] == pytest.approx(_accuracy(*_forward_all(model, bundle.test, "phase2")))
    # phase 2 inherits u from phase 1 (frozen) and its classifier (then trained)
    s1, s2 = _model_state(r1.checkpoint_dir), _model_state(r2.checkpoint_dir)
    assert torch.equal(s1["shared_prompt.tokens"], s2["shared_prompt.tokens"])
    assert not torch.equal(s1["head.weight"], s2["head.weight"])
    assert any("initialised from phase1" in line for line in quiet_hooks.lines)


def test_phase2_without_init_from_raises(make_config: Callable[..., LPTConfig], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="phase2 needs init_from"):
        run_stage(make_config(), "phase2", tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_stage_raises(make_config: Callable[..., LPTConfig], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stage='phase3'"):
        run_stage(make_config(), "phase3", tmp_path)


def test_init_from_with_other_class_count_raises(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                                 tmp_path: Path, quiet_hooks) -> None:
    cfg = make_config({"data": {"options": {"counts": [10, 5, 3, 2]}}})
    with pytest.raises(CheckpointError, match="has 5 classes, the dataset has 4"):
        run_stage(cfg, "phase2", tmp_path, quiet_hooks, init_from=phase1_checkpoint)


def test_joint_training_runs_and_trains_everything(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                                   quiet_hooks) -> None:
    cfg = make_config({"training": "joint", "joint": {"epochs": 1}})
    before = _initial_trainable_state(cfg)
    result = run_stage(cfg, "joint", tmp_path, quiet_hooks)
    after = _model_state(result.checkpoint_dir)
    for key in ("shared_prompt.tokens", "group_pool.keys", "group_pool.prompts", "head.weight"):
        assert not torch.equal(before[key], after[key]), key
    # what a tracker records beside the metrics: the trained parameters (all of them here) and the backbone
    assert result.extras["trainable_params"] == sum(t.numel() for t in after.values())
    assert result.extras["backbone"] == read_meta(result.checkpoint_dir)["backbone"]


# --- resume -------------------------------------------------------------------------------------------------------

class _Stop(Exception):
    """Simulated preemption."""


class StopAfter(StageHooks):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def log(self, message: str) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        if epoch == self.epoch:
            raise _Stop


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_resume_is_equivalent_to_a_straight_run(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                                tmp_path: Path, quiet_hooks, phase: str) -> None:
    cfg = make_config({phase: {"epochs": 4, "warmup_epochs": 1}, "eval": {"every_epochs": 1}})
    init = phase1_checkpoint if phase == "phase2" else None

    straight = run_stage(cfg, phase, tmp_path / "straight", quiet_hooks, init_from=init)

    interrupted = tmp_path / "interrupted"
    with pytest.raises(_Stop):
        run_stage(cfg, phase, interrupted, StopAfter(epoch=1), init_from=init)
    assert _epoch_folders(interrupted) == ["epoch_0000", "epoch_0001"]
    resumed = run_stage(cfg, phase, interrupted, quiet_hooks,
                        resume_from=interrupted / "checkpoints" / "epoch_0001")

    assert len(resumed.history) == len(straight.history) == 4
    for a, b in zip(straight.history, resumed.history):
        assert set(a) == set(b)
        for key in set(a) - TIMING_KEYS:
            assert a[key] == pytest.approx(b[key], abs=1e-6, nan_ok=True), key
    for key in set(straight.metrics) - TIMING_KEYS:
        assert straight.metrics[key] == pytest.approx(resumed.metrics[key], abs=1e-6, nan_ok=True), key
    a, b = _model_state(straight.checkpoint_dir), _model_state(resumed.checkpoint_dir)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    assert any("resumed from" in line for line in quiet_hooks.lines)


def test_resume_from_the_last_checkpoint_only_evaluates(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                                        quiet_hooks) -> None:
    cfg = make_config()
    first = run_stage(cfg, "phase1", tmp_path, quiet_hooks)
    again = run_stage(cfg, "phase1", tmp_path, quiet_hooks, resume_from=first.checkpoint_dir)
    assert again.checkpoint_dir == first.checkpoint_dir
    assert again.metrics["acc"] == first.metrics["acc"]
    assert len(again.history) == len(first.history)


def test_resume_refuses_a_checkpoint_of_other_weights(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                                      tmp_path: Path, quiet_hooks) -> None:
    import timm
    from safetensors.torch import save_file

    cfg = make_config()
    torch.manual_seed(4321)
    other = timm.create_model(cfg.backbone.name, pretrained=False, num_classes=0, **cfg.backbone.model_kwargs)
    other_file = tmp_path / "other.safetensors"
    save_file(other.state_dict(), str(other_file))
    other_cfg = make_config({"backbone": {"weights_file": str(other_file)}})
    with pytest.raises(CheckpointError, match=r"trained on backbone .*\(weights \w{12}\), not on .*\(weights \w{12}\)"):
        run_stage(other_cfg, "phase1", tmp_path / "run", quiet_hooks, resume_from=phase1_checkpoint)
    with pytest.raises(CheckpointError, match="trained on backbone"):
        run_stage(other_cfg, "phase2", tmp_path / "run2", quiet_hooks, init_from=phase1_checkpoint)


# --- checkpoints and hooks -----------------------------------------------------------------------------------------

class VerifyingHooks(StageHooks):
    def __init__(self) -> None:
        self.calls: list[tuple[int, Path, dict]] = []

    def log(self, message: str) -> None:
        pass

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        meta = verify_checkpoint(checkpoint_dir)  # complete and verified at the time of the call
        assert meta["epoch"] == epoch and checkpoint_dir.name == f"epoch_{epoch:04d}"
        self.calls.append((epoch, checkpoint_dir, metrics))


def test_hooks_called_once_per_epoch_and_checkpoints_pruned(make_config: Callable[..., LPTConfig],
                                                            tmp_path: Path) -> None:
    cfg = make_config({"phase1": {"epochs": 4}})
    hooks = VerifyingHooks()
    result = run_stage(cfg, "phase1", tmp_path, hooks)
    assert [c[0] for c in hooks.calls] == [0, 1, 2, 3]
    assert all(math.isfinite(c[2]["loss"]) and c[2]["epoch"] == c[0] for c in hooks.calls)
    assert "acc" in hooks.calls[-1][2]  # the last epoch is always evaluated
    assert _epoch_folders(tmp_path) == ["epoch_0002", "epoch_0003"]
    assert result.checkpoint_dir == tmp_path / "checkpoints" / "epoch_0003"
    meta = verify_checkpoint(result.checkpoint_dir)
    assert meta["stage"] == "phase1" and meta["num_classes"] == NUM_CLASSES
    assert meta["config"]["phase1"]["epochs"] == 4
    assert meta["backbone"]["name"] == cfg.backbone.name and len(meta["backbone"]["weights_digest"]) == 64


def test_keep_checkpoints_is_honoured(make_config: Callable[..., LPTConfig], tmp_path: Path, quiet_hooks) -> None:
    run_stage(make_config({"phase1": {"epochs": 3}}), "phase1", tmp_path, quiet_hooks, keep_checkpoints=1)
    assert _epoch_folders(tmp_path) == ["epoch_0002"]


# --- failures -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("phase, bad_epoch", [("phase1", 0), ("phase2", 1)])
def test_nan_loss_raises_naming_phase_and_epoch(make_config: Callable[..., LPTConfig], phase1_checkpoint: Path,
                                                tmp_path: Path, monkeypatch, quiet_hooks, phase: str,
                                                bad_epoch: int) -> None:
    real_build = step_module.build_classification_loss
    built = []

    def build(cfg, branch, class_counts):
        built.append(branch)
        loss = real_build(cfg, branch, class_counts)
        epoch = (len(built) - 1) // 2  # dual sampling: two branch losses are built per epoch
        if epoch < bad_epoch:
            return loss
        return lambda cos, target, **kw: loss(cos, target, **kw) * float("nan")

    monkeypatch.setattr(step_module, "build_classification_loss", build)
    init = phase1_checkpoint if phase == "phase2" else None
    with pytest.raises(NonFiniteLossError, match=rf"^{phase} epoch {bad_epoch}: training loss is nan"):
        run_stage(make_config({phase: {"epochs": 3}}), phase, tmp_path, quiet_hooks, init_from=init)
    # no checkpoint of the bad epoch: a resume starts from the last good one
    assert _epoch_folders(tmp_path) == [f"epoch_{e:04d}" for e in range(bad_epoch)]


def test_absurd_learning_rate_stops_with_non_finite_loss(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                                         quiet_hooks) -> None:
    cfg = make_config({"phase1": {"base_lr": 1e30, "epochs": 2}})
    with pytest.raises(NonFiniteLossError, match=r"^phase1 epoch 0: training loss is nan \(lr "):
        run_stage(cfg, "phase1", tmp_path, quiet_hooks)
    assert not (tmp_path / "checkpoints").exists() or _epoch_folders(tmp_path) == []


class AllocatingHooks(QuietHooks):
    """Asks the allocator for 4 EiB after epoch `at`: a real out-of-memory error, raised where training runs."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
        super().on_epoch_end(epoch, metrics, checkpoint_dir)
        if epoch == self.at:
            torch.empty(1 << 62, dtype=torch.uint8)


def test_out_of_memory_is_explained_with_the_knobs_to_turn(make_config: Callable[..., LPTConfig],
                                                           tmp_path: Path) -> None:
    cfg = make_config({"phase1": {"epochs": 3, "batch_size": 16}, "data": {"eval_batch_size": 64}})
    hooks = AllocatingHooks(at=1)
    with pytest.raises(StageOutOfMemoryError) as caught:
        run_stage(cfg, "phase1", tmp_path, hooks)
    assert [epoch for epoch, _, _ in hooks.epochs] == [0, 1]  # it failed in epoch 1, not before
    message = str(caught.value)
    assert message.startswith("phase1 epoch 1: out of memory on cpu (")
    assert "can't allocate memory" in message
    assert "phase1.batch_size (now 16 per branch, 2 branches a step)" in message
    assert "data.eval_batch_size (now 64)" in message
    assert is_out_of_memory(caught.value.__cause__)
    # the epochs before it are checkpointed and intact: a retry with a smaller batch can resume from them
    assert verify_checkpoint(tmp_path / "checkpoints" / "epoch_0001")["epoch"] == 1


def test_errors_other_than_out_of_memory_pass_through(make_config: Callable[..., LPTConfig], tmp_path: Path) -> None:
    class Failing(StageHooks):
        def on_epoch_end(self, epoch: int, metrics: dict[str, float], checkpoint_dir: Path) -> None:
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="^disk on fire$"):
        run_stage(make_config({"phase1": {"epochs": 1}}), "phase1", tmp_path, Failing())


def test_is_out_of_memory_recognises_cuda_cpu_and_python_errors() -> None:
    try:
        torch.empty(1 << 62, dtype=torch.uint8)
    except RuntimeError as err:
        cpu_error = err
    assert is_out_of_memory(cpu_error)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("can't allocate memory"))


# --- modes ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling, branches", [("dual", ["cb", "ib"]), ("class_balanced", ["cb"]),
                                                ("instance", ["ib"])])
def test_sampling_modes_feed_each_branch_loss_its_own_sampler(make_config: Callable[..., LPTConfig],
                                                              phase1_checkpoint: Path, tmp_path: Path, quiet_hooks,
                                                              monkeypatch, sampling: str, branches: list[str]) -> None:
    cfg = make_config({"phase2": {"epochs": 1, "sampling": sampling}})
    real_build, fed = step_module.build_classification_loss, []  # fed: (branch, labels) of every loss call

    def build(loss_cfg, branch, class_counts):
        loss = real_build(loss_cfg, branch, class_counts)

        def recorded(cos, target, **kw):
            fed.append((branch, target.clone()))
            return loss(cos, target, **kw)
        return recorded

    monkeypatch.setattr(step_module, "build_classification_loss", build)
    result = run_stage(cfg, "phase2", tmp_path, quiet_hooks, init_from=phase1_checkpoint)
    # what each sampler, seeded as documented (cb: seed, ib: seed + 1), draws from the training labels
    labels = _reloaded(cfg, phase1_checkpoint)[1].train_labels
    samplers = {"cb": ClassAwareSampler(labels, cfg.phase2.images_per_class, cfg.seed),
                "ib": InstanceSampler(len(labels), cfg.seed + 1)}
    expected = [(b, labels[samplers[b].next_batch(cfg.phase2.batch_size)])
                for _ in range(cfg.phase2.steps_per_epoch) for b in branches]
    assert [b for b, _ in fed] == [b for b, _ in expected]
    for (branch, got), (_, want) in zip(fed, expected):
        assert torch.equal(got, want), branch
    (epoch,) = result.history
    assert epoch["train_images_per_s"] * epoch["epoch_time_s"] == pytest.approx(sum(len(y) for _, y in fed))


def test_loss_names_select_different_losses(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                            quiet_hooks) -> None:
    losses = {name: run_stage(make_config({"phase1": {"epochs": 1, "loss": {"name": name}}}), "phase1",
                              tmp_path / name, quiet_hooks).history[0]["loss"] for name in ("agcl", "ce")}
    assert all(math.isfinite(loss) for loss in losses.values())
    assert losses["agcl"] != losses["ce"]  # same seed, same batches: only the loss differs


def _linear_output_dtypes(run: Callable[[], Any]) -> tuple[Any, set[torch.dtype]]:
    """run()'s result and the dtypes every nn.Linear (the ViT's qkv, proj, MLP) produced meanwhile."""
    dtypes: set[torch.dtype] = set()

    def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(module, torch.nn.Linear):
            dtypes.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        return run(), dtypes
    finally:
        handle.remove()


# bf16 keeps 8 significant bits (rounding up to 2^-9 ~ 0.2 % of each value). Measured here against fp32: epoch
# losses within 0.08 %, each freshly initialised tensor's one-epoch update within 0.5 % (norm of the difference over
# the norm of fp32's update). The bounds leave a 6-12x margin. Accuracy is no measure of closeness at one epoch:
# near-ties flip (2 of the 40 eval images measured), so it is not compared.
BF16_LOSS_RTOL, BF16_UPDATE_RTOL = 0.01, 0.03


def test_bf16_autocast_runs_the_vit_in_bf16_close_to_fp32(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                                          quiet_hooks) -> None:
    runs, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        cfg = make_config({"precision": precision, "phase1": {"epochs": 1}, "phase2": {"epochs": 1}})

        def both_phases() -> tuple:
            r1 = run_stage(cfg, "phase1", tmp_path / precision / "p1", quiet_hooks)
            return r1, run_stage(cfg, "phase2", tmp_path / precision / "p2", quiet_hooks, init_from=r1.checkpoint_dir)
        runs[precision], dtypes[precision] = _linear_output_dtypes(both_phases)
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}  # training and evaluation alike
    start = _initial_trainable_state(cfg)  # the seed fixes the initial tensors of both precisions
    fresh = {"phase1": ("shared_prompt.tokens", "head.weight"), "phase2": ("group_pool.keys", "group_pool.prompts")}
    for fp32, bf16 in zip(runs["fp32"], runs["bf16"]):
        loss32, loss16 = fp32.history[0]["loss"], bf16.history[0]["loss"]
        assert loss16 != loss32 and loss16 == pytest.approx(loss32, rel=BF16_LOSS_RTOL), (fp32.stage, loss32, loss16)
        state32, state16 = _model_state(fp32.checkpoint_dir), _model_state(bf16.checkpoint_dir)
        assert all(t.dtype == torch.float32 for t in state16.values())  # autocast never changes parameter dtypes
        for key in fresh[fp32.stage]:
            update32, update16 = state32[key] - start[key], state16[key] - start[key]
            assert (update16 - update32).norm() <= BF16_UPDATE_RTOL * update32.norm(), key


def test_learning_rate_follows_the_schedule(make_config: Callable[..., LPTConfig], tmp_path: Path,
                                            quiet_hooks) -> None:
    from lpt_core.schedule import lr_at

    cfg = make_config({"phase1": {"epochs": 3, "warmup_epochs": 1, "min_lr": 0.001}})
    result = run_stage(cfg, "phase1", tmp_path, quiet_hooks)
    steps = cfg.phase1.steps_per_epoch
    for epoch, h in enumerate(result.history):
        # the reported lr is that of the epoch's last step
        expected = lr_at((epoch + 1) * steps - 1, 3 * steps, steps, cfg.phase1.lr, 0.001)
        assert h["lr"] == pytest.approx(expected)


# --- CLI --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def lt_list_config(tmp_path: Path, config_dict: Callable[..., dict]) -> dict:
    """A config for the file-based `lt_list` dataset over tiny JPEGs (registered by lpt_core itself)."""
    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    lines = {"train": [], "test": []}
    for c, (n_train, n_test) in enumerate([(6, 2), (3, 2), (2, 2)]):
        colour = (torch.rand(3, generator=g) * 255).int().tolist()
        for split, n in (("train", n_train), ("test", n_test)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                noise = (torch.rand(16, 16, 3, generator=g) * 40).int()
                pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
                lines[split].append(f"{split}/class{c}/{i}.jpg {c}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return config_dict({
        "data": {"name": "lt_list", "root": str(root), "cache_dir": str(tmp_path / "cache"),
                 "options": {"train_list": "train.txt", "test_list": "test.txt"}},
        "phase1": {"epochs": 1, "batch_size": 4, "steps_per_epoch": 2},
    })


def test_cli_runs_phase1_in_a_subprocess(lt_list_config: dict, tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(lt_list_config))
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "lpt_core.train", "--config", str(config), "--stage", "phase1", "--workdir",
         str(workdir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[phase1] lt_list: 11 train / 6 eval images, 3 classes" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{") + 1:])
    checkpoint = Path(summary["checkpoint"])
    assert summary["stage"] == "phase1" and checkpoint == workdir / "checkpoints" / "epoch_0000"
    assert verify_checkpoint(checkpoint)["num_classes"] == 3
    model, bundle = _reloaded(from_dict(lt_list_config), checkpoint)  # the printed accuracy is the saved model's
    assert summary["acc"] == pytest.approx(_accuracy(*_forward_all(model, bundle.test, "phase1")))


def test_cli_rejects_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"prompt": {"pool_sise": 3}}))
    with pytest.raises(ConfigError, match="did you mean 'pool_size'"):
        train_module.main(["--config", str(config), "--stage", "phase1", "--workdir", str(tmp_path / "run")])


def test_cli_main_runs_phase2_with_init_from(config_dict: Callable[..., dict], phase1_checkpoint: Path,
                                             tmp_path: Path, capsys) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(config_dict({"phase2": {"epochs": 1}})))
    workdir = tmp_path / "run"
    train_module.main(["--config", str(config), "--stage", "phase2", "--workdir", str(workdir),
                       "--init-from", str(phase1_checkpoint)])
    out = capsys.readouterr().out
    assert f"initialised from phase1 checkpoint {phase1_checkpoint}" in out
    summary = json.loads(out[out.rindex("\n{") + 1:])
    assert summary["stage"] == "phase2" and "match_consistency" in summary
    assert verify_checkpoint(summary["checkpoint"])["init_from"] == str(phase1_checkpoint)
