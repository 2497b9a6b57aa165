"""`TrainConfig`: the settings of a student run, each declared once with its flag.

The fields are `pdengine.config.setting(...)`s, so `pdengine train`'s flags, the
`train:` section of `pdengine run` and the range checks (InputError) all come from
here. `RESULT_SETTINGS` lists what a resumed run must keep unchanged
(docs/DESIGN.md, "Checkpoints and resume").
"""
from __future__ import annotations

from dataclasses import dataclass

from pdengine.config import FRACTION, NON_NEGATIVE, POSITIVE, Check, check_settings, setting, to_dict

LOSSES = ("pd", "sft", "online_kl")
MODES = ("tail", "renorm")
SCHEDULES = ("linear", "cosine")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AT_LEAST_ONE = Check(lambda v: v >= 1, ">= 1")

# Settings that may change between a run and its resumption: they decide how far the run
# goes, how often it saves and what it prints, never what a given step computes.
# The validation loss and TensorBoard only observe the run (model.eval(), no gradient, no RNG).
RESUMABLE_SETTINGS = ("max_steps", "save_every", "keep_checkpoints", "progress", "grad_checkpointing",
                      "eval_every", "tensorboard")


@dataclass
class TrainConfig:
    """Hyper-parameters of a student run (paper defaults unless noted; README "Training").

    The learning-rate schedule spans `epochs` (or `schedule_steps`) whatever `max_steps`
    says, so a run stopped by `max_steps` resumes onto the same schedule.
    """

    loss: str = setting("pd", "pd: top-k KL from the cache; sft: cross-entropy on the answers; "
                        "online_kl: teacher recomputed every step, full-vocabulary KL", choices=LOSSES)
    temperature: float = setting(2.0, "distillation temperature (no T^2 factor); must equal the cache's "
                                 "for pd", check=POSITIVE)
    mode: str = setting("tail", "tail keeps the teacher's mass outside its top-k; renorm drops it",
                        choices=MODES)
    ce_weight: float = setting(0.0, "extra cross-entropy weight on the answer tokens (pd only; loss = KL + "
                               "ce_weight * CE, the CE at ce_temperature)", check=NON_NEGATIVE)
    # The fused op takes one temperature: by default its CE term is at the distillation
    # temperature (one pass). The KD convention (Hinton et al.; Liger; DistillKit) takes the
    # hard-label CE at T=1: ce_temperature=1 does that with a second fused pass (k=1, as sft).
    ce_temperature: float | None = setting(None, "temperature of the ce_weight cross-entropy (default: the "
                                           "distillation temperature, one fused pass; 1: the knowledge-"
                                           "distillation convention, a second fused pass)", check=POSITIVE)
    epochs: int = setting(10, "passes over the cache", check=POSITIVE)
    lr: float = setting(1e-5, "AdamW learning rate (peak, after warmup)", check=POSITIVE)
    weight_decay: float = setting(0.1, "AdamW weight decay", check=NON_NEGATIVE)
    warmup_ratio: float = setting(0.1, "share of the steps with a linear warmup (then --schedule's decay to 0)",
                                  check=FRACTION)
    schedule: str = setting("linear", "learning-rate decay after the warmup, to 0 at the schedule's end",
                            choices=SCHEDULES)
    max_grad_norm: float = setting(1.0, "gradient clipping norm (0: no clipping)", check=NON_NEGATIVE)
    lora_r: int = setting(64, "LoRA rank of the adapters added when the model has none", check=POSITIVE)
    lora_alpha: float = setting(128.0, "LoRA alpha (scale alpha / r)", check=POSITIVE)
    lora_dropout: float = setting(0.05, "dropout on the LoRA input", check=FRACTION)
    lora_targets: tuple[str, ...] = setting(DEFAULT_TARGETS, "module names that get adapters")
    lora_lm_head: bool = setting(False, "an adapter on the lm_head too")
    lora_embeddings: bool = setting(False, "an adapter on the input embeddings too (embed_tokens)")
    rslora: bool = setting(False, "rank-stabilised scale alpha / sqrt(r)")
    batch_tokens: int = setting(4096, "packed tokens per micro-batch", check=POSITIVE)
    grad_accum: int = setting(1, "micro-batches per optimizer step", check=POSITIVE)
    grad_checkpointing: bool = setting(False, "recompute activations in the backward (less memory, ~30%% "
                                       "slower)")
    bf16: bool | None = setting(None, "autocast the forward to bfloat16 (default: on with CUDA)")
    seed: int = setting(0, "data order, LoRA init and dropout")
    save_every: int = setting(200, "checkpoint every N steps (0: only at the end and on Ctrl-C)",
                              check=NON_NEGATIVE)
    keep_checkpoints: int = setting(2, "how many checkpoints to keep", check=AT_LEAST_ONE)
    max_steps: int | None = setting(None, "stop after this many optimizer steps (resume with a larger "
                                    "value to extend)", check=POSITIVE)
    schedule_steps: int | None = setting(None, "length of the learning-rate schedule (default: all epochs)",
                                         check=POSITIVE)
    replay_fraction: float = setting(0.0, "share of each step's loss taken by the replay cache",
                                     check=FRACTION)
    val_fraction: float = setting(0.0, "share of the cache's QA pairs held out (never trained on) for a "
                                  "validation loss (val_loss in metrics.jsonl)", check=FRACTION)
    eval_every: int = setting(0, "validation loss every N optimizer steps (0: after each epoch's steps and "
                              "at the end)", check=NON_NEGATIVE)
    init_adapter: str | None = setting(None, "start from this PEFT adapter directory instead of new LoRA "
                                       "(its rank, alpha and targets replace the lora_* settings)")
    # Under torchrun (docs/DESIGN.md, "Distributed"): DDP by default (LoRA gradients summed
    # over ranks); fsdp shards the frozen base per decoder layer for bases too big for one device.
    fsdp: bool = setting(False, "under torchrun: shard the model per decoder layer with FSDP2 (fully_shard) "
                         "instead of replicating it (DDP); for bases that do not fit one device")
    fsdp_bf16: bool = setting(False, "with --fsdp: compute in bfloat16 (MixedPrecisionPolicy param_dtype bf16, "
                              "gradients reduced in fp32)")
    tensorboard: bool = setting(True, "also log to OUT/tensorboard when the tensorboard package is installed")
    progress: bool = setting(True, "show a progress bar")

    def __post_init__(self):
        self.lora_targets = tuple(self.lora_targets)
        self.validate()

    def validate(self) -> None:
        """Raise InputError naming the first setting out of range."""
        check_settings(self)
        if self.fsdp_bf16 and not self.fsdp:
            from pdengine.errors import InputError

            raise InputError("fsdp_bf16 is FSDP's mixed precision: it needs fsdp (--fsdp)")

    def to_dict(self) -> dict:
        return to_dict(self)


def result_settings() -> tuple[str, ...]:
    """Every setting that changes what a run computes (all but RESUMABLE_SETTINGS)."""
    return tuple(name for name in TrainConfig.__dataclass_fields__ if name not in RESUMABLE_SETTINGS)
