"""peft reaches the sparse FFN with a LoRA config written for GPT-2 (c_attn, c_fc, c_proj)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, TrainingArguments

from modeling_sparse_gpt2.modeling_sparse_gpt2 import sparse_ffns
from modeling_sparse_gpt2.tooling.distillation import build_healing_trainer

from conftest import tiny_model

peft = pytest.importorskip("peft")


def test_gpt2_lora_config_adapts_attention_and_the_sparse_ffn_heals_merges_and_reloads(tmp_path):
    student = tiny_model(sparse_components=["polynomial", "spectral", "feedback"])
    base = copy.deepcopy(student)
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_fc", "c_proj"])
    model = peft.get_peft_model(student, config)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A")}
    for i in range(2):
        assert {f"transformer.h.{i}.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} <= adapted
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    blocks = torch.randint(1, 97, (16, 16), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
        report_to=[], save_strategy="no", logging_steps=3, use_cpu=True, dataloader_pin_memory=False,
    )  # fmt: skip
    build_healing_trainer(model, teacher, blocks, None, args).train()
    model.eval()
    x = blocks[:2]
    with torch.no_grad():
        adapted_logits = model(input_ids=x).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=x).logits, adapted_logits, atol=1e-5, rtol=0)
    for ffn, ffn0 in zip(sparse_ffns(merged), sparse_ffns(base)):  # the FFN's projections were adapted
        assert not torch.allclose(ffn.c_fc.weight, ffn0.c_fc.weight)
        assert not torch.allclose(ffn.c_proj.weight, ffn0.c_proj.weight)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, adapted_logits, atol=1e-5, rtol=0)
