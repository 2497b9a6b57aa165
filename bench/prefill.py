"""Teacher prefill: shared-prefix packed rows vs one forward per QA pair, same run.

Workload (issue 5): one document of 512 tokens, 30 QA pairs whose question + answer take
48 tokens (16 + 32, end of turn included), a random-initialised small Llama (d=256,
4 layers, V=32000). Both modes run `pdengine.prefill` end to end (prompts, teacher
forward, top-k, cache writes); `share_prefix=False` gives every QA pair its own forward.

Also measured: bytes per cached answer token at k=64, and the error the cache's top-k
encoding introduces (log-prob error, KL between the exact and the decoded renormalised
top-k distribution, tail-mass error) on synthetic teacher distributions of growing
peakedness (a random-initialised model's distributions are nearly flat, so not telling).

`--long` (issue 13): one document of 1k, 4k, 8k and 16k tokens with the same 30 QA pairs, old
path (`teacher_attention="mask"`: block-mask rows; a document longer than a row is split into
groups that each re-encode it) against the new one (`"prefix_kv"`: the prefix encoded once, its
KV cache shared by the suffixes), peak memory and time of one prefill each, in one run. The mask
path is skipped above `--mask-limit` tokens (at 8k it already takes minutes on 2 cores).

Usage: python bench/prefill.py [--reps 3] [--qa 30] [--doc-tokens 512] [--long [--mask-limit 4096]]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import add_save_flag, environment, peak_memory, print_table, save_results, time_round_robin
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import pdengine
from pdengine import cache as cache_format
from pdengine.prefill import build_examples, count_tokens, prefill

VOCAB = 32000
QUESTION_TOKENS, ANSWER_TOKENS = 16, 31  # + end of turn = 48 tokens per QA pair


def word_tokenizer(vocab_size: int):
    words = ["<pad>", "<eos>", "<unk>", "User:", "Assistant:"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def workload(doc_tokens: int, n_qa: int, seed: int = 0):
    """One document and n_qa QA pairs of random words (ids >= 5 are plain words)."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, VOCAB - 5, (n,), generator=g).tolist())

    documents = [{"id": "doc", "text": words(doc_tokens)}]
    qa = [{"doc_id": "doc", "question": words(QUESTION_TOKENS),
           "answer_ids": torch.randint(5, VOCAB, (ANSWER_TOKENS,), generator=g).tolist()} for _ in range(n_qa)]
    return documents, qa


def small_llama(max_positions: int = 2048):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()


def bench_modes(model, tok, documents, qa, reps: int) -> list[dict]:
    """Both modes, their repetitions interleaved so that both see the same machine load."""
    examples = build_examples(tok, documents, qa)
    modes = {"shared_prefix": True, "per_qa_forward": False}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {mode: _prefill_run(model, tok, documents, qa, Path(tmp) / mode, share)
                for mode, share in modes.items()}
        times = time_round_robin(runs, warmup=1, reps=reps)
        counts = {mode: runs[mode]().manifest["counts"] for mode in modes}
    rows = []
    for mode, share in modes.items():
        t = times[mode]
        rows.append({"mode": mode, "qa_pairs": len(qa), "tokens_processed": count_tokens(examples, 4096, share),
                     "median_ms": t["median_ms"], "min_ms": t["min_ms"], "max_ms": t["max_ms"], "reps": reps,
                     "qa_per_s": len(qa) / (t["median_ms"] / 1e3),
                     "cache_bytes_per_answer_token": counts[mode]["bytes_per_answer_token"],
                     "answer_tokens": counts[mode]["answer_tokens"]})
    shared, unshared = rows
    for row in rows:
        row["token_ratio_vs_per_qa"] = unshared["tokens_processed"] / row["tokens_processed"]
        row["speedup_vs_per_qa"] = unshared["median_ms"] / row["median_ms"]
    return rows


def _prefill_run(model, tok, documents, qa, out, share_prefix):
    def run():
        return prefill(model, tok, documents, qa, out, k=64, temperature=2.0, batch_tokens=4096, resume=False,
                       progress=False, share_prefix=share_prefix)

    return run


