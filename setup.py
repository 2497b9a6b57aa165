"""pdengine: install with `pip install --no-build-isolation -e .`

`--no-build-isolation` matters: the C++ extension is compiled against the torch that is
already installed; an isolated build would make pip download a different torch.

The Triton kernels in `kernels/` install as the subpackage `pdengine.kernels` (a
top-level package called `kernels` would clash with other projects). The C++ sources
in `csrc/` build into `pdengine._C` when there are any.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpp_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("PDENGINE_NO_CPP") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # No -std flag: torch's cpp_extension adds the standard the installed torch needs
    # (C++17 up to torch 2.13, C++20 from 2.14, whose ATen headers refuse C++17).
    ext = CppExtension(
        name="pdengine._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", *openmp]},
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="pdengine",
    version="0.1.0",
    description="Knowledge injection via prompt distillation, with fused Triton/C++ kernels",
    packages=["pdengine", "pdengine.ops", "pdengine.kernels", "pdengine.demo", "pdengine.training"],
    package_data={"pdengine.demo": ["assets/*"]},  # the shipped tiny demo model
    package_dir={"pdengine.kernels": "kernels"},
    python_requires=">=3.10",
    # torch and triton are deliberately not pinned to a version: pip must never replace a
    # user's CUDA build of torch. run.sh installs them when they are missing.
    install_requires=["numpy", "safetensors", "transformers", "tqdm", "pyyaml", "bm25s", "matplotlib"],
    extras_require={"qlora": ["bitsandbytes"], "peft": ["peft"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["pdengine=pdengine.cli:main"]},
)
