"""examples/*.yaml: every recipe parses and passes `pdengine run`'s own checks (the ones it
runs on every section before the first stage), and says what it expects."""
from pathlib import Path

import pytest

from pdengine import pipeline
from pdengine.errors import InputError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("demo.yaml", "llama3-8b-instruct.yaml", "qlora-3b-24gb.yaml")


def _validate(raw: dict) -> list:
    """What `pdengine run` checks before any stage runs (no model is loaded)."""
    stages = pipeline.active_stages(raw, pipeline.check_top_level(raw))
    return pipeline.plan_pipeline(raw, stages)


def _validate_quantized(raw: dict):
    """(plans, None) when every model stage takes --quantize, else the plans without it and
    the pipeline's refusal (the qlora recipe REQUIRES the option; see its header)."""
    try:
        return _validate(raw), None
    except InputError as e:
        if "does not take --quantize yet" not in str(e):
            raise
        return _validate({k: v for k, v in raw.items() if k != "quantize"}), str(e)


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
    plans = _validate_quantized(raw)[0] if "quantize" in raw else _validate(raw)
    names = [p.name for p in plans]
    assert {"generate", "answer", "prefill", "train", "eval"} <= set(names), "every stage, eval included"
    by_name = {p.name: p.settings for p in plans}
    assert by_name["train"].loss == "pd"
    assert "pd_rag" in by_name["eval"].methods


def test_a_broken_recipe_is_refused_by_the_same_checks(tmp_path):
    """The checks above are the ones that fail: a bad value in a copy of a recipe is refused."""
    text = (EXAMPLES / "demo.yaml").read_text().replace("lr: 3.0e-3", "lr: -1")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(InputError, match="lr must be > 0"):
        _validate(pipeline.load_config(tmp_path / "bad.yaml"))


def test_qlora_recipe_quantizes_every_model_stage():
    raw = pipeline.load_config(EXAMPLES / "qlora-3b-24gb.yaml")
    assert raw["quantize"] == "nf4"
    plans, refused = _validate_quantized(raw)
    if refused:
        pytest.skip(f"the recipe needs the quantize option on every model stage: {refused}")
    assert {p.name for p in plans if getattr(p.namespace, "quantize", None) == "nf4"} >= {
        "generate", "answer", "prefill", "train", "eval"}


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
    # the sampling temperatures: the header's "Measured" line holds only for the demo's own
    assert (generate.temperature, plans["answer"].temperature) == (demo.question_temperature,
                                                                  demo.answer_temperature)
    assert (generate.seed, plans["answer"].seed, train.seed) == (demo.seed,) * 3
    raw = pipeline.load_config(EXAMPLES / "demo.yaml")
    assert raw.get("quantize", "none") == demo.quantize  # the full-precision demo
    assert raw["train"]["replay_cache"] == "runs/demo/replay_cache"  # the demo's own replay data
    assert "replay" not in [p.name for p in _validate(raw)]


def test_paper_recipe_has_the_papers_student_settings():
    plans = {p.name: p.settings for p in _validate(pipeline.load_config(EXAMPLES / "llama3-8b-instruct.yaml"))}
    train = plans["train"]
    assert (train.lora_r, train.lora_alpha, train.lora_dropout) == (1024, 2048, 0.05)
    assert (train.lr, train.epochs) == (1e-5, 10)
    assert train.lora_lm_head and not train.lora_embeddings
    assert (plans["generate"].n_questions, plans["generate"].per_call, plans["generate"].temperature) == (30, 5, 1.5)
    assert plans["answer"].temperature == 1.5
