"""Resource report of every Triton kernel at every shipped configuration, for sm_90, no GPU.

`pdengine bench kernels [--json PATH] [--only SUBSTRING]`. Each kernel is compiled ahead
of time for an H100/H200 (sm_90) with the ptxas bundled in the Triton wheel, exactly as a
GPU run would compile it (the launchers' own config functions pick the blocks), and
ptxas's verbose output gives registers per thread and spill bytes; Triton's metadata gives
the dynamic shared memory. From those the report derives how many programs one SM holds
at once (occupancy). tests/test_kernel_resources.py fails on any spill, or on shared memory
over the sm_90 limit, at these configurations.

Must run without TRITON_INTERPRET (the launchers pick GPU configs only then); the script
re-executes itself without it when it is set.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

# sm_90 (H100 / H200) per-SM limits
SM90_SHARED_PER_BLOCK = 227 * 1024  # opt-in maximum of one block
SM90_SHARED_PER_SM = 228 * 1024
SM90_SHARED_RESERVED_PER_BLOCK = 1024  # the driver's per-block reservation
SM90_REGISTERS = 65536
SM90_MAX_WARPS = 64
SM90_MAX_BLOCKS = 32
SM90_REGS_PER_THREAD = 255


@dataclass
class Job:
    """One kernel at one configuration."""
    label: str
    module: str  # pdengine.kernels.<module>
    kernel: str
    constexprs: dict
    num_warps: int
    num_stages: int
    ptr_types: dict = field(default_factory=dict)  # pointer argument -> "*bf16", ...; default *fp32
    floats: tuple = ()  # fp32 scalar arguments; every other scalar is i32
    # False: a lighter flag set of a config also compiled with every flag on (--worst-case
    # skips it; the report shows the lighter sets never need more registers)
    worst_case: bool = True
    options: dict = field(default_factory=dict)  # extra compile options the launcher passes


def _loss_jobs():
    import torch

    from pdengine.kernels import linear_topk_kl as K

    jobs = []
    floats = ("inv_tau", "softcap", "ce_weight")
    for dtype, elem in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        ptrs = {p: elem for p in ("h_ptr", "w_ptr", "ha_ptr", "b_ptr", "kept_ptr")}
        ptrs.update(ids_ptr="*i64", labels_ptr="*i64")
        ieee = dtype == torch.float32
        # every flag on: the most registers (the plain case is checked too)
        for lora in (True, False):
            flags = dict(HAS_LORA=lora, SOFTCAP=lora, BLOCK_R=K._MAX_BLOCK_R if lora else 16)
            tag = f"{elem[1:]}{' lora+softcap' if lora else ''}"
            tiled = [("_lse_kernel", "fwd", {}),
                     ("_sweep_kernel", "sweep", dict(KEEP=False)),
                     ("_sweep_kernel", "sweep_keep", dict(KEEP=True)),
                     ("_kept_wgrad_kernel", "sweep_keep", dict(WEIGHT_GRAD=True)),
                     ("_dense_bwd_kernel", "bwd", dict(WEIGHT_GRAD=True)),
                     ("_dense_bwd_kernel", "bwd_no_wgrad", dict(WEIGHT_GRAD=False))]
            for kernel, kind, extra in tiled:
                cfg = dict(K.config(kind, dtype))
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                extra_tag = "".join(f" {k}={int(v)}" for k, v in extra.items())
                jobs.append(Job(f"{kernel} {kind} {tag}{extra_tag}", "linear_topk_kl", kernel,
                                dict(flags, IEEE=ieee, **extra, **cfg), warps, stages, ptrs, floats, lora))
            sparse_cfg = dict(K._SPARSE)
            warps = sparse_cfg.pop("num_warps")
            sparse = dict(flags, HAS_LABELS=True, HAS_CE=True, BLOCK_K=64, **sparse_cfg)
            jobs.append(Job(f"_sparse_fwd_kernel {tag}", "linear_topk_kl", "_sparse_fwd_kernel",
                            dict(sparse, TAIL=True), warps, 1, ptrs, floats, lora))
            for single in (False, True):
                jobs.append(Job(f"_sparse_bwd_kernel {tag} SINGLE_PASS={int(single)}", "linear_topk_kl",
                                "_sparse_bwd_kernel", dict(sparse, TAIL=True, WEIGHT_GRAD=True,
                                                           SINGLE_PASS=single), warps, 1, ptrs, floats, lora))
    return jobs


def _topk_jobs():
    import torch

    from pdengine.kernels import teacher_topk as K

    jobs = []
    for dtype, elem in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        for k_pad in (64, 256):
            block_n, block_v, block_d, warps = K._block_config(k_pad, dtype, "cuda")
            consts = dict(SOFTCAP=True, IEEE=dtype == torch.float32, K=k_pad,
                          BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d)
            jobs.append(Job(f"_chunk_topk_kernel {elem[1:]} K={k_pad}", "teacher_topk",
                            "_chunk_topk_kernel", consts, warps, 3,
                            dict(h_ptr=elem, w_ptr=elem, keys_ptr="*i64", lse_ptr="*fp32"),
                            ("inv_temperature", "softcap")))
    return jobs


# (tokens N, d_in, d_out, r): the lora_linear bench shapes
LORA_SHAPES = [(16384, 4096, 4096, 16), (16384, 4096, 14336, 64)]


def _lora_jobs():
    import torch

    from pdengine.kernels import lora_linear as K

    jobs = []
    seen = set()
    for dtype, elem, acc in ((torch.bfloat16, "*bf16", "*bf16"), (torch.float32, "*fp32", "*fp32")):
        ieee = dtype == torch.float32
        for drop in (False, True):
            bm, bn, bk, warps, stages = K._tiles(dtype, True, drop)
            consts = dict(HAS_BIAS=True, DROP_OUT=drop, IEEE=ieee, ACC_DTYPE="fp32", BLOCK_M=bm,
                          BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=bk, GROUP_M=8)
            jobs.append(Job(f"_extended_k_kernel {elem[1:]} DROP_OUT={int(drop)}", "lora_linear",
                            "_extended_k_kernel", consts, warps, stages,
                            {p: elem for p in ("a1_ptr", "b1_ptr", "a2_ptr", "b2_ptr", "c_ptr", "bias_ptr")},
                            ("inv_keep",)))
        for n, d_in, d_out, r in LORA_SHAPES:
            # the _mm products of lora_linear(_backward), with their dropout side:
            # xa = drop(x) A^T, dyB = dy B, dA = dyB^T drop(x), dB = dy^T xa (fp32, split-K)
            for m_, n_, k_, split, drop_a, drop_b in ((n, r, d_in, False, True, False),
                                                      (n, r, d_out, False, False, False),
                                                      (r, d_in, n, True, False, True),
                                                      (d_out, r, n, True, False, False)):
                blocks = K._mm_blocks(m_, n_, dtype, True)
                split_k = K._split_k((m_ // blocks[0] + 1) * (n_ // blocks[1] + 1), k_, blocks[2], True) if split else 1
                key = (elem, blocks, split_k > 1, drop_a, drop_b)
                if key in seen:
                    continue
                seen.add(key)
                consts = dict(DROP_A=drop_a, DROP_B=drop_b, IEEE=ieee, ACC_DTYPE="fp32",
                              SPLIT_K=split_k, BLOCK_M=blocks[0], BLOCK_N=blocks[1], BLOCK_K=blocks[2])
                out = "*fp32" if split_k > 1 else acc
                drops = "".join(f" {name}" for name, on in (("DROP_A", drop_a), ("DROP_B", drop_b)) if on)
                jobs.append(Job(f"_mm_kernel {elem[1:]} {blocks[0]}x{blocks[1]}x{blocks[2]} SPLIT_K={split_k}{drops}",
                                "lora_linear", "_mm_kernel", consts, K._MM_WARPS, 3,
                                dict(a_ptr=elem, b_ptr=elem, c_ptr=out), ("alpha",)))
    return jobs


def _nf4_jobs():
    """The NF4 base-weight LoRA GEMM (kernels/lora_linear_nf4.py), nested absmax."""
    import torch

    from pdengine.kernels import lora_linear_nf4 as K

    jobs = []
    for dtype, elem in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        for drop in (False, True):
            bm, bn, bk, warps, stages = K._tiles(dtype, True)
            if drop:
                bn //= 2  # as _nf4_gemm does
            consts = dict(NESTED=True, W_DTYPE=elem[1:], HAS_BIAS=True, DROP_OUT=drop, IEEE=dtype == torch.float32,
                          ACC_DTYPE="fp32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=bk, GROUP_M=8)
            ptrs = {p: elem for p in ("a1_ptr", "a2_ptr", "b2_ptr", "c_ptr", "bias_ptr")}
            ptrs.update(packed_ptr="*u8", absmax_ptr="*u8")
            jobs.append(Job(f"_nf4_extended_k_kernel {elem[1:]} DROP_OUT={int(drop)}", "lora_linear_nf4",
                            "_nf4_extended_k_kernel", consts, warps, stages, ptrs, ("inv_keep",),
                            options=dict(enable_fp_fusion=False)))
    return jobs


def all_jobs():
    return _loss_jobs() + _topk_jobs() + _lora_jobs() + _nf4_jobs()


# ------------------------------------------------------------------------- compiling


def _signature(fn, job):
    sig = {}
    for name in fn.arg_names:
        if name in job.constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = job.ptr_types.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in job.floats else "i32"
    return sig


def _constexpr_values(job):
    import triton.language as tl

    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
    return {k: dtypes.get(v, v) if isinstance(v, str) else v for k, v in job.constexprs.items()}


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch: str) -> dict:
    """Registers and spills from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags Triton's own make_cubin passes (triton/backends/nvidia/compiler.py)
        out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src,
                              "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = int(_PTXAS_LINE.search(log).group(1))
    spill = _SPILL.search(log)
    return {"registers": regs, "spill_store_bytes": int(spill.group(1)) if spill else 0,
            "spill_load_bytes": int(spill.group(2)) if spill else 0}


