"""The evaluation report (docs/DESIGN.md, "Evaluation"): report.json, report.md, report.png
and answers.jsonl, written from the metrics and per-question scores `evaluate` returns."""
from __future__ import annotations

import sys
from pathlib import Path

from pdengine.errors import InputError

METRICS = ("exact_match", "f1", "contains")


def write_report(out_dir, methods: dict, per_question: list, extra: dict | None = None) -> dict:
    """Write report.json, report.md (a table), report.png (bar chart, when matplotlib is
    installed) and answers.jsonl (one line per question) into `out_dir`.

    report.json = `{"methods": methods, "n_eval_questions": len(per_question), **extra}`.
    Returns `{"json", "md", "answers"[, "png"]}` -> Path.
    """
    from pdengine.io import atomic_write_json, atomic_write_text, write_jsonl

    if not isinstance(methods, dict) or not methods:
        raise InputError("methods must be a non-empty dict {name: {metric: value}}")
    extra = dict(extra or {})
    clash = sorted({"methods", "n_eval_questions"} & set(extra))
    if clash:
        raise InputError(f"extra must not override {clash}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "answers": out / "answers.jsonl"}
    atomic_write_json(paths["json"], {"methods": methods, "n_eval_questions": len(per_question), **extra})
    atomic_write_text(paths["md"], markdown_table(methods, n_questions=len(per_question)))
    write_jsonl(paths["answers"], per_question)
    png = _bar_chart(out / "report.png", methods)
    if png is not None:
        paths["png"] = png
    return paths


def metric_columns(methods: dict) -> list[str]:
    names = list(METRICS)
    if any("judge" in m for m in methods.values()):
        names.append("judge")
    return names


def markdown_table(methods: dict, n_questions: int | None = None) -> str:
    """The methods x metrics table (values in percent) as Markdown."""
    cols = metric_columns(methods)
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, m in methods.items():
        cells = [f"{100 * m[c]:.1f}" if isinstance(m.get(c), (int, float)) else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    head = f"Evaluation on {n_questions} questions (scores in %).\n\n" if n_questions is not None else ""
    return head + "\n".join(lines) + "\n"


def _bar_chart(path: Path, methods: dict) -> Path | None:
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
        ax.bar([i + (j - (len(cols) - 1) / 2) * width for i in range(len(names))], values, width, label=col)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
