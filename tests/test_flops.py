import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, Trainer, TrainerCallback, TrainingArguments
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from modeling_sparse_gpt2 import SparseGPT2LMHeadModel
from modeling_sparse_gpt2.tooling.budget import flops_by_component
from modeling_sparse_gpt2.tooling.callbacks import attach_flops_callback
from modeling_sparse_gpt2.component_base import FFNContext
from modeling_sparse_gpt2.modeling_sparse_gpt2 import sparse_ffns

from conftest import ALL, tiny_config, tiny_model

CONFIGS = {
    "all_components": dict(n_embd=128, n_head=4, poly_keep_ratio=0.3, k_freq=16, feedback_rank=8, tensor_blocks=8, micro_group_size=16),
    "token_gates_topk": dict(n_embd=96, n_head=4, gate_kind="token", spectral_selection="topk", k_freq=12, tensor_blocks=6, micro_group_size=8),
    "polynomial_only": dict(n_embd=64, sparse_components=["polynomial"], poly_keep_ratio=0.5),
    "per_layer_budgets": dict(n_embd=64, poly_keep_ratio=[0.6, 0.2], sparse_components=[["polynomial", "spectral"], ALL], tensor_blocks=8),
}


def counted_ffn_flops(model, batch, seq):
    """FlopCounterMode's count of every FFN forward, run inside the model."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    counts = []
    hooks = []
    for ffn in sparse_ffns(model):
        counter = FlopCounterMode(display=False)
        hooks.append(ffn.register_forward_pre_hook(lambda m, a, c=counter: c.__enter__() and None))
        hooks.append(ffn.register_forward_hook(lambda m, a, o, c=counter: c.__exit__(None, None, None) and None))
        counts.append(counter)
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return [c.get_total_flops() for c in counts]


def counted_component_flops(ffn, name, x):
    """FlopCounterMode's count of component ``name`` run on its own, as ``reference_forward`` runs it
    (a GEMM component through its c_fc / c_proj slices)."""
    comp = ffn.components[name]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        if name in ffn.segments:
            h = F.linear(x, ffn.w_in(name), ffn.b_in(name))
            F.linear(comp.activate(h, FFNContext(layer_idx=ffn.layer_idx)), ffn.w_out(name))
        else:
            comp(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_analytic_ffn_flops_match_flop_counter_mode(name):
    model = tiny_model(**CONFIGS[name])
    batch, seq = 2, 48
    counted = counted_ffn_flops(model, batch, seq)
    report = model.flops_report(batch_size=batch, seq_len=seq)
    for i, c in enumerate(counted):
        assert report[f"FLOPs/block_{i}_ffn"] == c, (i, c)  # integers: exact
    assert report["FLOPs/ffn_total"] == sum(counted)
    for i in range(model.config.n_layer):
        parts = [v for k, v in report.items() if k.startswith(f"FLOPs/block_{i}_") and not k.endswith("_ffn")]
        assert sum(parts) == report[f"FLOPs/block_{i}_ffn"]
        for comp in model.config.layer_spec(i).components:
            assert f"FLOPs/block_{i}_{comp}" in report


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_report_is_the_structured_breakdown_flattened(name):
    model = tiny_model(**CONFIGS[name])
    blocks = model.flops_breakdown(batch_size=2, seq_len=48)
    report = model.flops_report(batch_size=2, seq_len=48)
    assert len(blocks) == model.config.n_layer
    for i, block in enumerate(blocks):
        assert set(block["matmul"]) == set(block["elementwise"]) == {*model.config.layer_spec(i).components, "gates"}
        assert report[f"FLOPs/block_{i}_ffn"] == sum(block["matmul"].values())
        for comp, flops in block["elementwise"].items():
            assert report[f"ElementwiseFLOPs/block_{i}_{comp}"] == flops
    assert report["FLOPs/ffn_dense_equivalent"] == sum(block["dense_equivalent"] for block in blocks)
    by_component = flops_by_component(model, batch_size=2, seq_len=48)
    assert sum(by_component.values()) == report["FLOPs/ffn_total"]
    assert ("gates" in by_component) == (model.config.gate_kind == "token")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_analytic_flops_of_each_component_are_exact(name):
    """Per part, against FlopCounterMode on the reference path (each component run on its own from its
    c_fc / c_proj slices, as ``reference_forward`` does), so an error in one part cannot hide in the
    block's sum. With the block totals exact (test above) and the parts summing to them, the gates'
    FLOPs (block minus components) are exact too."""
    model = tiny_model(**CONFIGS[name])
    batch, seq = 2, 8
    report = model.flops_report(batch_size=batch, seq_len=seq)
    for i, ffn in enumerate(sparse_ffns(model)):
        x = torch.randn(batch, seq, model.config.n_embd)
        for comp_name in ffn.components:
            assert report[f"FLOPs/block_{i}_{comp_name}"] == counted_component_flops(ffn, comp_name, x), (i, comp_name)


def test_dense_equivalent_is_the_gpt2_mlp_flops():
    model = tiny_model(n_embd=64)
    dense = GPT2MLP(4 * 64, GPT2Config(n_embd=64))
    with FlopCounterMode(display=False) as counter:
        dense(torch.randn(3, 10, 64))
    report = model.flops_report(batch_size=3, seq_len=10)
    assert report["FLOPs/ffn_dense_equivalent"] == model.config.n_layer * counter.get_total_flops()
    assert report["FLOPs/ffn_ratio"] == report["FLOPs/ffn_total"] / report["FLOPs/ffn_dense_equivalent"]


def test_smaller_keep_ratio_gives_fewer_flops():
    ratios = [tiny_model(poly_keep_ratio=r).flops_report(1, 32)["FLOPs/ffn_ratio"] for r in (0.8, 0.5, 0.2)]
    assert ratios[0] > ratios[1] > ratios[2]


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_flops_callback_reaches_trainer_log_history(tmp_path):
    model = tiny_model().train()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(16, 16, 97))
    attach_flops_callback(trainer, seq_len=16)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "FLOPs/ffn_total" in entry]
    assert len(logged) >= 2
    # against an independent count: FlopCounterMode over the FFNs of one 2 x 16 forward
    assert logged[-1]["FLOPs/ffn_total"] == sum(counted_ffn_flops(model.eval(), batch=2, seq=16))
    spectral_flops = counted_component_flops(sparse_ffns(model)[1], "spectral", torch.randn(2, 16, model.config.n_embd))
    assert logged[-1]["FLOPs/block_1_spectral"] == spectral_flops
    assert "Gates/block_0_polynomial" in logged[-1]
    # the Trainer's own logging still happens at the same steps
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [2, 4]


def test_flops_callback_logs_throughput_of_the_window_since_the_last_log(tmp_path):
    class SlowStep(TrainerCallback):  # every step takes at least 0.2 s of wall time
        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.2)

    model = tiny_model().train()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=2,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(16, 16, 97), callbacks=[SlowStep()])
    attach_flops_callback(trainer, seq_len=16)
    trainer.train()
    windows = [(e["step"], e["Throughput/tokens_per_s"]) for e in trainer.state.log_history if "Throughput/tokens_per_s" in e]
    assert [step for step, _ in windows] == [1, 2, 4]
    spans = [(step - prev, rate) for (prev, _), (step, rate) in zip([(0, None)] + windows, windows)]  # (steps, tokens/s)
    seconds = [steps * 2 * 16 / rate for steps, rate in spans]  # recovered from the rate: 2 x 16 tokens per step
    assert all(s >= 0.2 * steps * 0.99 for s, (steps, _) in zip(seconds, spans))
    runtime = next(e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e)
    assert 0.8 <= sum(seconds) <= runtime
