"""pdengine.integrations (Hugging Face Trainer) and train() given a peft.PeftModel."""
import math

import pytest
import torch
from train_helpers import TEMPERATURE, adapter_tensors, config, teacher_items, tiny_model

from pdengine.errors import InputError
from pdengine.train import TrainConfig, train


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


def _trainer(tmp_path, items, **args):
    from transformers import TrainingArguments

    from pdengine.integrations import CacheDataset, DistillationTrainer, collate_cache_items
    from pdengine.lora import add_lora

    model = add_lora(tiny_model(), 4, 8)
    settings = dict(max_steps=2, per_device_train_batch_size=3, learning_rate=1e-2, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, gradient_accumulation_steps=1)
    training_args = TrainingArguments(str(tmp_path), **{**settings, **args})
    trainer = DistillationTrainer(model=model, args=training_args, train_dataset=CacheDataset(items),
                                  data_collator=collate_cache_items,
                                  distill_config=TrainConfig(temperature=TEMPERATURE))
    return model, trainer


def test_hugging_face_trainer_runs_two_steps(tmp_path, items):
    model, trainer = _trainer(tmp_path, items)
    before = adapter_tensors(model)
    out = trainer.train()
    assert out.global_step == 2 and math.isfinite(out.training_loss) and out.training_loss > 0
    after = adapter_tensors(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_trainer_checkpoints_and_save_model_write_peft_adapters(tmp_path, items):
    from pdengine.lora import load_adapter

    model, trainer = _trainer(tmp_path / "hf", items, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "hf" / "checkpoint-1", tmp_path / "hf" / "checkpoint-2", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, folder
        assert not names & {"model.safetensors", "pytorch_model.bin"}, folder  # not the full model
    reloaded = load_adapter(tiny_model(), tmp_path / "final")
    trained = adapter_tensors(model)
    for name, value in adapter_tensors(reloaded).items():
        assert torch.equal(value, trained[name]), name


def test_trainer_resumes_from_its_adapter_checkpoint(tmp_path, items):
    model, trainer = _trainer(tmp_path / "hf", items, save_strategy="steps", save_steps=1, max_steps=2)
    trainer.train()
    resumed, again = _trainer(tmp_path / "hf", items, save_strategy="steps", save_steps=1, max_steps=3)
    out = again.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))
    assert out.global_step == 3 and (tmp_path / "hf" / "checkpoint-3" / "adapter_model.safetensors").is_file()


def test_train_given_a_peft_model_says_how_to_convert(tmp_path, items):
    peft = pytest.importorskip("peft")
    import pdengine

    peft_model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with pytest.raises(InputError, match=r"not a peft.PeftModel: .*save_pretrained\(DIR\).*pdengine.load_adapter"):
        train(peft_model, None, items, tmp_path / "a", config(max_steps=1))
    # the conversion the message gives works
    peft_model.save_pretrained(tmp_path / "peft")
    model = pdengine.load_adapter(peft_model.unload(), tmp_path / "peft")
    assert train(model, None, items, tmp_path / "b", config(max_steps=1))["steps"] == 1