def long_document_run(path: str, doc_tokens: int, n_qa: int) -> dict:
    """One prefill of one long document (run in a fresh process: RSS peaks of earlier runs would
    hide later ones, since freed memory stays with the allocator)."""
    tok, model = word_tokenizer(VOCAB), small_llama(max_positions=doc_tokens + 4096)
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    documents, qa = workload(doc_tokens, n_qa)
    timing = {}
    with tempfile.TemporaryDirectory() as tmp:
        def run():
            start = time.perf_counter()
            prefill(model, tok, documents, qa, Path(tmp) / "cache", k=64, batch_tokens=4096, resume=False,
                    progress=False, teacher_attention=path)
            timing["s"] = time.perf_counter() - start

        added = peak_memory(run)
    return {"path": path, "doc_tokens": doc_tokens, "qa_pairs": n_qa, "seconds": timing["s"],
            "peak_added_mib": added / 2**20}


def bench_long_documents(lengths, n_qa: int, mask_limit: int) -> list[dict]:
    """Old (mask) vs new (prefix_kv) path on documents of growing length, one process each."""
    rows = []
    for n in lengths:
        for path in ("mask", "prefix_kv"):
            if path == "mask" and n > mask_limit:
                continue
            cmd = [sys.executable, __file__, "--long-worker", f"{path}:{n}", "--qa", str(n_qa)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    new = {r["doc_tokens"]: r for r in rows if r["path"] == "prefix_kv"}
    for r in rows:
        r["memory_vs_prefix_kv_4k"] = r["peak_added_mib"] / new[4096]["peak_added_mib"] if 4096 in new else None
    return rows


def bench_encoding_error(k: int = 64, vocab: int = VOCAB, tokens: int = 512) -> list[dict]:
    """Error of the cache's log-prob encoding on synthetic teacher distributions at T=2."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for logit_std in (1.0, 4.0, 8.0, 16.0):
        logits = torch.randn(tokens, vocab, generator=g, dtype=torch.float64) * logit_std
        exact = torch.log_softmax(logits / 2.0, -1).topk(k).values
        decoded = cache_format.decode_logprobs(*cache_format.encode_logprobs(exact)).double()
        p, q = exact.softmax(-1), decoded.softmax(-1)
        kl = (p * (p.log() - q.log())).sum(-1)
        tail_err = (exact.exp().sum(-1) - decoded.exp().sum(-1)).abs()
        rows.append({"logit_std": logit_std, "top1_prob": exact[:, 0].exp().mean().item(),
                     "topk_mass": exact.exp().sum(-1).mean().item(),
                     "max_abs_logprob_err": (decoded - exact).abs().max().item(),
                     "kl_renorm_mean": kl.mean().item(), "kl_renorm_max": kl.max().item(),
                     "tail_mass_abs_err_max": tail_err.max().item()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--qa", type=int, default=30)
    parser.add_argument("--doc-tokens", type=int, default=512)
    parser.add_argument("--long", action="store_true", help="long documents: mask vs prefix-KV paths (issue 13)")
    parser.add_argument("--long-lengths", default="1024,4096,8192,16384")
    parser.add_argument("--mask-limit", type=int, default=4096, help="longest document the mask path runs")
    parser.add_argument("--long-worker", help=argparse.SUPPRESS)  # PATH:TOKENS, one measurement
    add_save_flag(parser)
    args = parser.parse_args()
    if args.long_worker:
        path, n = args.long_worker.split(":")
        print(json.dumps(long_document_run(path, int(n), args.qa)))
        return
    print(environment(), pdengine.backend_info())
    if args.long:
        lengths = [int(x) for x in args.long_lengths.split(",")]
        rows = bench_long_documents(lengths, args.qa, args.mask_limit)
        print_table(rows, ["path", "doc_tokens", "seconds", "peak_added_mib", "memory_vs_prefix_kv_4k"])
        print("saved", save_results("prefill_long", rows, args.save))
        return
    tok, model = word_tokenizer(VOCAB), small_llama()
    if torch.cuda.is_available():
        model = model.to("cuda", torch.bfloat16)
    documents, qa = workload(args.doc_tokens, args.qa)
    start = time.perf_counter()
    rows = bench_modes(model, tok, documents, qa, args.reps)
    print_table(rows, ["mode", "tokens_processed", "median_ms", "min_ms", "max_ms", "qa_per_s",
                       "token_ratio_vs_per_qa", "speedup_vs_per_qa", "cache_bytes_per_answer_token"])
    enc = bench_encoding_error()
    print_table(enc, ["logit_std", "top1_prob", "topk_mass", "max_abs_logprob_err", "kl_renorm_mean",
                      "kl_renorm_max", "tail_mass_abs_err_max"])
    save_results("prefill", rows, args.save)
    print("saved", save_results("prefill_encoding", enc, args.save))
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
