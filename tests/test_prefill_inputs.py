"""Prefill's settings and inputs: one place per default (PrefillConfig), the documents index
shared with the other stages, bad values as InputErrors, resume that compares what identifies
the model (not its path), and one writer per cache directory."""
import argparse
import inspect
import json

import pytest
from helpers import DOCUMENTS, QA, tiny_model_and_tokenizer

from pdengine import cli
from pdengine.config import field_names
from pdengine.errors import InputError
from pdengine.locking import LOCK_NAME, DirectoryLock
from pdengine.prefill import PrefillConfig, add_arguments, prefill
from pdengine.prompts import PromptFormat


@pytest.fixture(scope="module")
def teacher():
    return tiny_model_and_tokenizer("llama")


def test_prefill_keyword_defaults_and_flags_come_from_the_config():
    defaults = PrefillConfig()
    signature = inspect.signature(prefill).parameters
    for name in field_names(PrefillConfig):
        if name != "system":  # prefill() takes the whole PromptFormat
            assert signature[name].default == getattr(defaults, name), name
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--documents", "d", "--qa", "q", "--out", "o"])
    assert all(getattr(args, n) == getattr(defaults, n) for n in field_names(PrefillConfig))
    assert parser.parse_args(["--model", "m", "--documents", "d", "--qa", "q", "--out", "o",
                              "--no-progress"]).progress is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(k=True), "k must be a positive integer"),
    (dict(shard_size=2.5), "shard_size must be a positive integer"),
])
def test_non_finite_or_mistyped_settings_are_input_errors(teacher, tmp_path, kwargs, message):
    model, tok = teacher
    with pytest.raises(InputError, match=message):
        prefill(model, tok, DOCUMENTS, QA, tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "manifest.json").exists()


def test_cli_temperature_inf_exits_2_with_one_line(teacher, tmp_path, capsys):
    args = ["prefill", "--model", str(tmp_path / "m"), "--documents", "d", "--qa", "q", "--out", str(tmp_path / "c"),
            "--temperature", "inf"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pdengine prefill: error: temperature must be a finite number, got inf"]


@pytest.mark.parametrize("answer_ids", [[True], [1, False], [1.0], "12", [-1]])
def test_answer_ids_must_be_real_integers(teacher, tmp_path, answer_ids):
    model, tok = teacher
    qa = [{"doc_id": "ada", "question": "Where does Ada live ?", "answer_ids": answer_ids}]
    with pytest.raises(InputError, match=r"qa_pairs\[0\]\['answer_ids'\] must be a list of non-negative integers"):
        prefill(model, tok, DOCUMENTS, qa, tmp_path, k=4, progress=False)


def test_empty_document_text_is_refused(teacher, tmp_path):
    model, tok = teacher
    docs = [DOCUMENTS[0], {"id": "bob", "text": "  \n"}]
    with pytest.raises(InputError, match="'bob'.*text is empty"):
        prefill(model, tok, docs, QA, tmp_path, k=4, progress=False)


def test_integer_document_ids_match_as_in_every_stage(teacher, tmp_path):
    model, tok = teacher
    docs = [{"id": 1, "text": DOCUMENTS[0]["text"]}, {"id": 2, "text": DOCUMENTS[1]["text"]}]
    qa = [{**q, "doc_id": {"ada": "1", "bob": 2}[q["doc_id"]]} for q in QA]  # "1" and 2 both match
    cache = prefill(model, tok, docs, qa, tmp_path / "int", k=4, progress=False)
    named = prefill(model, tok, DOCUMENTS, QA, tmp_path / "named", k=4, progress=False)
    assert [cache[i]["teacher_input_ids"] for i in range(len(QA))] == \
           [named[i]["teacher_input_ids"] for i in range(len(QA))]


def test_resume_ignores_the_spelling_of_the_model_path(teacher, tmp_path):
    model, tok = teacher
    model.config._name_or_path = "data/model"
    prefill(model, tok, DOCUMENTS, QA, tmp_path, k=4, shard_size=2, progress=False)
    model.config._name_or_path = "/somewhere/else/data/model"
    tok.name_or_path = "/somewhere/else/data/model"
    assert len(prefill(model, tok, DOCUMENTS, QA, tmp_path, k=4, shard_size=2, progress=False)) == len(QA)


def test_resume_with_another_model_names_the_real_difference(teacher, tmp_path):
    model, tok = teacher
    prefill(model, tok, DOCUMENTS, QA, tmp_path, k=4, progress=False)
    other, _ = tiny_model_and_tokenizer("llama", seed=1)  # same config, other weights
    with pytest.raises(InputError, match="different settings") as info:
        prefill(other, tok, DOCUMENTS, QA, tmp_path, k=4, progress=False)
    message = str(info.value)
    assert "model: weights: cache hash" in message and "config." not in message and "tokenizer" not in message
    with pytest.raises(InputError, match=r"k: cache 4, now 3; temperature: cache 2.0, now 1.5"):
        prefill(model, tok, DOCUMENTS, QA, tmp_path, k=3, temperature=1.5, progress=False)
    with pytest.raises(InputError, match="prompt format: cache"):
        prefill(model, tok, DOCUMENTS, QA, tmp_path, k=4, fmt=PromptFormat(system="Be brief ."), progress=False)


def test_resume_in_another_dtype_continues_the_cache(teacher, tmp_path):
    model, tok = teacher
    prefill(model, tok, DOCUMENTS, QA[:2], tmp_path, k=4, shard_size=1, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "float32"
    # what a GPU run would record for the same checkpoint loaded in bf16; the identity is the same
    assert _differences_with_dtype(manifest, "bfloat16") == []


def _differences_with_dtype(manifest, dtype):
    from pdengine.prefill import _resume_differences

    other = json.loads(json.dumps(manifest))
    other["model"]["dtype"] = dtype
    return _resume_differences(manifest, other)


def test_a_locked_cache_directory_is_refused(teacher, tmp_path):
    model, tok = teacher
    with DirectoryLock(tmp_path / "cache", "another prefill"):
        with pytest.raises(InputError, match="in use by another pdengine process"):
            prefill(model, tok, DOCUMENTS, QA, tmp_path / "cache", k=4, progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()


def test_overwriting_keeps_the_lock_file_and_refuses_foreign_files(teacher, tmp_path):
    model, tok = teacher
    prefill(model, tok, DOCUMENTS, QA, tmp_path, k=4, progress=False)
    lock_inode = (tmp_path / LOCK_NAME).stat().st_ino
    cache = prefill(model, tok, DOCUMENTS, QA[:2], tmp_path, k=2, progress=False, resume=False)
    assert len(cache) == 2 and (tmp_path / LOCK_NAME).stat().st_ino == lock_inode
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not part of a teacher cache"):
        prefill(model, tok, DOCUMENTS, QA, tmp_path, k=4, progress=False, resume=False)
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "manifest.json").exists()
