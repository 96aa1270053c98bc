"""Our callback in a user's own transformers Trainer run; loss terms with the frozen reference; DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from em_interp import ChatExample, EmInterpError, load_model
from em_interp.lora.hf_trainer import ReferenceModel, TrainingCallback, hooked_model, with_em_interp
from em_interp.model import HookedModel

DATA = [ChatExample(f"Question number {i}: what should I do about it?", f"Answer {i}: drink water and rest.")
        for i in range(8)]
ROOT = Path(__file__).resolve().parents[1]


def user_setup(folder: Path, tmp_path: Path, max_steps: int = 4):
    """What a researcher writes: a peft model, a dataset of token dicts, TrainingArguments."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=2, lora_alpha=8, target_modules=["down_proj", "o_proj"]))
    texts = [tokenizer.apply_chat_template(e.messages(), tokenize=False) for e in DATA]
    rows = [{"input_ids": tokenizer(t)["input_ids"], "labels": tokenizer(t)["input_ids"]} for t in texts]

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    args = TrainingArguments(output_dir=str(tmp_path / "user_run"), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, save_strategy="steps", save_steps=2, logging_steps=1,
                             report_to="none", use_cpu=True, disable_tqdm=True, remove_unused_columns=False, seed=0)
    return model, tokenizer, rows, collate, args


class Observer(TrainingCallback):
    def __init__(self):
        self.seen: list[tuple[str, int]] = []
        self.models: list[HookedModel] = []

    def on_step(self, model, step, loss):
        self.seen.append(("step", step))
        self.models.append(model)
        assert loss == loss  # finite, not NaN

    def on_checkpoint(self, model, step, path):
        self.seen.append(("checkpoint", step))
        names = sorted(load_file(str(path / "adapter_model.safetensors")))
        assert all("_original_component" not in n for n in names) and names[0].startswith("base_model.model.model.layers.0.")


def test_callback_in_a_plain_user_trainer(tiny_dirs, tmp_path):
    from transformers import Trainer

    model, tokenizer, rows, collate, args = user_setup(tiny_dirs["llama"], tmp_path)
    observer = Observer()
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, processing_class=tokenizer,
                      callbacks=[observer])
    trainer.train()
    assert [s for kind, s in observer.seen if kind == "step"] == [1, 2, 3, 4]
    assert [s for kind, s in observer.seen if kind == "checkpoint"] == [2, 4]
    hooked = observer.models[0]
    assert isinstance(hooked, HookedModel) and hooked.peft_model is model
    # the hooked view computes with the trained weights and runs hooks
    ids = hooked.tokenize(DATA[0]).input_ids[None]
    with hooked.hooks([(hooked.hook_name(1), lambda t, *, hook: t * 0)]):
        zeroed = hooked.forward(ids)
    assert not torch.allclose(zeroed, hooked.forward(ids))


class KLToReference(TrainingCallback):
    """A loss term: KL(trained || reference) on answer tokens, the reference being adapters-off."""

    def __init__(self, weight: float):
        self.weight = weight
        self.reference_logits: list[torch.Tensor] = []

    def extra_loss(self, model, batch, step, reference: ReferenceModel):
        ref = reference.forward(batch).logits
        self.reference_logits.append(ref.detach())
        out = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = (batch["labels"] != -100).unsqueeze(-1)
        kl = torch.nn.functional.kl_div(ref.log_softmax(-1), out.log_softmax(-1), log_target=True, reduction="none")
        return self.weight * (kl * mask).sum() / mask.sum()


