"""The evaluation report (docs/DESIGN.md, "Evaluation"): report.json, report.md, report.png
and answers.jsonl, written from the metrics and per-question scores `evaluate` returns.

Every accuracy carries its 95 % bootstrap interval over questions (`<metric>_ci`), and every
pair of methods its paired difference (`comparisons."<a>-<b>".<metric>` and `_ci`); see
`pdengine.statistics`. The paper's claims read off three of them: prompt_distillation-sft
(PD beats SFT), prompt_distillation-rag_bm25 (PD rivals RAG), pd_rag-rag_bm25 (PD + RAG beats RAG).
"""
from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np

from pdengine import statistics
from pdengine.errors import InputError
from pdengine.metrics import METRICS
# (a, b) pairs reported as a - b in this orientation; other pairs follow the methods' order
KEY_COMPARISONS = (("prompt_distillation", "sft"), ("prompt_distillation", "rag_bm25"), ("pd_rag", "rag_bm25"),
                   ("prompt_distillation", "base_closed_book"), ("sft", "base_closed_book"),
                   ("pd_rag", "teacher_open_book"), ("prompt_distillation", "teacher_open_book"))


def write_report(out_dir, methods: dict, per_question: list, extra: dict | None = None) -> dict:
    """Write report.json, report.md (a table), report.png (bar chart, when matplotlib is
    installed) and answers.jsonl (one line per question) into `out_dir`.

    report.json = `{"methods": methods (with `<metric>_ci`), "comparisons": ...,
    "n_eval_questions": len(per_question), **extra}`; the intervals are computed from
    `per_question[i]["scores"]`. Returns `{"json", "md", "answers"[, "png"]}` -> Path.
    """
    from pdengine.io import atomic_write_json, atomic_write_text, write_jsonl

    if not isinstance(methods, dict) or not methods:
        raise InputError("methods must be a non-empty dict {name: {metric: value}}")
    extra = dict(extra or {})
    clash = sorted({"methods", "comparisons", "n_eval_questions"} & set(extra))
    if clash:
        raise InputError(f"extra must not override {clash}")
    methods, comparisons = with_intervals(methods, per_question)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "answers": out / "answers.jsonl"}
    atomic_write_json(paths["json"], {"methods": methods, "comparisons": comparisons,
                                      "n_eval_questions": len(per_question), **extra})
    atomic_write_text(paths["md"], markdown_table(methods, n_questions=len(per_question))
                      + comparisons_markdown(comparisons) + per_document_markdown(methods, per_question)
                      + settings_markdown(extra))
    write_jsonl(paths["answers"], per_question)
    title = f"{extra.get('model', 'evaluation')}, {time.strftime('%Y-%m-%d')}: {len(per_question)} questions"
    png = _bar_chart(out / "report.png", methods, title)
    if png is not None:
        paths["png"] = png
    return paths


# ---------------------------------------------------------------- statistics


def as_number(value) -> float:
    """A per-question score as a number; a judge verdict counts 1 only when it is True (None is wrong)."""
    return 1.0 if value is True else 0.0 if value is False or value is None else float(value)


