"""`pdengine demo`: the embedded demo that shows knowledge injection working on a laptop.

A generated world of fictional people (pdengine.demo.world), a tiny Llama model with its
own word-level tokenizer and chat template, pretrained locally to read documents and
write questions (pdengine.demo.pretrain; a checkpoint ships in pdengine/demo/assets),
then the real pipeline on people it has never seen (pdengine.demo.pipeline).
"""
from __future__ import annotations


def add_arguments(parser) -> None:
    """Options of `pdengine demo`."""
    from pdengine.quantize import QUANTIZE_CHOICES

    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of sampling and evaluation, and the first training seed")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds of PD and SFT, reported as mean and 95 %% interval "
                             "(default 3; 1 for a quick run; --fast: 1)")
    parser.add_argument("--fast", action="store_true",
                        help="a few documents and steps: checks the stages run, not that injection works")
    parser.add_argument("--pretrain", action="store_true",
                        help="pretrain the tiny model from scratch with the shipped recipe instead of "
                             "copying the shipped checkpoint (about 15-25 minutes on 2 cores)")
    parser.add_argument("--pretrain-seed", type=int, default=1,
                        help="seed of --pretrain (1 reproduces the shipped checkpoint)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of PD and SFT (default 300)")
    parser.add_argument("--documents", type=int, default=None, help="new documents, 1..30 (default 30)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, of this process and of each training worker (default 1: the "
                             "tiny model gains little from a second thread, and on a busy machine two threads "
                             "spin-wait for each other, 10x slower; more than 1 spawns the workers, a few "
                             "seconds of imports each)")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes: the PD and SFT runs train this many at a time, each with "
                             "--threads threads (default: 2, or 1 on a 1-core machine; 1: one after the other "
                             "in this process)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="the frozen base of teacher and students, quantized by bitsandbytes "
                             "(nf4, int8; default none: fp32)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (the one-line-per-stage log stays)")


def run(args) -> int:
    """Run the demo; prints the table and writes OUT/report.json. Returns 0 on success."""
    import os

    from pdengine.demo.pipeline import DemoConfig, run_demo
    from pdengine.errors import InputError

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # N copies would write one OUT at once
        raise InputError("the demo runs in one process (its trainings run side by side in --workers); "
                         "launch it without torchrun")
    overrides = {"seed": args.seed, "progress": not args.no_progress, "quantize": args.quantize}
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.documents is not None:
        overrides["n_documents"] = args.documents
    cfg = DemoConfig.fast(**overrides) if args.fast else DemoConfig(**overrides)
    # a failed reading gate is a GateFailed (a CommandError): the CLI prints it and exits 1
    run_demo(args.out, cfg, pretrain=args.pretrain, pretrain_seed=args.pretrain_seed)
    print(f"report: {args.out}/report.json")
    return 0
