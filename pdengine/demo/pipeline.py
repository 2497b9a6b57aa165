"""The demo pipeline: inject a generated world's new facts into the tiny model.

Every stage runs through the same code a real model uses (pdengine.qa, pdengine.prefill,
pdengine.train, pdengine.evaluate); only the model and the documents are the demo's own.

    DIR/model/           the tiny base model (HF directory with tokenizer)
    DIR/documents.jsonl  the new documents (people never seen in pretraining)
    DIR/questions.jsonl  questions the model wrote about them
    DIR/qa.jsonl         the teacher's answers (with answer_ids)
    DIR/cache/           the teacher cache;  DIR/replay_cache/  read-the-document replay
    DIR/pd/, DIR/sft/    prompt-distillation and SFT runs (adapters, metrics)
    DIR/eval_questions.jsonl, DIR/report.json, report.md, report.png, answers.jsonl
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pdengine.demo import world as W
from pdengine.errors import InputError

ASSETS = Path(__file__).parent / "assets"
QUESTION_PROMPT = W.QUESTION_WRITING_PROMPT + "\n\n{document}"


@dataclass
class DemoConfig:
    """Knobs of the demo (defaults: the full run; `fast()` for tests)."""

    seed: int = 0
    n_documents: int = 30
    questions_per_document: int = 20
    question_temperature: float = 1.0
    answer_temperature: float = 1.0
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
    threads: int = 2
    gate: float = 0.95
    gate_sample: int = 180

    @classmethod
    def fast(cls, **overrides) -> "DemoConfig":
        """A few documents and steps: checks that every stage runs, not that injection works."""
        base = dict(n_documents=3, questions_per_document=4, eval_per_fact=1, replay_documents=16,
                    reading_check_documents=8, steps=4, batch_tokens=256)
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        for name in ("n_documents", "questions_per_document", "eval_per_fact", "k", "replay_documents",
                     "reading_check_documents", "steps", "lora_r", "batch_tokens", "rag_top_n",
                     "batch_size", "threads", "gate_sample"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 1 <= self.n_documents <= W.World.MAX_NEW:
            raise InputError(f"n_documents must be in 1..{W.World.MAX_NEW}, got {self.n_documents}")


class _Stages:
    """Wall-clock time of each stage, printed as it goes."""

    def __init__(self, log):
        self.seconds: dict[str, float] = {}
        self.log = log

    def run(self, name: str, fn, *args, **kwargs):
        self.log(f"[demo] {name} ...")
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        self.log(f"[demo] {name}: {self.seconds[name]:.1f}s")
        return out


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


def _load(model_dir: Path):
    from pdengine.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, dtype=torch.float32, device="cpu")


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
        batch_size=cfg.batch_size, seed=cfg.seed, progress=False,
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
                                   batch_size=cfg.batch_size, seed=cfg.seed, progress=False)
    accuracy = sum(a["answer"] == r["answer"] for a, r in zip(answered, rows)) / len(rows)
    cache = prefill(model, tokenizer, docs, answered, out_dir, k=cfg.k, temperature=cfg.distill_temperature,
                    student_sees_document=True, resume=False, progress=False)
    return cache, accuracy


def train_student(model_dir: Path, cache, replay, out_dir: Path, loss: str, cfg: DemoConfig):
    """A fresh copy of the base model + LoRA (attention, MLP and input embeddings)."""
    from pdengine.train import TrainConfig, train

    model, tokenizer = _load(model_dir)
    config = TrainConfig(
        loss=loss, temperature=cfg.distill_temperature, lr=cfg.lr, weight_decay=0.0, warmup_ratio=0.05,
        lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, lora_embeddings=True,
        batch_tokens=cfg.batch_tokens, seed=cfg.seed, max_steps=cfg.steps, schedule_steps=cfg.steps,
        epochs=10_000, save_every=0, keep_checkpoints=1, replay_fraction=cfg.replay_fraction,
        progress=False,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    summary = train(model, tokenizer, cache, out_dir, config, replay_cache=replay)
    return model.eval(), summary


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def on_teacher_correct(per_question: list, methods) -> dict:
    """Each method's contains-accuracy on the facts the teacher answers right open-book,
    so teacher errors are not blamed on distillation."""
    right = [q for q in per_question if q["scores"]["teacher_open_book"]["contains"] == 1.0]
    return {"n": len(right), **{m: _mean(q["scores"][m]["contains"] for q in right) for m in methods}}


def reading_after_injection(models: dict, tokenizer, world: W.World, cfg: DemoConfig) -> dict:
    """Open-book reading about other pretraining people (not in the replay set), per model."""
    from pdengine import evaluate as E

    docs, rows = world.reading_examples(cfg.reading_check_documents, seed=cfg.seed + 29)
    out = {}
    for name, model in models.items():
        answers = E.answer_open_book(model, tokenizer, docs, rows, max_new_tokens=8,
                                     batch_size=cfg.batch_size, progress=False)
        out[name] = E.score(answers, [r["answer"] for r in rows])
    return out


def run_demo(out_dir, cfg: DemoConfig | None = None, *, pretrain: bool = False, pretrain_seed: int = 1,
             model_source=None, log=print) -> dict:
    """Run the whole demo into out_dir; returns the report (also DIR/report.json).

    The base model is a copy of `model_source` (default: the shipped checkpoint in
    pdengine/demo/assets) or, with pretrain=True, pretrained from scratch with the shipped
    recipe (pretrain.pretrain_recipe; pretrain_seed 1 reproduces the shipped model).
    """
    from pdengine import evaluate as E
    from pdengine import qa
    from pdengine.prefill import prefill
    from pdengine.io import write_jsonl

    cfg = cfg or DemoConfig()
    cfg.validate()
    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(log)
    started = time.perf_counter()

    pretrain_info = stages.run("model", prepare_model, out / "model", pretrain=pretrain, seed=pretrain_seed,
                               source=Path(model_source or ASSETS), log=log)
    model, tokenizer = _load(out / "model")
    world = demo_world(pretrain_info)
    documents = world.new_documents[: cfg.n_documents]
    eval_questions = world.eval_questions(per_fact=cfg.eval_per_fact, seed=cfg.seed, n_documents=cfg.n_documents)
    gate_accuracy = stages.run("gate", check_gate, model, tokenizer, world, cfg)
    write_jsonl(out / "documents.jsonl", documents)
    write_jsonl(out / "eval_questions.jsonl", eval_questions)

    questions, question_stats = stages.run("questions", write_questions, model, tokenizer, documents,
                                           eval_questions, cfg)
    write_jsonl(out / "questions.jsonl", questions)
    qa_pairs = stages.run("answers", qa.answer_questions, model, tokenizer, documents, questions,
                          temperature=cfg.answer_temperature, max_new_tokens=8, batch_size=cfg.batch_size,
                          seed=cfg.seed, progress=False)
    write_jsonl(out / "qa.jsonl", qa_pairs)
    cache = stages.run("prefill", prefill, model, tokenizer, documents, qa_pairs, out / "cache", k=cfg.k,
                       temperature=cfg.distill_temperature, resume=False, progress=False)
    replay, replay_teacher_acc = stages.run("replay_prefill", build_replay, model, tokenizer, world,
                                            out / "replay_cache", cfg)

    pd_model, pd_summary = stages.run("train_pd", train_student, out / "model", cache, replay, out / "pd", "pd", cfg)
    sft_model, sft_summary = stages.run("train_sft", train_student, out / "model", cache, replay, out / "sft",
                                        "sft", cfg)

    methods, per_question = stages.run(
        "evaluate", E.evaluate, model, tokenizer, documents, eval_questions,
        students={"sft": sft_model, "prompt_distillation": pd_model}, rag_top_n=cfg.rag_top_n,
        max_new_tokens=8, batch_size=cfg.batch_size, progress=False,
    )
    reading = stages.run("reading_check", reading_after_injection,
                         {"base": model, "sft": sft_model, "prompt_distillation": pd_model}, tokenizer, world, cfg)
    stages.seconds["total"] = round(time.perf_counter() - started, 2)

    extra = {
        "timings": stages.seconds,
        "on_teacher_correct_contains": on_teacher_correct(per_question, list(methods)),
        "open_book_reading_other_people": reading,
        "targets": _targets(methods),
        "questions": {**question_stats, "kept": len(questions), "qa_pairs": len(qa_pairs)},
        "replay_teacher_accuracy": replay_teacher_acc,
        "gate": {"threshold": cfg.gate, "open_book_reading_accuracy": gate_accuracy},
        "training": {"pd": _brief(pd_summary), "sft": _brief(sft_summary)},
        "pretrain": pretrain_info,
        "config": dataclasses.asdict(cfg),
    }
    E.write_report(out, methods, per_question, extra=extra)
    report = json.loads((out / "report.json").read_text())
    log(E.markdown_table(methods, n_questions=len(per_question)))
    log(_summary_lines(report))
    return report


def _brief(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("steps", "first_loss", "final_loss", "seconds", "tokens_per_s")}


def _targets(methods: dict) -> dict:
    """The demo's targets: PD contains >= 0.8 x teacher open-book and >= base + 0.5."""
    pd = methods["prompt_distillation"]["contains"]
    teacher = methods["teacher_open_book"]["contains"]
    base = methods["base_closed_book"]["contains"]
    return {"pd_vs_teacher_ratio": pd / teacher if teacher else None,
            "pd_ge_0.8_teacher": pd >= 0.8 * teacher, "pd_ge_base_plus_0.5": pd >= base + 0.5}


def _summary_lines(report: dict) -> str:
    t = report["targets"]
    right = report["on_teacher_correct_contains"]
    reading = report["open_book_reading_other_people"]
    return "\n".join([
        f"facts the teacher gets right: {right['n']}/{report['n_eval_questions']}; on them, contains: "
        + ", ".join(f"{m} {v:.3f}" for m, v in right.items() if m != "n" and v is not None),
        "open-book reading about other people (contains): "
        + ", ".join(f"{m} {v['contains']:.3f}" for m, v in reading.items()),
        f"targets: PD >= 0.8 x teacher: {t['pd_ge_0.8_teacher']}, PD >= base + 0.5: {t['pd_ge_base_plus_0.5']}",
        "timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
    ])
