"""examples/*.yaml: every recipe parses and passes `pdengine run`'s own checks (the ones it
runs on every section before the first stage), and says what it expects."""
from pathlib import Path

import pytest

from pdengine import config, pipeline
from pdengine.errors import InputError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("demo.yaml", "llama3-8b-instruct.yaml", "qlora-3b-24gb.yaml")
REQUIRES_QUANTIZE = {"qlora-3b-24gb.yaml"}  # needs the stages' `quantize` option


def _validate(raw: dict) -> list:
    """What `pdengine run` checks before any stage runs (no model is loaded)."""
    stages = pipeline.check_top_level(raw)
    return pipeline.plan_pipeline(raw, stages)


def _stages_with_quantize() -> set:
    return {s for s in pipeline.PIPELINE if "quantize" in config.field_names(pipeline.config_class(s))}


def _without_quantize(raw: dict) -> dict:
    """The config minus `quantize` in the sections whose stage does not know it yet."""
    known = _stages_with_quantize()
    return {k: ({n: v for n, v in s.items() if n != "quantize"} if k in pipeline.PIPELINE and k not in known
                else s) for k, s in raw.items()}


def test_the_recipes_are_there():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_starts_with_what_it_expects(name):
    text = (EXAMPLES / name).read_text()
    lines = text.splitlines()
    header = lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    assert len(header) >= 5, "a header comment saying what the recipe expects"
    assert any("Expects" in line for line in header)


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_validates_through_the_pipeline_checks(name):
    raw = pipeline.load_config(EXAMPLES / name)
    if name in REQUIRES_QUANTIZE:
        raw = _without_quantize(raw)
    plans = _validate(raw)
    assert [p.name for p in plans] == list(pipeline.PIPELINE), "every stage, eval included"
    by_name = {p.name: p.settings for p in plans}
    assert by_name["train"].loss == "pd"
    assert "pd_rag" in by_name["eval"].methods


def test_qlora_recipe_needs_exactly_the_quantize_option():
    raw = pipeline.load_config(EXAMPLES / "qlora-3b-24gb.yaml")
    model_stages = {"generate", "answer", "prefill", "train", "eval"}
    assert {s for s in pipeline.PIPELINE if (raw.get(s) or {}).get("quantize") == "nf4"} == model_stages
    if _stages_with_quantize() >= model_stages:
        _validate(raw)  # the option has landed: the file validates as written
    else:
        with pytest.raises(InputError, match="unknown key 'quantize'"):
            _validate(raw)


def test_demo_recipe_matches_the_demo_settings():
    from pdengine.demo.pipeline import QUESTION_PROMPT, DemoConfig

    demo = DemoConfig()
    plans = {p.name: p.settings for p in _validate(pipeline.load_config(EXAMPLES / "demo.yaml"))}
    train, prefill, generate = plans["train"], plans["prefill"], plans["generate"]
    assert (train.lr, train.lora_r, train.lora_alpha, train.max_steps, train.replay_fraction) == (
        demo.lr, demo.lora_r, demo.lora_alpha, demo.steps, demo.replay_fraction)
    assert train.lora_embeddings and train.batch_tokens == demo.batch_tokens
    assert (prefill.k, prefill.temperature, train.temperature) == (demo.k, demo.distill_temperature,
                                                                   demo.distill_temperature)
    assert (generate.n_questions, generate.per_call, generate.prompt) == (demo.questions_per_document, 1,
                                                                         QUESTION_PROMPT)
    assert plans["eval"].rag_top_n == demo.rag_top_n
    raw = pipeline.load_config(EXAMPLES / "demo.yaml")
    assert raw["train"]["replay_cache"] == "runs/demo/replay_cache"


def test_paper_recipe_has_the_papers_student_settings():
    plans = {p.name: p.settings for p in _validate(pipeline.load_config(EXAMPLES / "llama3-8b-instruct.yaml"))}
    train = plans["train"]
    assert (train.lora_r, train.lora_alpha, train.lora_dropout, train.lr, train.epochs) == (1024, 2048, 0.05, 1e-5, 10)
    assert train.lora_lm_head and not train.lora_embeddings
    assert (plans["generate"].n_questions, plans["generate"].per_call, plans["generate"].temperature) == (30, 5, 1.5)
    assert plans["answer"].temperature == 1.5
