"""The embedded demo: world, tokenizer, pretraining gate, and the pipeline end to end."""
import argparse
import json

import pytest
import torch

from pdengine import prompts
from pdengine.demo import add_arguments
from pdengine.demo import world as W
from pdengine.demo.pipeline import ASSETS, DemoConfig, run_demo
from pdengine.demo.pretrain import Encoder, pretrain, question_writing_validity, reading_accuracy
from pdengine.demo.tokenizer import build_tokenizer

METHODS = ("base_closed_book", "teacher_open_book", "rag_bm25", "sft", "prompt_distillation")
STAGES = ("model", "gate", "questions", "answers", "prefill", "replay_prefill", "train_pd", "train_sft", "evaluate")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_world_is_deterministic_per_seed():
    a, b, c = W.World(0), W.World(0), W.World(1)
    assert a.new_documents == b.new_documents
    assert a.eval_questions(seed=3) == b.eval_questions(seed=3)
    assert a.new_documents != c.new_documents


def test_new_people_are_not_in_pretraining_and_eval_uses_held_out_phrasings():
    world = W.World(0)
    pretrain_names = {e.name for e in world.pretrain_entities}
    assert len(world.new_entities) == W.World.MAX_NEW
    assert not pretrain_names & {e.name for e in world.new_entities}
    train_texts = {W.question(e, a, p) for e in world.new_entities for a in W.ATTRIBUTES
                   for p in W.train_phrasings(a)}
    rows = world.eval_questions(per_fact=3)
    assert len(rows) == 30 * len(W.ATTRIBUTES) * 3
    assert not train_texts & {r["question"] for r in rows}
    doc_text = {d["id"]: d["text"] for d in world.new_documents}
    assert all(r["answer"] in doc_text[r["doc_id"]] for r in rows)


def test_world_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_new"):
        W.World(0, n_new=0)
    with pytest.raises(ValueError, match="n_pretrain"):
        W.World(0, n_pretrain=10**6)


def test_tokenizer_round_trip_chat_template_and_save_load(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    world = W.World(0)
    texts = [d["text"] for d in world.new_documents[:5]] + [r["question"] for r in world.eval_questions()[:20]]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    user = prompts.teacher_prompt_ids(tok, texts[0], texts[-1])
    assert tok.convert_ids_to_tokens(user[:2]) == ["<s>", "<|user|>"]
    assert tok.convert_ids_to_tokens(user[-2:]) == ["<|end|>", "<|assistant|>"]
    assert "\n" in tok.convert_ids_to_tokens(user)  # the prompt separator survives tokenisation
    assert Encoder(tok).turn("Who employs Ka Lo?", first=True) == prompts.prompt_ids(tok, "Who employs Ka Lo?")
    assert prompts.end_of_turn_ids(tok) == [tok.convert_tokens_to_ids("<|end|>")]
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == tok.chat_template
    assert prompts.teacher_prompt_ids(again, texts[0], texts[-1]) == user


def test_pretraining_gate_fails_loudly_and_keeps_the_model(tmp_path):
    with pytest.raises(RuntimeError, match="gate"):
        pretrain(tmp_path / "m", steps=1, batch_docs=2, writing_per_step=1, gate=0.5, threads=1,
                 log_every=0, eval_limit=12, log=lambda *a: None)
    info = json.loads((tmp_path / "m" / "pretrain.json").read_text())
    assert info["gate_reading_accuracy"] < 0.5 and (tmp_path / "m" / "model.safetensors").is_file()


def test_pretrain_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        pretrain(tmp_path, steps=0)


@pytest.fixture(scope="module")
def shipped():
    from pdengine.loading import load_model_and_tokenizer

    if not (ASSETS / "config.json").is_file():
        pytest.fail("the shipped demo model is missing: python -m pdengine.demo.pretrain --out pdengine/demo/assets")
    return load_model_and_tokenizer(ASSETS, dtype=torch.float32, device="cpu")


def test_shipped_model_passes_the_gate(shipped):
    model, tok = shipped
    torch.set_num_threads(1)
    info = json.loads((ASSETS / "pretrain.json").read_text())
    assert info["gate_reading_accuracy"] >= info["gate"] >= 0.95
    world = W.World(info["seed"])
    assert reading_accuracy(model, tok, world, limit=180) >= 0.95
    assert question_writing_validity(model, tok, world, n=30) >= 0.8


def test_demo_cli_defaults():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.out, args.seed, args.fast, args.pretrain) == ("runs/demo", 0, False, False)


def test_demo_config_validation():
    with pytest.raises(ValueError, match="n_documents"):
        DemoConfig(n_documents=31).validate()
    with pytest.raises(ValueError, match="steps"):
        DemoConfig(steps=0).validate()


def test_demo_end_to_end_fast(tmp_path):
    out = tmp_path / "demo"
    cfg = DemoConfig.fast(threads=1)
    report = run_demo(out, cfg, log=lambda *a: None)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["methods"] == report["methods"]
    for method in METHODS:
        for metric in ("exact_match", "f1", "contains"):
            assert 0.0 <= report["methods"][method][metric] <= 1.0
    assert report["n_eval_questions"] == cfg.n_documents * len(W.ATTRIBUTES) * cfg.eval_per_fact
    assert set(STAGES) <= set(report["timings"]) and report["timings"]["total"] > 0
    assert report["questions"]["kept"] > 0 and report["training"]["pd"]["steps"] == cfg.steps
    assert report["training"]["sft"]["steps"] == cfg.steps
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer_config.json").is_file()
    assert (out / "cache" / "manifest.json").is_file()
    assert (out / "pd" / "adapter" / "adapter_config.json").is_file()
    assert (out / "report.md").is_file() and (out / "answers.jsonl").is_file()
    # the teacher reads: open-book accuracy on the new documents is high even in the fast run
    assert report["methods"]["teacher_open_book"]["contains"] >= 0.8


def test_pipeline_gate_refuses_a_model_that_cannot_read():
    from pdengine.demo.model import build_tiny_model
    from pdengine.demo.pipeline import check_gate

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0).eval()
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="gate failed"):
        check_gate(model, tok, W.World(0), DemoConfig(gate_sample=12))


def test_demo_world_new_people_were_never_pretrained_on():
    from pdengine.demo.pipeline import demo_world

    chain = {"seed": 2, "init": {"seed": 1, "init": {"seed": 1, "init": None}}}
    world = demo_world(chain)
    seen = {e.name for s in (1, 2) for e in W.World(s).pretrain_entities}
    assert world.seed == 2 and len(world.new_entities) == W.World.MAX_NEW
    assert not seen & {e.name for e in world.new_entities}
    with pytest.raises(ValueError, match="exclude"):
        W.World(0, exclude={n for f in W.POOLS["first_names"] for n in (f"{f} {l}" for l in W.POOLS["last_names"])})