def occupancy(registers: int, shared: int, num_warps: int) -> dict:
    """Programs (thread blocks) per SM on sm_90 and what limits them."""
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocation unit: 256 registers per warp
    limits = {
        "registers": (SM90_REGISTERS // regs_per_warp) // num_warps,
        "warps": SM90_MAX_WARPS // num_warps,
        "blocks": SM90_MAX_BLOCKS,
    }
    if shared:
        limits["shared"] = SM90_SHARED_PER_SM // (shared + SM90_SHARED_RESERVED_PER_BLOCK)
    limiter = min(limits, key=limits.get)
    return {"programs_per_sm": limits[limiter], "limited_by": limiter}


def compile_job(job: Job) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"pdengine.kernels.{job.module}"), job.kernel)
    start = time.perf_counter()
    # a flag set shared by a kernel family may name flags one kernel lacks (e.g. SOFTCAP)
    consts = {k: v for k, v in _constexpr_values(job).items() if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=_signature(fn, job),
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=job.num_warps, num_stages=job.num_stages, **job.options))
    row = {"label": job.label, "kernel": job.kernel, "num_warps": job.num_warps,
           "num_stages": job.num_stages,
           "blocks": {k: v for k, v in job.constexprs.items() if k.startswith("BLOCK") or k == "K"}}
    row.update(_ptxas_report(compiled.asm["ptx"], "sm_90a"))
    row["shared_bytes"] = int(compiled.metadata.shared)
    row.update(occupancy(row["registers"], row["shared_bytes"], job.num_warps))
    row["spills"] = row["spill_store_bytes"] + row["spill_load_bytes"] > 0
    row["shared_over_limit"] = row["shared_bytes"] > SM90_SHARED_PER_BLOCK
    row["compile_s"] = round(time.perf_counter() - start, 1)
    return row


