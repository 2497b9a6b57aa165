"""The demo's word-level tokenizer, a `PreTrainedTokenizerFast` with a chat template.

Words, single punctuation marks and newlines are tokens; the vocabulary is closed (every
word the world can produce). The Jinja chat template gives the real pipeline the same
chat-template path (pdengine/prompts.py) that an instruction-tuned model takes.
"""
from __future__ import annotations

import re

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from pdengine.demo.world import all_texts

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
PAD, UNK, BOS, EOS = SPECIAL_TOKENS[:4]
_PIECE = r"\n|\w+|[^\w\s]"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _vocabulary() -> list[str]:
    words = set()
    for text in all_texts():
        words.update(re.findall(_PIECE, text))
    words.add("\n")
    return SPECIAL_TOKENS + sorted(words)


def build_tokenizer():
    """A fresh tokenizer over the world's closed vocabulary (deterministic)."""
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Keep word, punctuation and newline pieces; drop spaces (same idea as Whitespace).
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="removed", invert=True)
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, fixes " ."
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[4:],
        clean_up_tokenization_spaces=True,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
