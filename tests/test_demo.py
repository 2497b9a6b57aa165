"""The embedded demo: world, tokenizer, pretraining gate, and the pipeline end to end."""
import argparse
import json
import os

import pytest
import torch

from pdengine import prompts
from pdengine.demo import add_arguments, run, summary
from pdengine.demo import world as W
from pdengine.demo.pipeline import ASSETS, DemoConfig, run_demo
from pdengine.demo.stages import Stages
from pdengine.errors import InputError
from pdengine.demo.pretrain import Encoder, pretrain, question_writing_validity, reading_accuracy
from pdengine.demo.tokenizer import build_tokenizer

METHODS = ("base_closed_book", "teacher_open_book", "rag_bm25", "sft", "prompt_distillation", "pd_rag")
STAGES = ("model", "gate", "questions", "answers", "prefill", "replay_prefill", "train", "evaluate", "reading_check")
RUNS = ("train_pd_seed0", "train_sft_seed0", "train_pd_seed1", "train_sft_seed1")  # parts of "train"
KEY_COMPARISONS = ("prompt_distillation-sft", "prompt_distillation-rag_bm25", "pd_rag-rag_bm25")


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
    assert (args.out, args.seed, args.seeds, args.fast, args.pretrain) == ("runs/demo", 0, None, False, False)
    assert parser.parse_args(["--seeds", "1"]).seeds == 1 and parser.parse_args(["--no-progress"]).no_progress


def test_demo_defaults_are_the_papers_sampling_and_three_training_seeds():
    cfg = DemoConfig()
    assert (cfg.answer_temperature, cfg.seeds, cfg.progress, cfg.threads, cfg.quantize) == (1.5, 3, True, 1, "none")
    assert cfg.workers == min(2, os.cpu_count() or 1)
    assert DemoConfig.fast().seeds == 1 and DemoConfig.fast(seeds=2).seeds == 2


def test_demo_config_validation():
    with pytest.raises(ValueError, match="n_documents"):
        DemoConfig(n_documents=31).validate()
    with pytest.raises(ValueError, match="steps"):
        DemoConfig(steps=0).validate()
    with pytest.raises(InputError, match="seeds must be >= 1"):
        DemoConfig(seeds=0).validate()
    with pytest.raises(InputError, match="workers must be >= 1"):
        DemoConfig(workers=0).validate()
    with pytest.raises(InputError, match="'nf5' is not one of none, nf4, int8"):
        DemoConfig(quantize="nf5").validate()


def test_the_cli_passes_seeds_and_progress_to_the_demo(monkeypatch, tmp_path):
    import pdengine.demo.pipeline as demo_pipeline

    seen = {}
    monkeypatch.setattr(demo_pipeline, "run_demo", lambda out, cfg, **kw: seen.update(cfg=cfg))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--out", str(tmp_path), "--seeds", "1", "--no-progress"])) == 0
    assert (seen["cfg"].seeds, seen["cfg"].progress, seen["cfg"].answer_temperature) == (1, False, 1.5)
    run(parser.parse_args(["--out", str(tmp_path)]))
    assert (seen["cfg"].seeds, seen["cfg"].progress, seen["cfg"].threads) == (3, True, 1)
    assert seen["cfg"].quantize == "none"
    run(parser.parse_args(["--out", str(tmp_path), "--threads", "2", "--workers", "1", "--quantize", "nf4"]))
    assert (seen["cfg"].threads, seen["cfg"].workers, seen["cfg"].quantize) == (2, 1, "nf4")
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantize", "fp8"])


def _methods(**contains):
    return {name: {"contains": value} for name, value in contains.items()}


def test_targets_read_the_papers_claims_off_the_intervals():
    methods = _methods(prompt_distillation=0.93, sft=0.88, rag_bm25=0.97, pd_rag=0.98, teacher_open_book=1.0,
                       base_closed_book=0.04)
    comparisons = {"prompt_distillation-sft": {"contains": 0.05, "contains_ci": [0.01, 0.09]},
                   "pd_rag-rag_bm25": {"contains": 0.01, "contains_ci": [-0.01, 0.03]}}
    t = summary.targets(methods, comparisons)
    assert t["pd_beats_sft"] and t["pd_ge_0.95_rag"] and t["pd_rag_ge_rag"]
    assert t["pd_over_rag"] == pytest.approx(0.93 / 0.97) and t["pd_minus_sft_ci"] == [0.01, 0.09]
    # a positive mean difference whose interval reaches 0 is not "PD beats SFT"
    comparisons["prompt_distillation-sft"]["contains_ci"] = [-0.002, 0.09]
    methods["prompt_distillation"]["contains"] = 0.92  # 0.92 < 0.95 x 0.97
    methods["pd_rag"]["contains"] = 0.96
    t = summary.targets(methods, comparisons)
    assert not (t["pd_beats_sft"] or t["pd_ge_0.95_rag"] or t["pd_rag_ge_rag"])
    lines = summary.target_lines(t)
    assert len(lines) == 3 and all("MISSED" in line for line in lines)
    assert "[-0.2, +9.0]" in lines[0]


