"""The student trainer, one concern per module (docs/DESIGN.md, "Training"):

    config.py       TrainConfig: every setting once, with its flag and range check
    batching.py     the packed student batch (one packer, shared with TeacherCache)
    sources.py      DataSource (TeacherCache, ExampleSource) and the resumable stream
    losses.py       pd / sft / online_kl on a packed batch; batch_loss for other loops
    model_setup.py  LoRA added or kept, everything else frozen
    checkpoints.py  pickle-free checkpoints (safetensors + JSON)
    run_dir.py      run.json, metrics.jsonl, what a resume may change
    loop.py         Trainer and train()
    cli.py          `pdengine train`

`pdengine.train` re-exports the public names.
"""
