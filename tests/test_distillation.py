"""The distillation loss: fused implementations against the reference, the hidden-state term, the trainer."""

import contextlib
import json
import shutil

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from conftest import tiny_config
from modeling_sparse_gpt2 import SparseGPT2LMHeadModel
from modeling_sparse_gpt2.tooling.distillation import (
    DistillationArguments,
    DistillationTrainer,
    distillation_loss,
    fused_distillation_loss,
    hidden_state_loss,
    liger_available,
    resolve_loss_impl,
)

FUSED_IMPLS = ["chunked", pytest.param("liger", marks=pytest.mark.skipif(not liger_available(), reason="liger-kernel not installed"))]


def _heads_and_states(seed=0, d=16, vocab=53, batch=2, seq=9):
    g = torch.Generator().manual_seed(seed)
    student_head, teacher_head = nn.Linear(d, vocab), nn.Linear(d, vocab)
    with torch.no_grad():
        for head in (student_head, teacher_head):
            head.weight.copy_(torch.randn(vocab, d, generator=g))
            head.bias.copy_(torch.randn(vocab, generator=g))
    student_h = torch.randn(batch, seq, d, generator=g).requires_grad_(True)
    teacher_h = torch.randn(batch, seq, d, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, 3:5] = -100  # ignored positions must drop out of both terms
    return student_head, teacher_head, student_h, teacher_h, labels


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("alpha_kl", [0.7, 0.0, 1.0])
def test_fused_loss_matches_reference_value_and_gradients(impl, alpha_kl):
    """Loss, KL, CE and the gradients w.r.t. the hidden states, lm_head weight and bias agree with
    distillation_loss on the full logits; chunks of 5 do not divide the 16 predicted tokens."""
    temperature = 2.0
    results = []
    for name in ("reference", impl):
        student_head, teacher_head, h, th, labels = _heads_and_states()
        if name == "reference":
            loss, kl, ce = distillation_loss(student_head(h), teacher_head(th), labels, temperature, alpha_kl)
        else:
            loss, kl, ce = fused_distillation_loss(h, student_head, th, teacher_head, labels, temperature, alpha_kl, impl, chunk_tokens=5)
        loss.backward()
        results.append((loss, kl, ce, h.grad, student_head.weight.grad, student_head.bias.grad))
    for reference, fused, what in zip(*results, ("loss", "kl", "ce", "d hidden", "d weight", "d bias")):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6, msg=what)


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul (aten.mm / addmm / bmm) and log_softmax dispatched inside."""

    def __init__(self):
        super().__init__()
        self.matmuls, self.log_softmax = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.matmuls.append(dtypes)
        elif func.overloadpacket is torch.ops.aten._log_softmax:
            self.log_softmax.append(dtypes)
        return func(*args, **(kwargs or {}))


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_fused_loss_under_autocast_matches_plain_under_autocast(impl):
    """Under bf16 autocast both fused impls agree with the plain path under the same autocast (whose
    lm_head runs in bf16) in loss and in the gradients of h, weight and bias, which keep fp32 dtypes; the
    bound is bf16 rounding of logits of size ~8 (the plain path itself moves ~1% from its fp32 value)."""
    results = []
    for name in ("plain", impl):
        student_head, teacher_head, h, th, labels = _heads_and_states(d=64, vocab=301)
        with _bf16_autocast():
            loss, kl, ce = fused_distillation_loss(h, student_head, th, teacher_head, labels, 2.0, 0.7, name, chunk_tokens=5)
        loss.backward()
        results.append((loss, kl, ce, h.grad, student_head.weight.grad, student_head.bias.grad))
    for plain, fused, what in zip(*results, ("loss", "kl", "ce", "d hidden", "d weight", "d bias")):
        assert fused.dtype == torch.float32, what
        scale = plain.detach().abs().max().item()
        torch.testing.assert_close(fused, plain, rtol=0, atol=3e-2 * scale, msg=what)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_fused_loss_matmuls_run_in_the_autocast_dtype(impl):
    """Every lm_head matmul inside the fused loss (student and teacher forward, the dz W and dz^T h
    gradients: 4 per chunk) takes bf16 inputs under bf16 autocast, its log_softmax fp32; without
    autocast all stay fp32."""
    chunks = 4  # 16 predicted tokens in chunks of 4
    for autocast, dtype in ((_bf16_autocast, torch.bfloat16), (contextlib.nullcontext, torch.float32)):
        student_head, teacher_head, h, th, labels = _heads_and_states()
        with autocast(), _MatmulDtypes() as seen:
            loss, _, _ = fused_distillation_loss(h, student_head, th, teacher_head, labels, 2.0, 0.7, impl, chunk_tokens=4)
        assert len(seen.matmuls) >= 4 * chunks
        assert all(d == dtype for dtypes in seen.matmuls for d in dtypes), seen.matmuls
        assert seen.log_softmax and all(d == (torch.float32,) for d in seen.log_softmax), seen.log_softmax


def test_trainer_runs_the_fused_loss_under_its_mixed_precision(tmp_path, monkeypatch):
    """accelerate autocasts only model.forward; the fused loss runs in compute_loss, which must enter
    the Trainer's bf16 autocast itself (else the lm_head matmuls run in fp32)."""
    from modeling_sparse_gpt2.tooling import distillation

    seen = []
    fused = distillation.fused_distillation_loss

    def recording(hidden, *args, **kwargs):
        seen.append(distillation.autocast_dtype(hidden.device))
        return fused(hidden, *args, **kwargs)

    monkeypatch.setattr(distillation, "fused_distillation_loss", recording)
    student, teacher = _student_teacher()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, report_to=[], disable_tqdm=True)
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher, distillation_args=DistillationArguments(loss_impl="chunked"))
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(4))
    trainer.compute_loss(trainer.model_wrapped, {"input_ids": ids, "labels": ids}).backward()
    assert seen == [torch.bfloat16]