def test_stages_log_wall_cpu_and_elapsed_time():
    lines = []
    stages = Stages(lines.append, total=2)
    assert stages.run("busy", lambda: sum(i * i for i in range(200_000))) > 0
    stages.run("idle", lambda: None)
    stages.finish()
    stages.record("part", 1.5, 0.5, note="process 7")
    assert lines[0] == "[demo 0:00] 1/2 busy ..." and lines[1].startswith("[demo 0:00] 1/2 busy: ")
    assert "(cpu " in lines[1] and lines[3].startswith("[demo 0:00] 2/2 idle: ")
    assert lines[4] == "[demo 0:00]   part: 1.5 s (cpu 0.5 s, process 7)"
    assert set(stages.seconds) == set(stages.cpu_seconds) == {"busy", "idle", "part", "total"}
    assert stages.cpu_seconds["busy"] > 0 and stages.seconds["total"] >= stages.seconds["busy"]


def test_demo_end_to_end_fast_with_two_training_seeds(tmp_path, capsys):
    out = tmp_path / "demo"
    cfg = DemoConfig.fast(threads=1, seeds=2, steps=3, workers=2)
    lines = []
    report = run_demo(out, cfg, log=lines.append)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["methods"] == report["methods"]
    for method in METHODS:
        for metric in ("exact_match", "f1", "contains"):
            assert 0.0 <= report["methods"][method][metric] <= 1.0
            low, high = report["methods"][method][f"{metric}_ci"]
            assert low <= report["methods"][method][metric] <= high
    # PD, SFT and PD + RAG are the mean of the two training seeds, with each seed listed
    for method in ("prompt_distillation", "sft", "pd_rag"):
        per_seed = report["methods"][method]["per_seed"]["contains"]
        assert report["methods"][method]["seeds"] == 2 and len(per_seed) == 2
        assert report["methods"][method]["contains"] == pytest.approx(sum(per_seed) / 2)
    for name in KEY_COMPARISONS:
        assert len(report["comparisons"][name]["contains_ci"]) == 2
    t = report["targets"]
    assert t["pd_minus_sft_ci"] == report["comparisons"]["prompt_distillation-sft"]["contains_ci"]
    assert t["pd_beats_sft"] == (t["pd_minus_sft_ci"][0] > 0)
    assert [r["seed"] for r in report["training"]["pd"]] == [0, 1]
    assert report["n_eval_questions"] == cfg.n_documents * len(W.ATTRIBUTES) * cfg.eval_per_fact
    assert set(STAGES + RUNS) <= set(report["timings"]) and report["timings"]["total"] > 0
    assert set(report["timings"]) == set(report["cpu_timings"]) and report["cpu_timings"]["total"] > 0
    assert report["questions"]["kept"] > 0 and report["config"]["answer_temperature"] == 1.5
    assert all(r["steps"] == cfg.steps for r in report["training"]["pd"] + report["training"]["sft"])
    seed_dirs = [out / "pd" / f"seed-{s}" / "adapter" for s in (0, 1)]
    assert all((d / "adapter_config.json").is_file() for d in seed_dirs)
    # the seeds train differently (LoRA init and batch order), so their adapters differ
    assert (seed_dirs[0] / "adapter_model.safetensors").read_bytes() != \
        (seed_dirs[1] / "adapter_model.safetensors").read_bytes()
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer_config.json").is_file()
    assert (out / "cache" / "manifest.json").is_file()
    assert (out / "report.md").is_file() and (out / "answers.jsonl").is_file()
    # the teacher reads: open-book accuracy on the new documents is high even in the fast run
    assert report["methods"]["teacher_open_book"]["contains"] >= 0.8
    # progress: one start line and one end line (with wall and cpu time) per stage, one line per
    # training run (as the workers finish them), bars on stderr
    for stage in STAGES:
        assert sum(f" {stage} ..." in line or f" {stage}: " in line for line in lines) == 2
    for part in RUNS:
        assert sum(line.startswith("[demo ") and f"   {part}: " in line and ", process " in line
                   for line in lines) == 1
    assert "in 2 processes, 1 thread(s) each" in next(line for line in lines if " train ..." in line)
    assert "target PD > SFT" in lines[-1] and "cpu time (s): model" in lines[-1]
    assert "base: full precision (fp32)" in lines[-1] and report["quantization"]["identity"] is None
    err = capsys.readouterr().err
    assert "teacher prefill" in err and "questions (round 1)" in err
    # the stage's CPU time counts the workers (reaped children), not only this process
    assert report["cpu_timings"]["train"] >= 0.9 * sum(report["cpu_timings"][p] for p in RUNS)
    # a run trained in a worker process equals the same run trained here, byte for byte
    _retrain_here_and_compare(out, "sft", 1, cfg, tmp_path / "again")


