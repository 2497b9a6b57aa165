"""The GPU suite's dry run (bench/gpu_suite.py --dry-run): the same code as the GPU run, at
tiny shapes on the CPU, so the suite cannot rot before a GPU runs it. The "ops" section
(tests/test_cuda_ops.py in the interpreter) is left out here: pytest runs that file itself.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_every_section(tmp_path):
    env = dict(os.environ, PDENGINE_BENCH_RUNS_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--dry-run",
                          "--sections", "machine,fused_loss,lora,topk,model", "--wheels", str(tmp_path / "none")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reports = list(tmp_path.glob("*/gpu_suite.json"))
    assert len(reports) == 1, out.stdout[-2000:]
    data = json.loads(reports[0].read_text())
    assert data["environment"]["dry_run"] is True and data["environment"]["gemm_tflops"] > 0
    rows = data["rows"]
    assert {r["section"] for r in rows} == {"machine", "fused_loss", "lora", "topk", "model"}
    assert not [r for r in rows if r.get("failed")]
    timed = {r["impl"] for r in rows if r.get("ms")}
    for impl in ("pdengine single pass", "pdengine two-pass", "torch materialized", "pdengine lora_linear",
                 "PEFT LoRA (unfused)", "pdengine teacher_topk", "train step (LoRA r=16, fused loss, AdamW)"):
        assert impl in timed, impl
    assert "pct_gemm" in out.stdout.splitlines()[-len(rows) - 1]  # the table comes last