def test_fused_loss_scales_with_the_upstream_gradient():
    student_head, teacher_head, h, th, labels = _heads_and_states()
    loss, _, _ = fused_distillation_loss(h, student_head, th, teacher_head, labels, 2.0, 0.7, "chunked", chunk_tokens=4)
    (3 * loss).backward()
    once = h.grad.clone()
    h.grad = None
    loss, _, _ = fused_distillation_loss(h, student_head, th, teacher_head, labels, 2.0, 0.7, "chunked", chunk_tokens=4)
    loss.backward()
    torch.testing.assert_close(once, 3 * h.grad)


def test_resolve_loss_impl():
    cpu = torch.device("cpu")
    assert resolve_loss_impl("auto", cpu) == "chunked"
    assert resolve_loss_impl("auto", cpu, fsdp=True) == "plain"
    assert resolve_loss_impl("plain", cpu) == "plain"
    with pytest.raises(ValueError, match="FSDP"):
        resolve_loss_impl("chunked", cpu, fsdp=True)
    with pytest.raises(ValueError, match="loss_impl"):
        DistillationArguments(loss_impl="fast")
    if not liger_available():
        with pytest.raises(ImportError, match="pip install liger-kernel"):
            resolve_loss_impl("liger", cpu)


def test_hidden_state_loss_by_hand():
    s = [torch.tensor([[[1.0, 2.0], [3.0, 0.0]]]), torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])]
    t = [torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [9.0, 9.0]]])]
    mask = torch.tensor([[1, 0]])  # the second token is padding
    # block 0, token 0: ||(0, 2)||^2 / ||(1, 0)||^2 = 4; block 1, token 0: ||(-2, 0)||^2 / ||(2, 0)||^2 = 1
    assert hidden_state_loss(s, t, mask).item() == pytest.approx((4 + 1) / 2)
    # without the mask: block 0 (4 + 9) / 1, block 1 (4 + 64 + 64) / (4 + 162)
    assert hidden_state_loss(s, t).item() == pytest.approx((13 + 132 / 166) / 2)
    with pytest.raises(ValueError, match="as many blocks"):
        hidden_state_loss(s, t[:1])


def _student_teacher():
    torch.manual_seed(0)
    student = SparseGPT2LMHeadModel(tiny_config()).train()
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    return student, teacher


def _trainer(tmp_path, student, teacher, **distill):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    return DistillationTrainer(model=student, args=args, teacher_model=teacher, distillation_args=DistillationArguments(**distill))


def _loss_and_grads(trainer, student, inputs):
    student.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(student, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def test_trainer_loss_impls_agree(tmp_path):
    """compute_loss through the final hidden states (chunked) equals the full-logits path (plain), with
    padding and the hidden-state term on: value and every student parameter's gradient."""
    student, teacher = _student_teacher()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    runs = {impl: _loss_and_grads(_trainer(tmp_path, student, teacher, loss_impl=impl, alpha_hidden=0.5), student, inputs)
            for impl in ("plain", "chunked")}
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = runs["plain"], runs["chunked"]
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert plain_grads.keys() == chunked_grads.keys() and "transformer.wte.weight" in plain_grads  # tied to lm_head
    for name in plain_grads:
        torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_adds_the_hidden_state_term(tmp_path):
    student, teacher = _student_teacher()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids, "labels": ids}
    logits_only = _trainer(tmp_path, student, teacher, alpha_hidden=0.0).compute_loss(student, inputs)
    with_hidden = _trainer(tmp_path, student, teacher, alpha_hidden=0.5).compute_loss(student, inputs)
    s = student(ids, output_hidden_states=True).hidden_states[1:]
    t = teacher(ids, output_hidden_states=True).hidden_states[1:]
    torch.testing.assert_close(with_hidden - logits_only, 0.5 * hidden_state_loss(s, t))