def _retrain_here_and_compare(out, loss, seed, cfg, again):
    from pdengine.cache import TeacherCache
    from pdengine.demo.students import train_student

    model, run_summary = train_student(out / "model", TeacherCache(out / "cache"),
                                       TeacherCache(out / "replay_cache"), again, loss, cfg, seed, progress=False)
    name = "adapter/adapter_model.safetensors"
    assert (again / name).read_bytes() == (out / loss / f"seed-{seed}" / name).read_bytes()
    assert run_summary["steps"] == cfg.steps


@pytest.fixture(scope="module")
def nf4_demo(tmp_path_factory):
    """`pdengine demo --fast --quantize nf4` (students in two forked workers): (out, cfg, report, log)."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("nf4") / "demo"
    cfg = DemoConfig.fast(threads=1, steps=2, quantize="nf4", workers=2, progress=False)
    lines = []
    return out, cfg, run_demo(out, cfg, log=lines.append), lines


def test_demo_fast_on_an_nf4_base_records_the_quantization(nf4_demo):
    """The teacher (questions, answers, prefill, evaluation) and the students are the same
    NF4 base; the report says what was quantized."""
    out, cfg, report, lines = nf4_demo
    q = report["quantization"]
    assert report["config"]["quantize"] == q["quantize"] == "nf4"
    assert q["identity"] == {"method": "bitsandbytes-nf4", "blocksize": 64, "double_quant": True}
    # every linear layer of the 2 decoder layers (q, k, v, o, gate, up, down: d_in 128 or 384,
    # multiples of the blocksize, so none is refused on the CPU); embeddings and lm_head stay fp32
    assert q["quantized_layers"] == 14 and q["full_precision_layers"] == ["model.embed_tokens", "lm_head"]
    assert "base: nf4 (bitsandbytes-nf4" in lines[-1]
    # the teacher cache was made by the NF4 base, and training checks the student against it
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["model"]["quantization"]["method"] == "bitsandbytes-nf4"
    for method in ("prompt_distillation", "sft", "teacher_open_book"):
        assert 0.0 <= report["methods"][method]["contains"] <= 1.0
    assert all(r["steps"] == 2 for r in report["training"]["pd"] + report["training"]["sft"])
    assert sum(", process " in line for line in lines) == 2


def test_spawned_workers_train_what_forked_ones_do(nf4_demo, tmp_path, monkeypatch):
    """--threads > 1 spawns the workers (a multi-threaded parent cannot fork): a spawned
    worker opens the caches from disk and loads the NF4 base itself, and writes the same
    adapter, byte for byte, as the forked worker of the demo run."""
    from pdengine.cache import TeacherCache
    from pdengine.demo import students

    out, cfg, _, _ = nf4_demo
    assert (students.start_method(1), students.start_method(2)) == ("fork", "spawn")
    again = tmp_path / "again"
    again.mkdir()
    (again / "model").symlink_to(out / "model")
    lines = []
    monkeypatch.setattr(students, "start_method", lambda threads: "spawn")
    students._train_in_workers(Stages(lines.append), [("pd", 0)], again, TeacherCache(out / "cache"),
                               TeacherCache(out / "replay_cache"), cfg)
    name = "adapter/adapter_model.safetensors"
    assert (again / "pd" / "seed-0" / name).read_bytes() == (out / "pd" / "seed-0" / name).read_bytes()
    assert len(lines) == 1 and "train_pd_seed0: " in lines[0]


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


def _die(task):
    os._exit(9)  # a worker killed mid-training (OOM killer, SIGKILL)


def test_a_killed_training_worker_is_one_error_not_a_hang(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from pdengine.demo import students
    from pdengine.errors import CommandError

    monkeypatch.setattr(students, "_init_worker", lambda *args: None)  # forked: the child sees these
    monkeypatch.setattr(students, "_worker_run", _die)
    cfg = SimpleNamespace(threads=1, workers=2)
    cache = SimpleNamespace(path=tmp_path)
    with pytest.raises(CommandError, match="a training worker died.*--workers 1"):
        students._train_in_workers(Stages(lambda line: None), [("pd", 0), ("sft", 0)], tmp_path, cache, cache, cfg)


def test_the_demo_refuses_torchrun_in_one_line(monkeypatch, tmp_path, capsys):
    from pdengine import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["demo", "--fast", "--out", str(tmp_path / "demo")]) == 2
    assert "the demo runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
