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