def test_hidden_state_loss_reaches_every_blocks_ffn():
    student, teacher = _student_teacher()
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    s = student(ids, output_hidden_states=True).hidden_states[1:]
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True).hidden_states[1:]
    hidden_state_loss(s, t).backward()
    for i, block in enumerate(student.transformer.h):
        grads = [p.grad for p in block.mlp.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), f"block {i}: an FFN parameter got no gradient"
        assert sum(g.abs().sum() for g in grads) > 0, f"block {i}: zero FFN gradient"


# --- the two benchmarks of issue 12, on tiny CPU runs -------------------------------------------------------------

def _bench(name):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny matmuls on a shared machine: more threads only oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the conversion benchmark's child processes
    yield
    torch.set_num_threads(threads)


HEALING_SMOKE = ["--smoke", "--methods", "prune_ls,sparse_gpt2_fit_per_neuron", "--ratios", "0.4", "--tokens", "64,128",
                 "--calibration_samples", "10", "--max_eval_tokens", "256"]


def test_healing_curve_smoke_resumes_to_the_same_curve(tmp_path, one_thread):
    """A run stopped by --budget_s after its first step and run again ends where one uninterrupted run
    ends (same perplexity at every milestone)."""
    bench = _bench("bench_healing_curve")
    whole = bench.main(HEALING_SMOKE + ["--out_dir", str(tmp_path / "whole")])
    first = bench.main(HEALING_SMOKE + ["--out_dir", str(tmp_path / "split"), "--budget_s", "0"])
    assert first["rows"][0]["status"] == "running" and first["rows"][0]["stopped_at_step"] == 1
    split = bench.main(HEALING_SMOKE + ["--out_dir", str(tmp_path / "split")])
    rows = {r["method"]: r for r in split["rows"]}
    curve = rows["prune_ls"]["curve"]
    assert rows["prune_ls"]["status"] == "done" and [p["tokens"] for p in curve] == [0, 64, 128]
    assert rows["prune_ls"]["segments"] == [[0, 1], [1, 2]] and whole["rows"][0]["segments"] == [[0, 2]]
    for a, b in zip(curve, whole["rows"][0]["curve"]):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    built = rows["sparse_gpt2_fit_per_neuron"]
    assert built["status"] == "done" and built["build"]["poly_coefficients"] == "per_neuron"
    assert built["build"]["poly_domain_rule"] == "fit"
    on_disk = json.loads((tmp_path / "split" / "healing_curve.json").read_text())
    assert on_disk["rows"][0]["curve"] == curve and "dense" in on_disk and "environment" in on_disk
    assert "| 0.4 | prune_ls | done |" in (tmp_path / "split" / "healing_curve.md").read_text()


def test_healing_curve_refuses_a_reference_other_than_the_stored_rows_and_renames_old_rows(tmp_path, one_thread):
    """A later call (a new device sitting retrains the reference) must not mix rows healed from different
    references; rows stored under the former default's name keep what they were built as."""
    bench = _bench("bench_healing_curve")
    flags = ["--smoke", "--methods", "prune_ls", "--ratios", "0.4", "--tokens", "64", "--calibration_samples", "10",
             "--max_eval_tokens", "256", "--out_dir", str(tmp_path)]
    first = bench.main(flags)
    assert first["rows"][0]["dense_ppl"] == first["dense"]["perplexity"]
    path = tmp_path / "healing_curve.json"
    stored = json.loads(path.read_text())
    stored["rows"].append({**stored["rows"][0], "key": "sparse_gpt2@0.4", "method": "sparse_gpt2"})
    path.write_text(json.dumps(stored))
    again = bench.main(flags)
    assert {r["key"] for r in again["rows"]} == {"prune_ls@0.4", "sparse_gpt2_psf@0.4"} and len(again["references"]) == 2
    stored = json.loads(path.read_text())
    stored["dense"]["perplexity"] *= 1.02
    path.write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="--dense_model.*differs by"):
        bench.main(flags)


