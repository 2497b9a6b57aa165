"""pdengine.report: intervals and paired comparisons in report.json / report.md, the chart."""
import json

import pytest

from pdengine import report as R
from pdengine import statistics as S
from pdengine.errors import InputError


def _rows(scores: dict) -> list[dict]:
    """per_question rows from {method: [contains per question]} (exact match = f1 = contains)."""
    n = len(next(iter(scores.values())))
    return [{"scores": {m: {k: v[i] for k in R.METRICS} for m, v in scores.items()}} for i in range(n)]


def _methods(scores: dict) -> dict:
    return {m: {**{k: sum(v) / len(v) for k in R.METRICS}, "n": len(v)} for m, v in scores.items()}


SCORES = {
    "base_closed_book": [0.0] * 40,
    "rag_bm25": [1.0] * 30 + [0.0] * 10,
    "sft": [1.0] * 20 + [0.0] * 20,
    "prompt_distillation": [1.0] * 32 + [0.0] * 8,
    "pd_rag": [1.0] * 36 + [0.0] * 4,
}


def test_every_accuracy_gets_its_bootstrap_interval():
    methods, _ = R.with_intervals(_methods(SCORES), _rows(SCORES))
    boot = S.Bootstrap(40)
    for name, values in SCORES.items():
        assert methods[name]["contains"] == sum(values) / 40  # the mean stays where it was
        assert methods[name]["contains_ci"] == boot.interval(values)
        assert methods[name]["f1_ci"] == methods[name]["exact_match_ci"] == methods[name]["contains_ci"]
    assert methods["base_closed_book"]["contains_ci"] == [0.0, 0.0]


def test_paired_comparisons_cover_every_pair_with_the_papers_orientation():
    _, comparisons = R.with_intervals(_methods(SCORES), _rows(SCORES))
    assert list(comparisons)[:3] == ["prompt_distillation-sft", "prompt_distillation-rag_bm25", "pd_rag-rag_bm25"]
    assert len(comparisons) == 10  # 5 methods: every pair once
    pd_sft = comparisons["prompt_distillation-sft"]
    diff = [a - b for a, b in zip(SCORES["prompt_distillation"], SCORES["sft"])]
    assert pd_sft["contains"] == pytest.approx(0.3)
    assert pd_sft["contains_ci"] == pytest.approx(S.Bootstrap(40).interval(diff), abs=1e-12)
    assert comparisons["pd_rag-rag_bm25"]["contains_ci"][0] > 0  # right on 6 more, wrong on none more
    assert R.comparison_pairs(["a", "b", "c"]) == [("b", "a"), ("c", "a"), ("c", "b")]


def test_judge_verdicts_count_only_true_as_correct():
    rows = [{"scores": {"m": {"judge": v}}} for v in (True, False, None, True)]
    assert R.per_question_values(rows, "m", "judge") == [1.0, 0.0, 0.0, 1.0]
    with pytest.raises(InputError, match=r"per_question\[0\] has no f1 score for m"):
        R.per_question_values(rows, "m", "f1")


def test_report_files_carry_intervals_and_comparisons(tmp_path):
    paths = R.write_report(tmp_path, _methods(SCORES), _rows(SCORES), extra={"model": "m"})
    report = json.loads(paths["json"].read_text())
    assert report["methods"]["sft"]["contains"] == 0.5 and len(report["methods"]["sft"]["contains_ci"]) == 2
    assert set(report["comparisons"]["pd_rag-rag_bm25"]) == {f"{m}{s}" for m in R.METRICS for s in ("", "_ci")}
    md = paths["md"].read_text()
    low, high = report["methods"]["sft"]["contains_ci"]
    assert f"| sft | 50.0 [{100 * low:.1f}, {100 * high:.1f}] |" in md
    assert "| prompt_distillation-sft | +30.0 [" in md and "Paired differences" in md
    assert "Settings: model = m." in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(InputError, match="must not override"):
        R.write_report(tmp_path, _methods(SCORES), _rows(SCORES), extra={"comparisons": {}})


def test_several_seeds_widen_the_interval_and_are_listed():
    seeds = [[1.0] * 32 + [0.0] * 8, [1.0] * 20 + [0.0] * 20, [1.0] * 26 + [0.0] * 14]
    rows = _rows({"sft": SCORES["sft"]})
    for i, row in enumerate(rows):
        row["seed_scores"] = {"prompt_distillation": [{k: s[i] for k in R.METRICS} for s in seeds]}
        row["scores"]["prompt_distillation"] = {k: sum(s[i] for s in seeds) / 3 for k in R.METRICS}
    methods = {"sft": _methods({"sft": SCORES["sft"]})["sft"],
               "prompt_distillation": {"contains": 78 / 120, "exact_match": 78 / 120, "f1": 78 / 120, "n": 40,
                                       "seeds": 3}}
    enriched, comparisons = R.with_intervals(methods, rows)
    low, high = enriched["prompt_distillation"]["contains_ci"]
    q_only = S.Bootstrap(40).interval([sum(s[i] for s in seeds) / 3 for i in range(40)])
    assert high - low > q_only[1] - q_only[0]  # training noise widens it
    assert comparisons["prompt_distillation-sft"]["contains"] == pytest.approx(78 / 120 - 0.5)
    assert "| prompt_distillation (3 seeds) |" in R.markdown_table(enriched)


def test_per_document_breakdown():
    rows = _rows({"sft": [1.0, 0.0, 1.0], "prompt_distillation": [1.0, 1.0, 0.0]})
    for row, doc in zip(rows, ("a", "a", "b")):
        row["doc_id"] = doc
    table = R.per_document_markdown(_methods({"sft": [1.0, 0.0, 1.0], "prompt_distillation": [1.0, 1.0, 0.0]}), rows)
    assert "| document | questions | sft | prompt_distillation |" in table
    assert "| a | 2 | 50.0 | 100.0 |" in table and "| b | 1 | 100.0 | 0.0 |" in table
