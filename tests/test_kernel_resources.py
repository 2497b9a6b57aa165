"""Every Triton kernel at every shipped configuration compiles for sm_90 (H100/H200)
without a GPU, with no register spill and within sm_90's shared memory
(bench/kernels.py, `pdengine bench kernels`, has the full report).

This replaces the interpreter's blind spots: it accepts code the compiler rejects, and it
cannot tell a kernel that spills registers or overflows shared memory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_fit_sm90(tmp_path):
    import triton

    if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")):
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report = tmp_path / "kernels.json"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--worst-case", "--json", str(report)],
                         env=env, capture_output=True, text=True, timeout=1500)
    assert report.exists(), out.stderr[-3000:]
    rows = json.loads(report.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_lse_kernel", "_sweep_kernel", "_kept_wgrad_kernel", "_dense_bwd_kernel", "_sparse_fwd_kernel",
                       "_sparse_bwd_kernel", "_chunk_topk_kernel", "_extended_k_kernel", "_mm_kernel",
                       "_nf4_extended_k_kernel"}
    problems = [line for line in out.stdout.splitlines() if line.startswith("PROBLEM:")]
    assert not problems, "\n".join(problems)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for r in rows:
        assert r["registers"] > 0 and r["programs_per_sm"] >= 1, r


def test_occupancy_arithmetic():
    sys.path.insert(0, str(ROOT / "bench"))
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_kernels"] = module
    spec.loader.exec_module(module)
    # 255 registers x 256 threads: 64 Ki registers hold one program
    assert module.occupancy(255, 0, 8) == {"programs_per_sm": 1, "limited_by": "registers"}
    # 64 registers x 128 threads: 8 programs by registers; 100 KiB of shared memory allows 2
    assert module.occupancy(64, 100 * 1024, 4) == {"programs_per_sm": 2, "limited_by": "shared"}
    rows = [{"label": "x", "spills": True, "spill_store_bytes": 4, "spill_load_bytes": 4,
             "shared_over_limit": False, "shared_bytes": 0}]
    assert module.problems(rows) == ["x: spills 4 B stores / 4 B loads"]