def test_healing_curve_row_restarted_without_its_checkpoints_is_a_new_run_from_the_reference_it_heals_from(tmp_path, one_thread):
    """A later sitting retrains the reference (within the tolerance) and has not the earlier one's checkpoints:
    an unfinished row starts again from its build, its dense_ppl is then the new reference's, and nothing of
    the abandoned run (its training time, segments, shared-GPU note, error) is left in the row."""
    bench = _bench("bench_healing_curve")
    flags = ["--smoke", "--methods", "prune_ls", "--ratios", "0.4", "--tokens", "64,128", "--calibration_samples", "10",
             "--max_eval_tokens", "256", "--out_dir", str(tmp_path)]
    bench.main(flags + ["--budget_s", "0", "--processes_per_gpu", "4"])  # stopped after its first step, on a shared GPU
    path = tmp_path / "healing_curve.json"
    stored = json.loads(path.read_text())
    stored["dense"]["perplexity"] *= 1.003  # the earlier sitting's reference
    stored["rows"][0]["dense_ppl"] *= 1.003
    stored["rows"][0].update(train_s=1000.0, note="RuntimeError('an earlier failure')")
    path.write_text(json.dumps(stored))
    shutil.rmtree(tmp_path / "runs")
    again = bench.main(flags)
    (row,) = again["rows"]
    assert row["status"] == "done" and row["segments"] == [[0, 2]] and row["restarts"] == 1
    assert row["dense_ppl"] == again["references"][-1]["perplexity"] != stored["rows"][0]["dense_ppl"]
    assert "note" not in row and "processes_per_gpu" not in row
    assert row["train_s"] < 1000.0 and row["tokens_per_s"] == round(128 / row["curve"][-1]["train_s"])


