"""What the demo prints and checks at the end: the paper's three claims read off the report's
statistics (`pdengine.report`: means, 95 % bootstrap intervals over seeds and questions,
paired differences), and the facts behind them.

The paper's claims (Kujanpää et al.) as the demo's targets, on contains-accuracy:
PD beats SFT (the paired difference's interval lies above 0), PD rivals RAG
(PD >= 0.95 x RAG) and PD + RAG is at least RAG.
"""
from __future__ import annotations

from pdengine.report import comparisons_markdown, markdown_table

METRIC = "contains"
KEY_PAIRS = ("prompt_distillation-sft", "prompt_distillation-rag_bm25", "pd_rag-rag_bm25")


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def on_teacher_correct(per_question: list, methods) -> dict:
    """Each method's contains-accuracy on the facts the teacher answers right open-book,
    so teacher errors are not blamed on distillation."""
    right = [q for q in per_question if q["scores"]["teacher_open_book"][METRIC] == 1.0]
    return {"n": len(right), **{m: _mean(q["scores"][m][METRIC] for q in right) for m in methods}}


def targets(methods: dict, comparisons: dict) -> dict:
    """The three claims, each with the numbers it was decided on (None where a method is missing)."""
    pd, rag = methods["prompt_distillation"][METRIC], methods["rag_bm25"][METRIC]
    pd_sft = comparisons["prompt_distillation-sft"]
    out = {
        "pd_minus_sft": pd_sft[METRIC], "pd_minus_sft_ci": pd_sft[f"{METRIC}_ci"],
        "pd_beats_sft": pd_sft[f"{METRIC}_ci"][0] > 0,
        "pd_over_rag": pd / rag if rag else None,
        "pd_ge_0.95_rag": pd >= 0.95 * rag,
        # the old demo's sanity checks: injection happened at all
        "pd_ge_0.8_teacher": pd >= 0.8 * methods["teacher_open_book"][METRIC],
        "pd_ge_base_plus_0.5": pd >= methods["base_closed_book"][METRIC] + 0.5,
    }
    if "pd_rag" in methods:
        pd_rag = comparisons["pd_rag-rag_bm25"]
        out.update({"pd_rag_minus_rag": pd_rag[METRIC], "pd_rag_minus_rag_ci": pd_rag[f"{METRIC}_ci"],
                    "pd_rag_ge_rag": methods["pd_rag"][METRIC] >= rag})
    return out


def quantization(model, quantize) -> dict:
    """How the base of the teacher and the students is held: what was asked (`--quantize`),
    the layout (`quantize.quantization_identity`), and which layers are quantized and which
    stay in full precision (bitsandbytes leaves the embeddings and the output layer)."""
    from torch import nn

    from pdengine.quantize import is_quantized_linear, quantization_identity

    quantized, full = [], []
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            quantized.append(name)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            full.append(name)
    return {"quantize": quantize or "none", "identity": quantization_identity(model),
            "quantized_layers": len(quantized), "full_precision_layers": full}


def quantization_line(q: dict | None) -> str:
    if not q or not q["identity"]:
        return "base: full precision (fp32)"
    ident = ", ".join(f"{k} {v}" for k, v in q["identity"].items() if k != "method")
    return (f"base: {q['quantize']} ({q['identity']['method']}, {ident}), {q['quantized_layers']} linear layers "
            f"quantized; full precision: {', '.join(q['full_precision_layers']) or 'none'}")


def _verdict(ok) -> str:
    return "met" if ok else "MISSED"


def target_lines(t: dict) -> list[str]:
    lo, hi = t["pd_minus_sft_ci"]
    lines = [f"target PD > SFT (difference's CI above 0): {_verdict(t['pd_beats_sft'])} "
             f"({100 * t['pd_minus_sft']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}])",
             f"target PD >= 0.95 x RAG: {_verdict(t['pd_ge_0.95_rag'])} (PD / RAG = {t['pd_over_rag']:.3f})"]
    if "pd_rag_ge_rag" in t:
        lo, hi = t["pd_rag_minus_rag_ci"]
        lines.append(f"target PD+RAG >= RAG: {_verdict(t['pd_rag_ge_rag'])} "
                     f"({100 * t['pd_rag_minus_rag']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}])")
    return lines


_ORDER = ("model", "gate", "questions", "answers", "prefill", "replay_prefill", "train", "evaluate",
          "reading_check", "total")


def _in_stage_order(timings: dict) -> list[tuple[str, float]]:
    """report.json sorts its keys; print the stages in the order they ran (train_<loss>_seed<S>:
    by seed, PD before SFT)."""
    rank = {name: i for i, name in enumerate(_ORDER)}

    def key(item):
        name = item[0]
        if name == "train":  # the whole training stage, before its runs
            return rank["train"], -1, ""
        if name.startswith("train_"):
            loss, _, seed = name[len("train_"):].partition("_seed")
            return rank["train"], int(seed) if seed.isdigit() else 0, loss
        return rank.get(name, len(rank)), 0, name

    return sorted(timings.items(), key=key)


def summary_text(report: dict) -> str:
    """The table, the key paired differences, the targets and the timings, as printed at the end."""
    methods, comparisons = report["methods"], report["comparisons"]
    right = report["on_teacher_correct_contains"]
    reading = report["open_book_reading_other_people"]
    key = {name: comparisons[name] for name in KEY_PAIRS if name in comparisons}
    seeds = report["config"]["seeds"]
    lines = [
        markdown_table(methods, n_questions=report["n_eval_questions"])
        + (f"(sft, prompt_distillation, pd_rag: mean of {seeds} training seeds; intervals over seeds and questions)"
           if seeds > 1 else "(one training seed: intervals over questions only; --seeds 3 adds the training noise)"),
        comparisons_markdown(key),
        f"facts the teacher gets right: {right['n']}/{report['n_eval_questions']}; on them, contains: "
        + ", ".join(f"{m} {v:.3f}" for m, v in right.items() if m != "n" and v is not None),
        "open-book reading about other people (contains): "
        + ", ".join(f"{m} {v['contains']:.3f}" for m, v in reading.items()),
        *target_lines(report["targets"]),
        quantization_line(report.get("quantization")),
        "wall time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in _in_stage_order(report["timings"])),
        "cpu time (s): " + ", ".join(f"{k} {v:.1f}" for k, v in _in_stage_order(report["cpu_timings"])),
    ]
    return "\n".join(lines)