def per_question_values(per_question: list, method: str, metric: str) -> list:
    """One score per question (`[n]`), or `[k, n]` when the method ran with k training seeds."""
    rows = []
    for i, row in enumerate(per_question):
        try:
            seeds = row.get("seed_scores", {}).get(method) or [row["scores"][method]]
            rows.append([as_number(s[metric]) for s in seeds])
        except (KeyError, TypeError, AttributeError):
            raise InputError(f"per_question[{i}] has no {metric} score for {method}") from None
    if len({len(r) for r in rows}) > 1:
        raise InputError(f"{method}: the questions have scores of different numbers of seeds")
    by_seed = [list(x) for x in zip(*rows)]
    return by_seed[0] if len(by_seed) == 1 else by_seed


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every pair of methods once: the key comparisons in their orientation, then a later
    method minus an earlier one."""
    pairs = [(a, b) for a, b in KEY_COMPARISONS if a in names and b in names]
    seen = {frozenset(p) for p in pairs}
    for earlier, later in itertools.combinations(names, 2):
        if frozenset((earlier, later)) not in seen:
            pairs.append((later, earlier))
    return pairs


def with_intervals(methods: dict, per_question: list, **bootstrap) -> tuple[dict, dict]:
    """(methods with `<metric>_ci` added, comparisons `{"a-b": {metric, metric_ci}}`), all
    from one set of bootstrap resamples over the questions."""
    if not per_question:
        return methods, {}
    boot = statistics.Bootstrap(len(per_question), **bootstrap)
    columns = metric_columns(methods)
    values = {(m, c): per_question_values(per_question, m, c) for m in methods for c in columns
              if isinstance(methods[m].get(c), (int, float))}
    resampled = {key: boot.means(series) for key, series in values.items()}
    enriched = {m: dict(v) for m, v in methods.items()}
    for (m, c), means in resampled.items():
        enriched[m][f"{c}_ci"] = statistics.percentile_interval(means)
    comparisons = {}
    for a, b in comparison_pairs(list(methods)):
        row = {}
        for c in columns:
            if (a, c) in values and (b, c) in values:
                row[c] = float(np.mean(values[(a, c)]) - np.mean(values[(b, c)]))
                row[f"{c}_ci"] = statistics.percentile_interval(resampled[(a, c)] - resampled[(b, c)])
        comparisons[f"{a}-{b}"] = row
    return enriched, comparisons


# ---------------------------------------------------------------- Markdown


def metric_columns(methods: dict) -> list[str]:
    names = list(METRICS)
    if any("judge" in m for m in methods.values()):
        names.append("judge")
    return names


def _cell(row: dict, col: str, signed: bool = False) -> str:
    value = row.get(col)
    if not isinstance(value, (int, float)):
        return "-"
    text = f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
    ci = row.get(f"{col}_ci")
    return f"{text} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else text


def markdown_table(methods: dict, n_questions: int | None = None) -> str:
    """The methods x metrics table (values in percent, with the 95 % interval when known) as Markdown."""
    cols = metric_columns(methods)
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, m in methods.items():
        label = f"{name} ({m['seeds']} seeds)" if m.get("seeds") else name
        lines.append(f"| {label} | " + " | ".join(_cell(m, c) for c in cols) + " |")
    has_ci = any(f"{c}_ci" in m for m in methods.values() for c in cols)
    note = ", [95 % bootstrap interval over questions]" if has_ci else ""
    head = f"Evaluation on {n_questions} questions (scores in %{note}).\n\n" if n_questions is not None else ""
    return head + "\n".join(lines) + "\n"


def comparisons_markdown(comparisons: dict) -> str:
    """Paired differences a - b (points of %), with their intervals and whether 0 lies outside."""
    if not comparisons:
        return ""
    cols = [c for c in (*METRICS, "judge") if any(c in row for row in comparisons.values())]
    lines = ["", "Paired differences a - b on the same questions (points of %, [95 % bootstrap interval]; "
             "* = the interval excludes 0).", "",
             "| a - b | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, row in comparisons.items():
        cells = []
        for c in cols:
            ci = row.get(f"{c}_ci")
            star = "*" if ci and (ci[0] > 0 or ci[1] < 0) else ""
            cells.append(_cell(row, c, signed=True) + star)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_document_markdown(methods: dict, per_question: list, metric: str = "contains") -> str:
    """Each document's questions and each method's mean `metric` on them (in %): where
    injection worked and where it did not."""
    by_doc: dict[str, list[dict]] = {}
    for row in per_question:
        by_doc.setdefault(str(row.get("doc_id")), []).append(row)
    names = [m for m in methods if all(m in row.get("scores", {}) for row in per_question)]
    if not by_doc or not names:
        return ""
    lines = ["", f"Per document ({metric}, %).", "", "| document | questions | " + " | ".join(names) + " |",
             "| --- | ---: |" + " ---: |" * len(names)]
    for doc_id, rows in by_doc.items():
        cells = [f"{100 * sum(as_number(r['scores'][m][metric]) for r in rows) / len(rows):.1f}" for m in names]
        lines.append(f"| {doc_id} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def settings_markdown(extra: dict) -> str:
    """The model, adapters and settings the report was made with (what reproduces it)."""
    items = [(k, extra[k]) for k in ("model", "adapters") if extra.get(k)]
    items += sorted((extra.get("settings") or {}).items())
    if not items:
        return ""
    return "\nSettings: " + "; ".join(f"{k} = {v}" for k, v in items) + ".\n"


def _bar_chart(path: Path, methods: dict, title: str) -> Path | None:
    """Grouped bars per method, each labelled with its value, with its 95 % interval as an error bar."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.png skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    import io as _io

    from pdengine.io import atomic_write_bytes

    cols = metric_columns(methods)
    names = list(methods)
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    for j, col in enumerate(cols):
        values = [100 * float(methods[n].get(col) or 0.0) for n in names]
        cis = [methods[n].get(f"{col}_ci") or [v / 100, v / 100] for n, v in zip(names, values)]
        errors = [[max(v - 100 * lo, 0) for v, (lo, _) in zip(values, cis)],
                  [max(100 * hi - v, 0) for v, (_, hi) in zip(values, cis)]]
        bars = ax.bar([i + (j - (len(cols) - 1) / 2) * width for i in range(len(names))], values, width,
                      yerr=errors, capsize=2, label=col)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_title(f"{title}; error bars: 95 % bootstrap interval", fontsize=9)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 110)
    ax.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
