"""The public surface of `pdengine`: its names and the design sections the code cites.

`pdengine/__init__.py` states its names three times (the lazy `_EXPORTS` table, the
`TYPE_CHECKING` imports that IDEs read, `__all__`); these tests keep them in agreement by
parsing its source, and check that every name resolves to the object its module defines.
Code comments cite docs/DESIGN.md by section name; a citation of a section that does not
exist (a renamed heading, a typo) fails here.
"""
import ast
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

import pdengine

INIT = Path(pdengine.__file__)
ROOT = INIT.parent.parent
DESIGN = ROOT / "docs" / "DESIGN.md"
STABLE_SECTIONS = ("Method", "Fused loss", "Teacher top-k", "LoRA matmul", "Cache format", "Prefill",
                   "Attention paths", "Training", "Checkpoints and resume", "Evaluation", "Conventions",
                   "Quantized base", "Distributed")


def _parse_init():
    """(_EXPORTS dict, _SUBMODULES tuple, {name: module} of the TYPE_CHECKING imports)."""
    tree = ast.parse(INIT.read_text())
    assigned, typed = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("_EXPORTS", "_SUBMODULES"):
                assigned[node.targets[0].id] = ast.literal_eval(node.value)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), "only `from ... import ...` in the TYPE_CHECKING block"
                for alias in stmt.names:
                    assert alias.asname is None, f"{alias.name} is imported under another name"
                    typed[alias.name] = stmt.module
    assert typed, "pdengine/__init__.py has no TYPE_CHECKING block"
    return assigned["_EXPORTS"], tuple(assigned["_SUBMODULES"]), typed


def test_type_checking_block_imports_exactly_the_exports():
    exports, submodules, typed = _parse_init()
    assert {n: m for n, m in typed.items() if m != "pdengine"} == exports
    assert sorted(n for n, m in typed.items() if m == "pdengine") == sorted(submodules)


def test_all_lists_every_export_once():
    exports, _, _ = _parse_init()
    assert len(pdengine.__all__) == len(set(pdengine.__all__))
    assert set(pdengine.__all__) == {"backend_info", *exports}


@pytest.mark.parametrize("name", pdengine.__all__)
def test_every_public_name_resolves_to_its_definition(name):
    value = getattr(pdengine, name)
    module = pdengine._EXPORTS.get(name)
    if module is not None:
        assert value is getattr(import_module(module), name)


def test_submodules_resolve():
    for name in pdengine._SUBMODULES:
        assert getattr(pdengine, name) is import_module(f"pdengine.{name}")


def test_dir_lists_public_names_and_submodules():
    listed = dir(pdengine)
    assert set(pdengine.__all__) <= set(listed)
    assert set(pdengine._SUBMODULES) <= set(listed)
    assert "__version__" in listed and listed == sorted(listed)


def test_star_import_gives_every_public_name():
    namespace = {}
    exec("from pdengine import *", namespace)
    assert set(pdengine.__all__) <= set(namespace)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pdengine.nope  # noqa: B018
    assert not hasattr(pdengine, "nope")


def test_prompt_format_and_input_error_are_exported():
    from pdengine.errors import InputError
    from pdengine.prompts import PromptFormat

    assert pdengine.PromptFormat is PromptFormat and pdengine.InputError is InputError
    assert issubclass(pdengine.InputError, ValueError)


def test_import_stays_light():
    """`import pdengine` registers the ops but loads neither transformers nor the stages."""
    code = ("import sys, pdengine; heavy = [m for m in ('transformers', 'pdengine.lora', 'pdengine.prefill', "
            "'pdengine.train', 'pdengine.cache') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=INIT.parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- design citations


def _design_sections() -> list[str]:
    return [line[3:].strip() for line in DESIGN.read_text().splitlines() if line.startswith("## ")]


def _citations():
    """(file, section) for every `DESIGN.md, "Section"` citation in the project's sources."""
    pattern = re.compile(r'DESIGN\.md,\s*"([^"]+)"')
    places = [ROOT / d for d in ("pdengine", "kernels", "csrc", "bench", "tests", "docs")]
    files = [f for d in places for f in d.rglob("*") if f.suffix in (".py", ".cpp", ".h", ".md")]
    for f in files + [ROOT / "README.md"]:
        if f == Path(__file__):  # this file's docstrings show the pattern
            continue
        for section in pattern.findall(f.read_text(encoding="utf-8")):
            yield f.relative_to(ROOT), " ".join(section.split())  # a citation may wrap in prose


def test_design_doc_has_the_stable_sections_in_order():
    sections = _design_sections()
    assert sections == list(STABLE_SECTIONS)


def test_every_design_citation_names_a_section():
    sections = set(_design_sections())
    cited = list(_citations())
    assert cited, "no code cites docs/DESIGN.md by section name"
    assert [(str(f), s) for f, s in cited if s not in sections] == []