def problems(rows) -> list[str]:
    """A line per configuration that spills or needs more shared memory than sm_90 has."""
    out = []
    for r in rows:
        if r["spills"]:
            out.append(f"{r['label']}: spills {r['spill_store_bytes']} B stores / {r['spill_load_bytes']} B loads")
        if r["shared_over_limit"]:
            out.append(f"{r['label']}: {r['shared_bytes']} B shared memory > {SM90_SHARED_PER_BLOCK}")
    return out


def run(only: str | None = None, workers: int | None = None, worst_case: bool = False) -> list[dict]:
    jobs = [j for j in all_jobs() if (not only or only in j.label) and (j.worst_case or not worst_case)]
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_job, jobs))


def print_report(rows):
    cols = ["label", "num_warps", "num_stages", "registers", "spill_store_bytes", "shared_bytes",
            "programs_per_sm", "limited_by"]
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
    for line in [cols] + [[r[c] for c in cols] for r in rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths)))


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":  # GPU configs are picked only without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--only", help="only configurations whose label contains this")
    parser.add_argument("--workers", type=int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--worst-case", action="store_true",
                        help="only each config's heaviest flag set (what the test compiles)")
    args = parser.parse_args(argv)
    rows = run(args.only, args.workers, args.worst_case)
    print_report(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": "sm_90", "rows": rows}, f, indent=2)
    bad = problems(rows)
    for line in bad:
        print("PROBLEM:", line)
    print(f"{len(rows)} configurations, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences a warning
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
