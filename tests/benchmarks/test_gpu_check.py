"""`make gpu-check` needs a GPU to run for real; here, on any machine: its arguments, the commands it would run
(the sweep's overrides checked as sweep.py checks them), the RESULTS.md section it writes, and its sweep itself on
the CPU with one GPU declared to Ray."""
from __future__ import annotations

import json
import shlex

import pytest
import torch

from benchmarks import gpu_check, gpu_section
from benchmarks.section import with_section
from experiments.compose import check_command_line, compose_config
from orchestration.plan.sweep_plan import build_plan
from tests.orchestration.conftest import TINY_DEMO


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: --device cuda is accepted")
def test_without_cuda_it_refuses_to_run_and_says_what_can(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main([])
    assert exit_info.value.code == 2
    assert "make gpu-check needs a GPU. --dry-run shows what it runs" in capsys.readouterr().err


def test_dry_run_prints_the_measure_and_a_sweep_that_sweep_py_accepts(tmp_path, capsys) -> None:
    assert gpu_check.main(["--dry-run", "--work", str(tmp_path)]) == 0
    measure, sweep = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert measure[1:] == [str(gpu_check.REPO / "benchmarks" / "run.py"), "--device", "cuda", "--only", "gpu,fused",
                           "--out", str(tmp_path / "bench")]
    assert sweep[1] == str(gpu_check.REPO / "orchestration" / "sweep.py")
    overrides = sweep[2:]
    assert {"device=cuda", "resources.gpu=0.25", "ablation.values=[5,10,20,40]"} <= set(overrides)
    check_command_line(overrides)
    plan = build_plan(compose_config(overrides))
    assert plan.name == "gpu-check" and list(plan.points) == ["5", "10", "20", "40"]
    assert gpu_check.main(["--dry-run", "--sweep-only", "--device", "cpu", "--work", str(tmp_path)]) == 0
    (only,) = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert {"device=cpu", "cluster.num_gpus=1", "resources.gpu=0.25"} <= set(only[2:])


def test_most_at_once() -> None:
    assert gpu_check.most_at_once([(0, 10), (10, 20), (20, 30)]) == 1  # one ends as the next starts
    assert gpu_check.most_at_once([(0, 10), (5, 20), (6, 7), (19, 30)]) == 3


def test_the_section_replaces_the_previous_one() -> None:
    old = f"# Benchmarks\n\ntext\n\n{gpu_section.START}\nold numbers\n{gpu_section.END}\n\n## Notes\n"
    new = with_section(old, f"{gpu_section.START}\nnew numbers\n{gpu_section.END}", gpu_section.START,
                       gpu_section.END)
    assert new == f"# Benchmarks\n\ntext\n\n{gpu_section.START}\nnew numbers\n{gpu_section.END}\n\n## Notes\n"
    assert with_section("# Benchmarks\n", "S", gpu_section.START, gpu_section.END) == "# Benchmarks\n\nS\n"


@pytest.mark.slow
def test_its_sweep_runs_on_the_cpu_with_a_declared_gpu(tmp_path, demo_cache) -> None:
    """One row: its phase 1 trains at the head of its one trial, one trial process in all (packing trials on the
    GPU is test_gpu_scheduling.py's)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "RESULTS.md").write_text("# Benchmarks\n\nearlier results\n")
    tiny = [o for o in TINY_DEMO if not o.startswith("cluster.")]
    assert gpu_check.main(["--device", "cpu", "--sweep-only", "--out", str(out), "--work", str(tmp_path / "work"),
                           "--rows", "5", "--cache-dir", str(demo_cache), *tiny]) == 0
    check = json.loads((out / "gpu_check.json").read_text())
    sweep = check["sweep"]
    assert sweep["status"] == "complete" and list(sweep["acc"]) == ["5"] and sweep["trials_at_once"] == 1
    assert sweep["devices"] == ["cpu (device=cpu; Ray assigned GPU 0, unused)"]
    assert check["measure"] is None and check["run"]["device_name"] == "the CPU (one GPU declared to Ray)"
    results = (out / "RESULTS.md").read_text()
    assert results.startswith("# Benchmarks\n\nearlier results\n\n" + gpu_section.START)
    assert results.count("## GPU check (`make gpu-check`)") == 1 and f"at most {sweep['trials_at_once']} at once" \
        in results
