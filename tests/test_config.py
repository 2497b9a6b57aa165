"""pdengine.config: dataclass settings define their flags, parse config sections, check ranges."""
import argparse
from dataclasses import dataclass

import pytest

from pdengine import config as C
from pdengine.errors import InputError


@dataclass
class Demo:
    k: int = C.setting(64, "top-k kept", check=C.POSITIVE)
    temperature: float = C.setting(2.0, "distillation temperature", check=C.POSITIVE)
    mode: str = C.setting("tail", "KL mode", choices=("tail", "renorm"))
    targets: tuple = C.setting(("q_proj", "v_proj"), "module names")
    progress: bool = C.setting(True, "show progress")
    max_steps: int | None = C.setting(None, "stop early", check=C.POSITIVE)

    def __post_init__(self):
        C.check_settings(self)


def parse(argv):
    parser = argparse.ArgumentParser()
    C.add_arguments(parser, Demo)
    return C.from_args(Demo, parser.parse_args(argv))


def test_defaults_come_from_the_dataclass_only():
    assert parse([]) == Demo()


def test_flags_of_every_type():
    got = parse(["--k", "5", "--temperature", "1.5", "--mode", "renorm", "--targets", "a,b c",
                 "--no-progress", "--max-steps", "3"])
    assert got == Demo(k=5, temperature=1.5, mode="renorm", targets=("a", "b", "c"), progress=False, max_steps=3)


@pytest.mark.parametrize("argv", [["--k", "x"], ["--mode", "other"], ["--k", "1.5"]])
def test_bad_flag_values_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        parse(argv)


@pytest.mark.parametrize("argv,needle", [(["--k", "0"], "k must be > 0"),
                                         (["--temperature", "inf"], "finite"),
                                         (["--temperature", "nan"], "finite")])
def test_range_checks_name_the_field(argv, needle):
    with pytest.raises(InputError, match=needle):
        parse(argv)


def test_mapping_accepts_dashes_lists_and_none():
    got = C.from_mapping(Demo, {"max-steps": None, "targets": ["x", "y"], "k": 3.0}, "prefill")
    assert got == Demo(k=3, targets=("x", "y"))


@pytest.mark.parametrize("section,needle", [
    ({"kk": 1}, r"prefill: unknown key 'kk'; valid keys: k, max_steps, mode"),
    ({"k": "many"}, r"prefill.k: expected an integer"),
    ({"progress": "yes"}, r"prefill.progress: expected true or false"),
    ({"k": True}, r"prefill.k: expected an integer"),
    ({"temperature": float("nan")}, r"prefill: temperature must be a finite number"),
    ({"mode": "x"}, r"prefill: mode must be one of tail, renorm"),
])
def test_mapping_errors_name_section_and_key(section, needle):
    with pytest.raises(InputError, match=needle):
        C.from_mapping(Demo, section, "prefill")


def test_to_dict_is_json_ready():
    assert C.to_dict(Demo())["targets"] == ["q_proj", "v_proj"]
