"""The demo pipeline: inject a generated world's new facts into the tiny model.

Every stage runs through the same code a real model uses (pdengine.qa, pdengine.prefill,
pdengine.train, pdengine.evaluate); only the model and the documents are the demo's own.

    DIR/model/           the tiny base model (HF directory with tokenizer)
    DIR/documents.jsonl  the new documents (people never seen in pretraining)
    DIR/questions.jsonl  questions the model wrote about them
    DIR/qa.jsonl         the teacher's answers (with answer_ids)
    DIR/cache/           the teacher cache;  DIR/replay_cache/  read-the-document replay
    DIR/pd/seed-S/, DIR/sft/seed-S/   prompt-distillation and SFT runs, one per training seed
    DIR/eval_questions.jsonl, DIR/report.json, report.md, report.png, answers.jsonl
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdengine.demo import summary
from pdengine.demo import world as W
from pdengine.demo.stages import Stages
from pdengine.demo.students import load_base, train_all
from pdengine.errors import InputError

ASSETS = Path(__file__).parent / "assets"
QUESTION_PROMPT = W.QUESTION_WRITING_PROMPT + "\n\n{document}"


@dataclass
class DemoConfig:
    """Knobs of the demo (defaults: the full run; `fast()` for tests).

    `seed` seeds the data (questions, the teacher's sampled answers, evaluation); PD and SFT
    each train `seeds` times, with training seeds seed, seed + 1, ... on the same data, so
    the report's intervals cover the training noise as well as the choice of questions.
    """

    seed: int = 0
    seeds: int = 3
    n_documents: int = 30
    questions_per_document: int = 20
    question_temperature: float = 1.0
    # the paper's sampling temperature: the teacher's answers carry its uncertainty, which
    # SFT fits as noise and PD as the distribution it is (docs/DESIGN.md, "Method")
    answer_temperature: float = 1.5
    eval_per_fact: int = 3
    k: int = 32
    distill_temperature: float = 2.0
    replay_documents: int = 600
    reading_check_documents: int = 120
    replay_fraction: float = 0.5
    steps: int = 300
    lr: float = 3e-3
    lora_r: int = 16
    lora_alpha: float = 32.0
    batch_tokens: int = 1024
    rag_top_n: int = 1
    batch_size: int = 64
    # one thread: measured on the shared 2-core machine, two threads took 178 s of wall and
    # 42 s of CPU to write the questions where one took 8 s and 3.5 s (the second thread
    # spin-waits when the machine is busy; the model is too small to split its matmuls)
    threads: int = 1
    # training processes: the PD and SFT runs are independent, so on 2 cores two
    # one-thread processes train side by side (pdengine/demo/students.py); 1: in this process
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    # the frozen base of teacher and students ("none", "nf4", "int8": pdengine/quantize.py)
    quantize: str = "none"
    gate: float = 0.95
    gate_sample: int = 180
    progress: bool = True

    @classmethod
    def fast(cls, **overrides) -> "DemoConfig":
        """A few documents and steps: checks that every stage runs, not that injection works."""
        base = dict(n_documents=3, questions_per_document=4, eval_per_fact=1, replay_documents=16,
                    reading_check_documents=8, steps=4, batch_tokens=256, seeds=1)
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        for name in ("seeds", "n_documents", "questions_per_document", "eval_per_fact", "k", "replay_documents",
                     "reading_check_documents", "steps", "lora_r", "batch_tokens", "rag_top_n",
                     "batch_size", "threads", "workers", "gate_sample"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 1 <= self.n_documents <= W.World.MAX_NEW:
            raise InputError(f"n_documents must be in 1..{W.World.MAX_NEW}, got {self.n_documents}")
        from pdengine.quantize import parse_quantize

        parse_quantize(self.quantize)  # InputError naming the choices


def prepare_model(model_dir: Path, *, pretrain: bool, seed: int, source: Path = ASSETS, log=print) -> dict:
    """Put the tiny base model in model_dir: a copy of the shipped checkpoint, or pretrain it."""
    if pretrain:
        from pdengine.demo.pretrain import pretrain_recipe

        if model_dir.exists():
            shutil.rmtree(model_dir)
        return pretrain_recipe(model_dir, seed=seed, log=log)
    if not (source / "config.json").is_file():
        raise InputError(f"no shipped demo model in {source}; run with --pretrain to build one")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(source, model_dir)
    return json.loads((model_dir / "pretrain.json").read_text())


def _base_model(model_dir: Path, pretrain: bool, pretrain_seed: int, source: Path, quantize: str, log):
    """(pretrain info, base model, tokenizer, the demo world): the demo's first stage."""
    info = prepare_model(model_dir, pretrain=pretrain, seed=pretrain_seed, source=source, log=log)
    model, tokenizer = load_base(model_dir, quantize)
    return info, model, tokenizer, demo_world(info)


def _stage_seeds(info: dict) -> list[int]:
    """World seeds of every pretraining stage, last stage first (pretrain.json chains them via "init")."""
    seeds = []
    while isinstance(info, dict):
        seeds.append(int(info.get("seed", 0)))
        info = info.get("init")
    return seeds


def demo_world(pretrain_info: dict) -> W.World:
    """The world of the model's last pretraining stage; its new people are never people any
    stage pretrained on (stages may use other world seeds)."""
    seeds = _stage_seeds(pretrain_info)
    seen = {e.name for s in set(seeds[1:]) - {seeds[0]} for e in W.World(s).pretrain_entities}
    return W.World(seeds[0], exclude=seen)


def check_gate(model, tokenizer, world: W.World, cfg: DemoConfig) -> float:
    """The teacher must read: open-book accuracy on the new documents (a sample of every
    phrasing) >= cfg.gate, else GateFailed (injection is pointless without a teacher)."""
    from pdengine.demo.pretrain import GateFailed, reading_accuracy

    accuracy = reading_accuracy(model, tokenizer, world, limit=cfg.gate_sample)
    if accuracy < cfg.gate:
        raise GateFailed(f"gate failed: the base model's open-book reading accuracy {accuracy:.3f} < "
                           f"{cfg.gate}; pretrain a better model (--pretrain with another --seed)")
    return accuracy


def write_questions(model, tokenizer, documents, eval_questions, cfg: DemoConfig) -> tuple[list, dict]:
    """The model writes questions (one per call, deduplicated). Questions that happen to
    equal an evaluation question are dropped, so evaluation stays on unseen phrasings."""
    from pdengine import qa

    rows = qa.generate_questions(
        model, tokenizer, documents, n_questions=cfg.questions_per_document, per_call=1,
        temperature=cfg.question_temperature, top_k=None, prompt=QUESTION_PROMPT, max_new_tokens=24,
        batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress,
    )
    held_out = {qa.normalize_question(q["question"]) for q in eval_questions}
    kept = [r for r in rows if qa.normalize_question(r["question"]) not in held_out]
    return kept, {"generated": len(rows), "dropped_as_eval_questions": len(rows) - len(kept)}


def build_replay(model, tokenizer, world: W.World, out_dir: Path, cfg: DemoConfig):
    """Self-distillation replay: the base model's greedy open-book answers about other
    (pretraining) people, cached with the document in the student's prompt too."""
    from pdengine import qa
    from pdengine.prefill import prefill

    docs, rows = world.reading_examples(cfg.replay_documents, seed=cfg.seed + 17)
    answered = qa.answer_questions(model, tokenizer, docs, rows, temperature=0.0, max_new_tokens=8,
                                   batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress)
    accuracy = sum(a["answer"] == r["answer"] for a, r in zip(answered, rows)) / len(rows)
    cache = prefill(model, tokenizer, docs, answered, out_dir, k=cfg.k, temperature=cfg.distill_temperature,
                    student_sees_document=True, resume=False, progress=cfg.progress)
    return cache, accuracy


def reading_after_injection(models: dict, tokenizer, world: W.World, cfg: DemoConfig) -> dict:
    """Open-book reading about other pretraining people (not in the replay set), per model."""
    from pdengine import evaluate as E

    docs, rows = world.reading_examples(cfg.reading_check_documents, seed=cfg.seed + 29)
    out = {}
    for name, model in models.items():
        answers = E.answer_open_book(model, tokenizer, docs, rows, max_new_tokens=8,
                                     batch_size=cfg.batch_size, progress=cfg.progress)
        out[name] = E.score(answers, [r["answer"] for r in rows])
    return out


def make_data(stages: Stages, model, tokenizer, world: W.World, out: Path, cfg: DemoConfig) -> dict:
    """Questions, the teacher's sampled answers, the teacher cache and the replay cache
    (made once, from `cfg.seed`, and shared by every training seed)."""
    from pdengine import qa
    from pdengine.io import write_jsonl
    from pdengine.prefill import prefill

    documents = world.new_documents[: cfg.n_documents]
    eval_questions = world.eval_questions(per_fact=cfg.eval_per_fact, seed=cfg.seed, n_documents=cfg.n_documents)
    write_jsonl(out / "documents.jsonl", documents)
    write_jsonl(out / "eval_questions.jsonl", eval_questions)
    questions, question_stats = stages.run("questions", write_questions, model, tokenizer, documents,
                                           eval_questions, cfg)
    write_jsonl(out / "questions.jsonl", questions)
    qa_pairs = stages.run("answers", qa.answer_questions, model, tokenizer, documents, questions,
                          temperature=cfg.answer_temperature, max_new_tokens=8, batch_size=cfg.batch_size,
                          seed=cfg.seed, progress=cfg.progress)
    write_jsonl(out / "qa.jsonl", qa_pairs)
    cache = stages.run("prefill", prefill, model, tokenizer, documents, qa_pairs, out / "cache", k=cfg.k,
                       temperature=cfg.distill_temperature, resume=False, progress=cfg.progress)
    replay, replay_teacher_acc = stages.run("replay_prefill", build_replay, model, tokenizer, world,
                                            out / "replay_cache", cfg)
    return {"documents": documents, "eval_questions": eval_questions, "cache": cache, "replay": replay,
            "questions": {**question_stats, "kept": len(questions), "qa_pairs": len(qa_pairs)},
            "replay_teacher_accuracy": replay_teacher_acc}


# the stages, in order (train: every PD and SFT run, each also timed as train_<loss>_seed<S>)
_STAGES = ("model", "gate", "questions", "answers", "prefill", "replay_prefill", "train", "evaluate",
           "reading_check")


def run_demo(out_dir, cfg: DemoConfig | None = None, *, pretrain: bool = False, pretrain_seed: int = 1,
             model_source=None, log=print) -> dict:
    """Run the whole demo into out_dir; returns the report (also DIR/report.json).

    The base model is a copy of `model_source` (default: the shipped checkpoint in
    pdengine/demo/assets) or, with pretrain=True, pretrained from scratch with the shipped
    recipe (pretrain.pretrain_recipe; pretrain_seed 1 reproduces the shipped model).
    """
    from pdengine import evaluate as E
    from pdengine.report import with_intervals

    cfg = cfg or DemoConfig()
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(log, total=len(_STAGES))

    pretrain_info, model, tokenizer, world = stages.run("model", _base_model, out / "model", pretrain,
                                                        pretrain_seed, Path(model_source or ASSETS), cfg.quantize,
                                                        log)
    gate_accuracy = stages.run("gate", check_gate, model, tokenizer, world, cfg)
    data = make_data(stages, model, tokenizer, world, out, cfg)
    students, training = train_all(stages, out, data["cache"], data["replay"], cfg)

    # pd_rag: the PD students with the RAG passages in their prompt (evaluate's default methods)
    methods, per_question = stages.run(
        "evaluate", E.evaluate, model, tokenizer, data["documents"], data["eval_questions"], students=students,
        rag_top_n=cfg.rag_top_n, max_new_tokens=8, batch_size=cfg.batch_size, progress=cfg.progress,
    )
    # the first training seed's students only: a check that reading survives, not a statistic
    first = {name: seeds[0] for name, seeds in students.items()}
    reading = stages.run("reading_check", reading_after_injection, {"base": model, **first}, tokenizer, world, cfg)
    stages.finish()

    # the same resamples write_report draws (fixed seed), so the targets match report.json's intervals
    with_ci, comparisons = with_intervals(methods, per_question)
    extra = {
        "timings": stages.seconds,
        "cpu_timings": stages.cpu_seconds,
        "on_teacher_correct_contains": summary.on_teacher_correct(per_question, list(methods)),
        "open_book_reading_other_people": reading,
        "open_book_reading_seed": cfg.seed,
        "targets": summary.targets(with_ci, comparisons),
        "questions": data["questions"],
        "replay_teacher_accuracy": data["replay_teacher_accuracy"],
        "gate": {"threshold": cfg.gate, "open_book_reading_accuracy": gate_accuracy},
        "quantization": summary.quantization(model, cfg.quantize),
        "training": training,
        "pretrain": pretrain_info,
        "config": dataclasses.asdict(cfg),
    }
    E.write_report(out, methods, per_question, extra=extra)
    report = json.loads((out / "report.json").read_text())
    log(summary.summary_text(report))
    return report