def test_healing_curve_merges_rows_healed_in_parallel_folders(tmp_path, one_thread, monkeypatch):
    """Rows healed by separate processes (each in a copy of the curve's folder) come together in --out_dir:
    each row as far as it got anywhere, every call's reference evaluation kept once (even when parallel calls
    evaluate the same reference within one second), and a folder healed from another reference is refused."""
    bench = _bench("bench_healing_curve")
    environment = bench.environment
    monkeypatch.setattr(bench, "environment", lambda: {**environment(), "date": "2026-12-02 10:08:26"})  # one second
    flags = ["--smoke", "--ratios", "0.4", "--tokens", "64,128", "--calibration_samples", "10", "--max_eval_tokens", "256"]
    main, a, b = (tmp_path / n for n in ("main", "a", "b"))
    bench.main(flags + ["--methods", "prune_ls", "--out_dir", str(main), "--budget_s", "0"])  # stopped after one step
    for d in (a, b):
        d.mkdir()
        shutil.copy(main / "healing_curve.json", d)
    bench.main(flags + ["--methods", "prune_ls", "--out_dir", str(a), "--processes_per_gpu", "2"])
    bench.main(flags + ["--methods", "sparse_gpt2_fit_domain", "--out_dir", str(b), "--processes_per_gpu", "2"])
    merged = bench.main(["--merge", f"{a},{b}", "--out_dir", str(main)])
    rows = {r["key"]: r for r in merged["rows"]}
    assert [r["key"] for r in merged["rows"]] == ["sparse_gpt2_fit_domain@0.4", "prune_ls@0.4"]  # the PLAN's order
    assert rows["prune_ls@0.4"]["status"] == rows["sparse_gpt2_fit_domain@0.4"]["status"] == "done"
    assert rows["prune_ls@0.4"]["processes_per_gpu"] == 2 and len(merged["references"]) == 3
    assert json.loads((main / "healing_curve.json").read_text())["rows"] == merged["rows"]
    assert "| 0.4 | sparse_gpt2_fit_domain (default) | done |" in (main / "healing_curve.md").read_text()
    stored = json.loads((b / "healing_curve.json").read_text())
    stored["dense"]["perplexity"] *= 1.02
    (b / "healing_curve.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match="--merge.*reference"):
        bench.main(["--merge", str(b), "--out_dir", str(main)])


def test_healing_curve_default_row_is_built_with_the_conversions_defaults(monkeypatch):
    """The row the curve's table and the docs call the default is converted with ConversionArguments' own
    defaults: a default changed in the package without the curve (or the reverse) fails here."""
    from types import SimpleNamespace

    from modeling_sparse_gpt2.tooling.conversion import ConversionArguments

    bench = _bench("bench_healing_curve")
    seen = []
    monkeypatch.setattr(bench, "convert_gpt2_to_sparse",
                        lambda dense, calib, conv: (seen.append(conv), (SimpleNamespace(config=SimpleNamespace(poly_domain=[3.0])), None))[1])
    bench.build(bench.DEFAULT_METHOD, 0.4, None, None, 0)
    assert seen == [ConversionArguments(ffn_flops_ratio=0.4)]


def test_healing_curve_bad_flags():
    bench = _bench("bench_healing_curve")
    with pytest.raises(SystemExit):
        bench.parse_args(["--smoke", "--methods", "magic"])
    with pytest.raises(SystemExit, match="--tokens"):
        bench.parse_args(["--smoke", "--tokens", "lots"])


def test_conversion_scale_row_and_flags(tmp_path, one_thread):
    bench = _bench("bench_conversion_scale")
    spec = {"shape": "tiny", "device": "cpu", "ratio": 0.4, "block": 16, "seed": 0, "calibration_samples": 37,
            "calibration_file": None, "tokenizer_name_or_path": None}
    row = bench.convert_one(spec)
    assert row["convert_s"] > 0 and row["peak_rss_gib"] >= row["rss_before_gib"] > 0 and row["calibration_tokens"] == 37 * 16
    assert row["ffn_flops_ratio"] <= 0.4 and row["sparse_params"] < row["dense_params"]
    if not torch.cuda.is_available():
        result = bench.main(["--shapes", "gpt2-xl@cuda", "--output", str(tmp_path / "scale.json")])
        assert result["rows"][0]["status"] == "skipped: no CUDA device"
    with pytest.raises(SystemExit, match="--shapes"):
        bench.main(["--smoke", "--shapes", "gpt5", "--output", str(tmp_path / "scale.json")])


@pytest.mark.slow
def test_conversion_scale_smoke_runs_each_shape_in_its_own_process(tmp_path, one_thread):
    bench = _bench("bench_conversion_scale")
    out = tmp_path / "scale.json"
    result = bench.main(["--smoke", "--output", str(out)])
    (tiny,) = result["rows"]
    assert tiny["status"] == "ok" and tiny["shape"] == "tiny" and tiny["peak_rss_gib"] >= tiny["rss_before_gib"] > 0
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_measure_loss_smoke_reports_each_impl(tmp_path, one_thread):
    bench = _bench("bench_healing_curve")
    result = bench.main(["--smoke", "--measure_loss", "--out_dir", str(tmp_path)])
    rows = {r["loss_impl"]: r for r in result["rows"]}
    assert {"plain", "chunked"} <= rows.keys() and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["chunked"]["speedup_vs_plain"] == pytest.approx(rows["chunked"]["tokens_per_s"] / rows["plain"]["tokens_per_s"], rel=1e-2)
    assert json.loads((tmp_path / "loss_speed.json").read_text())["rows"] == result["rows"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prune_neurons_takes_a_half_precision_model_as_the_conversion_does(dtype, one_thread):
    """The narrow GELU MLP that leads the healing curve at 0.4 is what a user builds from a checkpoint as
    loaded (the embedded GPT-2 is stored in fp16): pruning it must work, in fp32, and match the fp32 result."""
    from modeling_sparse_gpt2.tooling import baselines

    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    calib = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    reference = baselines.prune_neurons(dense, calib, 0.25, refit=True, selection="obs")
    half = baselines.prune_neurons(dense.to(dtype), calib, 0.25, refit=True, selection="obs")
    assert half.dtype == torch.float32 and half.config.n_inner == reference.config.n_inner
    with torch.no_grad():
        a, b = reference(calib).logits, half(calib).logits
    assert torch.isfinite(b).all() and (a - b).abs().max() < 0.05 * a.abs().max()


def test_prune_with_obs_selection_fits_the_first_mlp_better(one_thread):
    """The healing curve's prune_obs_ls row: the conversion's OBS rule picks the neurons, the LS refit follows;
    on the calibration tokens its first MLP reproduces the dense one better than importance selection does."""
    from modeling_sparse_gpt2.tooling import baselines

    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)).eval()
    calib = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    h = dense.transformer.h[0]
    with torch.no_grad():
        embeddings = dense(calib, output_hidden_states=True).hidden_states[0]
        x = h.ln_2(embeddings + h.attn(h.ln_1(embeddings))[0])  # the first MLP's input
        errors = {}
        for selection in ("importance", "obs"):
            pruned = baselines.prune_neurons(dense, calib, 0.25, refit=True, selection=selection)
            errors[selection] = (pruned.transformer.h[0].mlp(x) - h.mlp(x)).pow(2).mean().item()
    assert pruned.config.n_inner == 32 and errors["obs"] < errors["importance"]
    with pytest.raises(ValueError, match="selection"):
        baselines.prune_neurons(dense, calib, 0.25, refit=True, selection="random")
