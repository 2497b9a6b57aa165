"""Long documents split into chunks that fit the model (`pdengine chunk`, the `chunk`
stage of `pdengine run`; issue 13's `--chunk-tokens`).

A document of more than `chunk_tokens` tokens (counted with the model's tokenizer, no
special tokens) becomes the documents `ID#0, ID#1, ...`, each with `source_id: ID` and
`source_start` (the character offset of its text in the original). Shorter documents pass
unchanged. Cuts fall at paragraph breaks, else sentence ends, else between words; only a
single word longer than a chunk is cut between tokens. Consecutive chunks share up to
`overlap_tokens` tokens of whole sentences (or words), so a fact on a boundary is whole in
one of them.

Every chunk's text is the exact slice `text[source_start : source_start + len(chunk)]`
and the chunks tile the document (each starts at or before the end of the one before),
so `reassemble` gives back the original text byte for byte; `pdengine.documents` uses it
to resolve a question about `ID` to its chunks (docs/DESIGN.md, "Evaluation").
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from pdengine.config import NON_NEGATIVE, POSITIVE, check_settings, setting
from pdengine.documents import index_documents
from pdengine.errors import InputError

CHUNK_SEPARATOR = "#"  # ID#0, ID#1, ...
# Cut points from coarse to fine; a cut sits after the separator, so the whitespace
# between two pieces stays with the piece before it and the pieces tile the text.
_BOUNDARIES = (re.compile(r"\n[ \t]*\n\s*"),  # paragraph breaks
               re.compile(r"(?<=[.!?;:。！？])[\"')\]]*\s+"),  # sentence ends
               re.compile(r"\s+"))  # between words
# Paragraphs and sentences are always separate pieces (the overlap is then whole
# sentences); words only in a sentence too long for one chunk.
_SENTENCES = 2


@dataclass(frozen=True)
class ChunkConfig:
    """Settings of `pdengine chunk` and of `pdengine run`'s `chunk:` section."""

    chunk_tokens: int = setting(1024, "longest chunk in tokens; longer documents are split", check=POSITIVE)
    overlap_tokens: int = setting(64, "tokens (whole sentences or words) shared by consecutive chunks",
                                  check=NON_NEGATIVE)

    def __post_init__(self):
        for name in ("chunk_tokens", "overlap_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{name} must be an integer, got {value!r}")
        check_settings(self)
        if self.overlap_tokens >= self.chunk_tokens:
            raise InputError(f"overlap_tokens ({self.overlap_tokens}) must be smaller than chunk_tokens "
                             f"({self.chunk_tokens})")


def token_counter(tokenizer):
    """`count(text)`: the number of tokens of `text` alone (no special tokens)."""
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count


# ---------------------------------------------------------------- pieces


def _pieces(text: str, start: int, end: int, level: int, limit: int, count, tokenizer) -> list[tuple]:
    """`(start, end, tokens)` spans tiling text[start:end]: its sentences, each cut at the
    coarsest finer boundary that makes it fit `limit` tokens."""
    n = count(text[start:end])
    if n <= limit and level >= _SENTENCES:
        return [(start, end, n)]
    if level == len(_BOUNDARIES):
        return _token_pieces(text, start, end, limit, count, tokenizer)
    cuts = [m.end() for m in _BOUNDARIES[level].finditer(text, start, end)]  # absolute offsets
    cuts = [start, *(c for c in cuts if start < c < end), end]
    spans = []
    for a, b in zip(cuts, cuts[1:]):
        spans += _pieces(text, a, b, level + 1, limit, count, tokenizer)
    return spans


def _token_pieces(text: str, start: int, end: int, limit: int, count, tokenizer) -> list[tuple]:
    """A word longer than `limit` tokens, cut between tokens (offsets of a fast tokenizer;
    else the longest prefix of characters that fits)."""
    piece = text[start:end]
    try:
        offsets = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        token_starts = sorted({s for s, _ in offsets if 0 < s < len(piece)})
    except (NotImplementedError, KeyError, TypeError):  # slow tokenizers have no offsets
        token_starts = list(range(1, len(piece)))
    spans, a = [], 0
    while a < len(piece):
        candidates = [s for s in token_starts if s > a] + [len(piece)]
        lo, hi = 0, len(candidates) - 1  # the last candidate cut whose piece still fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(piece[a:candidates[mid]]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        b = candidates[lo]
        spans.append((start + a, start + b, count(piece[a:b])))
        a = b
    return spans


# ---------------------------------------------------------------- packing


