"""Tiny models, tokenizers and texts shared by the tests (import as `from helpers import ...`).

pytest puts tests/ on sys.path (conftest.py lives there and tests/ is not a package), so
every test module can import this one. Each factory seeds torch itself and builds its
config from explicit values, so a test keeps its numbers whichever module it moves to.
No test module imports another test module: what two of them share lives here.
"""
from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# ------------------------------------------------------------------ chat templates

# "user: ... <eos> assistant: ": roles as plain words, so a word-level vocabulary covers them.
WORD_CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# "<|user|>...<|end|><|assistant|>": roles as special tokens, the way real chat models write them.
TAGGED_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|system|>", "<|assistant|>", "<|end|>"]

# ------------------------------------------------------------------ texts

# Question generation / answering / evaluation: a closed vocabulary with the roles of WORD_CHAT.
QA_WORDS = (
    "<pad> <eos> <unk> user: assistant: system: \n ? . , 1. 2. - who where what is lives in "
    "the a cat sat on mat Ada Oslo Bo Rome works as baker"
).split(" ")
QA_DOCS = [
    {"id": "d1", "text": "Ada lives in Oslo . Ada works as baker ."},
    {"id": "d2", "text": "Bo lives in Rome ."},
]

# Prefill and the cache: two documents, five question/answer pairs over them.
SENTENCES = [
    "Ada lives in Oslo and works at the old harbour .",
    "Bob lives in Paris ; he paints bridges at night .",
    "The cat sat on a mat near the window in the morning .",
    "Where does Ada live ? Who paints bridges ? What did the cat do ?",
]
DOCUMENTS = [{"id": "ada", "text": SENTENCES[0] + " " + SENTENCES[2]},
             {"id": "bob", "text": SENTENCES[1]}]
QA = [
    {"doc_id": "ada", "question": "Where does Ada live ?", "answer": "Ada lives in Oslo ."},
    {"doc_id": "bob", "question": "Who paints bridges ?", "answer": "Bob ."},
    {"doc_id": "ada", "question": "What did the cat do ?", "answer": "The cat sat on a mat ."},
    {"doc_id": "ada", "question": "Where does Ada work ?", "answer": "at the old harbour"},
    {"doc_id": "bob", "question": "When does Bob paint ?", "answer": "at night ."},
]

# ------------------------------------------------------------------ tokenizers


def word_tokenizer(words, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer, id = position in `words`; needs <pad>, <eos>, <unk>."""
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def bpe_tokenizer(sentences=SENTENCES, specials=SPECIALS, chat_template: str | None = TAGGED_CHAT,
                  vocab_size: int = 200, repeats: int = 3, eos_token: str = "<|end|>") -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `sentences` (each seen `repeats` times): subword ids, as real models have."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(sentences) * repeats, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos_token, unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def qa_tokenizer(chat_template: str | None = WORD_CHAT) -> PreTrainedTokenizerFast:
    """The question/answer tests' tokenizer: QA_WORDS with WORD_CHAT."""
    return word_tokenizer(QA_WORDS, chat_template)


def sentence_word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over SENTENCES (plus the plain template's "User:"/"Assistant:"), no chat template."""
    words = sorted({w for s in SENTENCES for w in s.split()} | {"User:", "Assistant:"})
    return word_tokenizer(SPECIALS[:3] + words)


# ------------------------------------------------------------------ models

# The smallest shapes that still have grouped-query attention (4 heads over 2 KV heads).
TINY_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "gemma": "Gemma", "phi3": "Phi3"}


def _family_defaults(family: str, config: dict) -> dict:
    """What a family needs at tiny size: Gemma's head_dim defaults to 256, Phi-3's token ids to 32000."""
    if family == "gemma":
        return {"head_dim": config["hidden_size"] // config["num_attention_heads"]}
    if family == "phi3":
        return {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    return {}


def tiny_model(family: str = "llama", vocab_size: int = 64, seed: int = 0, **overrides):
    """A random causal LM of `family` (llama, qwen2, gemma, phi3) in eval mode; overrides go to its config."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    config = {**TINY_CONFIG, "vocab_size": vocab_size, **overrides}
    config = {**_family_defaults(family, config), **config}
    prefix = FAMILIES[family]
    torch.manual_seed(seed)
    model_config = getattr(transformers, f"{prefix}Config")(**config)
    return getattr(transformers, f"{prefix}ForCausalLM")(model_config).eval()


def qa_model(seed: int = 0):
    """The question/answer tests' Llama over QA_WORDS (hidden 16, eos = <eos>, no BOS)."""
    return tiny_model("llama", vocab_size=len(QA_WORDS), seed=seed, hidden_size=16, intermediate_size=32,
                      num_attention_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)


def save_tiny(path, seed: int = 0):
    """qa_model + qa_tokenizer saved as a Hugging Face directory at `path` (returned)."""
    qa_model(seed).save_pretrained(path)
    qa_tokenizer().save_pretrained(path)
    return path


def tiny_model_and_tokenizer(family: str, seed: int = 0):
    """(model, tokenizer) for prefill tests: llama + word-level/plain template, qwen2 + BPE/TAGGED_CHAT."""
    if family not in ("llama", "qwen2"):
        raise ValueError(f"family must be 'llama' or 'qwen2', not {family!r}")
    tok = sentence_word_tokenizer() if family == "llama" else bpe_tokenizer()
    model = tiny_model(family, vocab_size=len(tok), seed=seed, num_hidden_layers=2, max_position_embeddings=512)
    return model, tok


# ------------------------------------------------------------------ command errors


def error_line(capsys) -> str:
    """The last stderr line of a command that failed: there is one, and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "an error message was expected"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


# ---------------------------------------------------------------- torchrun launches

def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (the rendezvous of a 2-process test job)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, timeout: int = 120, env: dict | None = None):
    """`python -m torch.distributed.run --nproc_per_node 2 ARGS...` from the repository root,
    as a user launches it (its output captured); a stuck collective fails within 60 s."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(repo), "PDENGINE_DIST_TIMEOUT": "60", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master-port", str(free_port()), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, cwd=repo)


def job_inputs(root, documents, eval_questions):
    """`root` with what a multi-stage job reads: model/ (save_tiny), docs.jsonl, eval.jsonl."""
    import json

    save_tiny(root / "model")
    for name, rows in (("docs.jsonl", documents), ("eval.jsonl", eval_questions)):
        (root / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def end_rank() -> None:
    """The end of a test's spawned rank, as `python -m pdengine` ends under torchrun: leave the
    group together, then exit without interpreter finalization (where torch's gloo teardown
    aborts a process now and then on a loaded machine)."""
    import os
    import sys

    from pdengine import distributed

    distributed.shutdown(finished=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
