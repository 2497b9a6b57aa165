"""pdengine.metrics: SQuAD normalisation, exact match, token F1, contains, several references."""
import pytest

from pdengine import metrics as M
from pdengine.errors import InputError


# ---------------------------------------------------------------- metrics (SQuAD cases)


@pytest.mark.parametrize("text, normalized", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an   apple, a pear! ", "apple pear"),
    ("Theater (1990).", "theater 1990"),
    ("U.S.A.", "usa"),
    ("A", ""),
])
def test_normalize_answer(text, normalized):
    assert M.normalize_answer(text) == normalized


def test_exact_match_ignores_case_articles_punctuation_whitespace():
    assert M.exact_match("the  Oslo.", "Oslo") == 1.0
    assert M.exact_match("Oslo, Norway", "Oslo") == 0.0


def test_f1_partial_overlap():
    # pred tokens {in, oslo, norway}, ref {oslo}: precision 1/3, recall 1 -> F1 0.5
    assert M.f1("in Oslo, Norway", "Oslo") == pytest.approx(0.5)
    # pred {paris, france}, ref {paris, texas}: 1 common -> P = R = 1/2 -> 0.5
    assert M.f1("Paris France", "the Paris, Texas") == pytest.approx(0.5)
    assert M.f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert M.f1("", "") == 1.0 and M.f1("x", "") == 0.0 and M.f1("Rome", "Oslo") == 0.0


def test_contains_matches_whole_words_only():
    assert M.contains("She lives in Oslo, Norway.", "oslo") == 1.0
    assert M.contains("Osloville", "Oslo") == 0.0
    assert M.contains("The baker", "a baker") == 1.0


def test_score_means_and_multiple_references():
    result = M.score(["Oslo", "Paris", "in Rome"], ["Oslo", "Rome", ["Milan", "Rome"]])
    assert result["exact_match"] == pytest.approx(1 / 3)
    assert result["contains"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx((1 + 0 + 2 / 3) / 3)
    assert result["n"] == 3
    with pytest.raises(InputError, match="differ in length"):
        M.score(["a"], ["a", "b"])
    with pytest.raises(InputError, match="empty"):
        M.score([], [])


@pytest.mark.parametrize("reference", [3, [], [True], ["ok", None], {"a": 1}])
def test_a_reference_must_be_text(reference):
    with pytest.raises(InputError, match="a reference answer must be a string"):
        M.score_one("x", reference)
