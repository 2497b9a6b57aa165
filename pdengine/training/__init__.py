"""The student trainer, one concern per module (docs/DESIGN.md, "Training"):

    config.py       TrainConfig: every setting once, with its flag and range check
    batching.py     the packed student batch (one packer, shared with TeacherCache)
    sources.py      DataSource (TeacherCache, ExampleSource) and the resumable stream
    losses.py       pd / sft / online_kl on a packed batch; batch_loss for other loops
    model_setup.py  LoRA added or kept, everything else frozen
    checkpoints.py  pickle-free checkpoints (safetensors + JSON)
    run_dir.py      run.json, metrics.jsonl, what a resume may change
    loop.py         Trainer: micro-steps, optimizer step, validation, the step loop
    session.py      train(): lock, settings, checks, resume, the final adapter
    parallel.py     under torchrun: the batch split by sequences, the LoRA gradient sum
    fsdp.py         --fsdp: FSDP2 per decoder layer, DCP checkpoints, the gathered adapter
    cli.py          `pdengine train`

`pdengine.train` re-exports the public names.
"""