def _pack(text: str, spans: list[tuple], limit: int, overlap: int, count) -> list[tuple[int, int]]:
    """`(first, stop)` span ranges, greedily filled up to `limit` tokens; each range
    starts with up to `overlap` tokens of the previous one's last spans."""
    ranges, first, previous_stop = [], 0, 0
    while True:
        stop = _fill(text, spans, first, limit, count)
        if stop <= previous_stop:  # the overlap left no room for anything new
            first = previous_stop
            stop = _fill(text, spans, first, limit, count)
        ranges.append((first, stop))
        if stop == len(spans):
            return ranges
        previous_stop, first, shared = stop, stop, 0
        while first - 1 > ranges[-1][0] and shared + spans[first - 1][2] <= overlap:
            first -= 1
            shared += spans[first][2]


def _fill(text: str, spans: list[tuple], first: int, limit: int, count) -> int:
    """The end of the longest run of spans from `first` whose joined text fits `limit`
    (by the spans' own counts, then checked on the joined text: tokens can merge or
    split across a boundary)."""
    stop, total = first, 0
    while stop < len(spans) and total + spans[stop][2] <= limit:
        total += spans[stop][2]
        stop += 1
    stop = max(stop, first + 1)
    while stop > first + 1 and count(text[spans[first][0]:spans[stop - 1][1]]) > limit:
        stop -= 1
    return stop


# ---------------------------------------------------------------- documents


def chunk_id(source_id: str, index: int) -> str:
    return f"{source_id}{CHUNK_SEPARATOR}{index}"


def split_document(doc: dict, count, tokenizer, settings: ChunkConfig) -> list[dict]:
    """`[doc]` when it fits `chunk_tokens`, else its chunks (see the module docstring)."""
    text = doc["text"]
    if count(text) <= settings.chunk_tokens:
        return [doc]
    spans = _pieces(text, 0, len(text), 0, settings.chunk_tokens, count, tokenizer)
    # A chunk cut again (a chunked file chunked smaller) keeps pointing at the original.
    source_id, offset = str(doc.get("source_id", doc["id"])), int(doc.get("source_start", 0))
    extra = {k: v for k, v in doc.items() if k not in ("id", "text", "source_id", "source_start")}
    chunks = []
    for i, (first, stop) in enumerate(_pack(text, spans, settings.chunk_tokens, settings.overlap_tokens, count)):
        start, end = spans[first][0], spans[stop - 1][1]
        chunks.append({**extra, "id": chunk_id(str(doc["id"]), i), "text": text[start:end], "source_id": source_id,
                       "source_start": offset + start})
    return chunks


def chunk_documents(documents, tokenizer, settings: ChunkConfig | None = None) -> list[dict]:
    """Every document, the long ones replaced by their chunks, in input order. An id that
    already looks like a chunk of another document (`ID#0` next to `ID`) is an InputError."""
    settings = settings or ChunkConfig()
    index = index_documents(documents)
    count = token_counter(tokenizer)
    out = []
    for doc in index.values():
        out += split_document(doc, count, tokenizer, settings)
    ids = [str(d["id"]) for d in out]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise InputError(f"chunk id {duplicate!r} is also the id of another document; rename that document")
    return out


def reassemble(chunks: list[dict]) -> str:
    """The original text of one document from its chunks (in any order)."""
    text = ""
    for chunk in sorted(chunks, key=lambda c: c["source_start"]):
        start = int(chunk["source_start"])
        if start > len(text):
            raise InputError(f"chunk {chunk.get('id')!r} starts at {start}, after the end of the chunks before it "
                             f"({len(text)}): a chunk of this document is missing")
        text = text[:start] + chunk["text"]
    return text


# ---------------------------------------------------------------- CLI: pdengine chunk


def add_arguments(parser) -> None:
    from pdengine.config import add_arguments as add_settings

    parser.add_argument("--documents", required=True, help="documents JSONL: {id, text}")
    parser.add_argument("--out", required=True, help="documents JSONL to write (long ones as ID#0, ID#1, ...)")
    parser.add_argument("--model", required=True, help="local model directory whose tokenizer counts the tokens")
    add_settings(parser, ChunkConfig)


def run(args) -> int:
    """`pdengine chunk`: documents JSONL -> documents JSONL with the long ones split."""
    from pdengine import distributed
    from pdengine.config import from_args
    from pdengine.io import read_jsonl, write_jsonl
    from pdengine.loading import load_tokenizer_and_config

    settings = from_args(ChunkConfig, args)
    documents = read_jsonl(args.documents, required=("id", "text"))
    tokenizer, _ = load_tokenizer_and_config(args.model)
    out = chunk_documents(documents, tokenizer, settings)

    def write():
        write_jsonl(args.out, out)
        split = len({d["source_id"] for d in out if "source_id" in d})
        print(f"wrote {len(out)} documents to {args.out} ({split} of {len(documents)} split into "
              f"{sum('source_id' in d for d in out)} chunks of <= {settings.chunk_tokens} tokens)", file=sys.stderr)

    distributed.on_main(distributed.context(), write)  # under torchrun: rank 0 writes, all return after
    return 0
