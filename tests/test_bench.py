"""Smoke runs of bench code paths that the CPU benchmark itself does not reach (GPU-only
rows), at tiny shapes, so a broken script fails here rather than on the first GPU run."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import linear_topk_kl as bench_loss  # noqa: E402  (bench/linear_topk_kl.py)


def test_ce_rows_run_and_agree_with_cross_entropy():
    rows, _notes = bench_loss.bench_ce_shape(("tiny-ce", 48, 16, 300, 1, torch.float32), "cpu", 1, 2)
    ours = next(r for r in rows if r["impl"] == "pdengine")
    assert ours["weight_grad"] is True and ours["fwd_bwd_ms"] > 0
    assert ours["loss_rel_diff"] < 1e-5


def test_results_go_to_a_run_folder_unless_saved(monkeypatch, tmp_path):
    """`pdengine bench NAME` must not overwrite the tracked bench/results/*: without --save
    the files land in a fresh git-ignored bench/runs/<timestamp>/ folder."""
    import common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(common, "RUNS_DIR", tmp_path / "runs")
    path = common.save_results("probe", [{"impl": "x", "ms": 1.0}])
    assert path.parent.parent == tmp_path / "runs" and path.exists()
    assert not (tmp_path / "results").exists()
    saved = common.save_results("probe", [{"impl": "x", "ms": 1.0}], save=True)
    assert saved == tmp_path / "results" / "probe.json" and saved.exists()


def test_every_bench_script_takes_save():
    import subprocess

    bench = Path(__file__).resolve().parent.parent / "bench"
    for script in ("linear_topk_kl", "lora_linear", "prefill", "teacher_topk", "train_step", "distributed"):
        text = (bench / f"{script}.py").read_text()
        assert "add_save_flag(" in text or "op_bench_parser(" in text, script
    gitignore = (bench.parent / ".gitignore").read_text().split()
    assert "bench/runs/" in gitignore
    out = subprocess.run(["git", "check-ignore", "-q", "bench/runs/x/y.json"], cwd=bench.parent)
    assert out.returncode == 0