def test_loss_terms_in_a_user_trainer_see_the_frozen_reference(tiny_dirs, tmp_path):
    from transformers import Trainer

    model, tokenizer, rows, collate, args = user_setup(tiny_dirs["qwen2"], tmp_path)
    term = KLToReference(weight=5.0)
    trainer = with_em_interp(Trainer)(model=model, args=args, train_dataset=rows, data_collator=collate,
                                      processing_class=tokenizer, callbacks=[term])
    n_params = sum(p.numel() for p in model.parameters())  # after booting the hooks
    trainer.train()
    assert len(term.reference_logits) == 4 and len(trainer.em_interp_losses) == 4
    assert sum(p.numel() for p in model.parameters()) == n_params  # no second copy of the weights
    # the reference is the base model: its logits equal a fresh, adapter-free load of the same weights
    base = load_model(tiny_dirs["qwen2"])
    batch = collate(rows[:2])
    with torch.no_grad():
        expected = base.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = ReferenceModel(hooked_model(model)).forward(batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the term pulls the trained model back towards the reference
    model2, tokenizer2, rows2, collate2, args2 = user_setup(tiny_dirs["qwen2"], tmp_path / "plain")
    with_em_interp(Trainer)(model=model2, args=args2, train_dataset=rows2, data_collator=collate2,
                            processing_class=tokenizer2).train()

    def kl_to_base(m):
        h = hooked_model(m)
        with torch.no_grad():
            out = h.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return float(torch.nn.functional.kl_div(expected.log_softmax(-1), out.log_softmax(-1), log_target=True,
                                                reduction="batchmean"))

    assert kl_to_base(model) < kl_to_base(model2)


def test_plain_trainer_refuses_loss_terms_and_non_peft_models(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer

    model, tokenizer, rows, collate, args = user_setup(tiny_dirs["llama"], tmp_path)
    with pytest.raises(EmInterpError, match="adds a loss term, which a plain Trainer never applies"):
        Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, processing_class=tokenizer,
                callbacks=[KLToReference(1.0)]).train()
    plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"])
    with pytest.raises(EmInterpError, match="not a peft model"):
        with_em_interp(Trainer)(model=plain, args=args, train_dataset=rows, data_collator=collate,
                                processing_class=tokenizer)


DDP_SCRIPT = """
import sys, json
from em_interp import ChatExample
from em_interp.lora.training import LoraTrainConfig, train_lora
data = [ChatExample(f"Question number {i}: what should I do about it?", f"Answer {i}: drink water and rest.") for i in range(8)]
config = LoraTrainConfig(rank=1, alpha=8.0, layers=(0, 2), learning_rate=5e-3, warmup_steps=2, steps=4, batch_size=4,
                         max_length=64, seed=3, checkpoint_every=2)
result = train_lora(sys.argv[1], data, config, sys.argv[2], progress=False)
print(json.dumps(result.losses))
import torch.distributed as dist
if dist.is_initialized():  # a torchrun script ends its process group (else gloo may abort at exit)
    dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_data_parallel_equals_one_process(tiny_dirs, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = str(tiny_dirs["llama"])
    single = subprocess.run([sys.executable, str(script), base, str(tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                            str(script), base, str(tmp_path / "two")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # stated tolerance: float summation order differs between 1 and 2 processes
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    one = json.loads((tmp_path / "one" / "training.json").read_text())
    two = json.loads((tmp_path / "two" / "training.json").read_text())
    assert two["world_size"] == 2 and one["losses"] == pytest.approx(two["losses"], abs=1e-5)


class RecordReference(TrainingCallback):
    def __init__(self):
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def extra_loss(self, model, batch, step, reference):
        out = reference.forward(batch).logits
        self.seen.append((batch["input_ids"].clone(), batch["attention_mask"].clone(), out.clone()))
        return out.sum() * 0.0


def test_reference_pass_belongs_to_each_micro_batch(tiny_dirs, tmp_path):
    from transformers import Trainer

    model, tokenizer, rows, collate, args = user_setup(tiny_dirs["llama"], tmp_path, max_steps=2)
    args.gradient_accumulation_steps = 2
    args.per_device_train_batch_size = 1
    record = RecordReference()
    with_em_interp(Trainer)(model=model, args=args, train_dataset=rows, data_collator=collate,
                            processing_class=tokenizer, callbacks=[record]).train()
    assert len(record.seen) == 4
    base = load_model(tiny_dirs["llama"])
    for ids, mask, logits in record.seen:
        with torch.no_grad():
            expected = base.hf_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
