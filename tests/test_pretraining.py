"""The dense reference trainer: learns, keeps its best weights, and fits its schedule to the time cap."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_MODEL
from modeling_sparse_gpt2.tooling.pretraining import PretrainArguments, train_dense_reference

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")  # a 1-layer, 32-wide model: see the fixture


def _token_files(tmp_path):
    # a learnable stream: a repeated 40-token pattern with a little noise
    rng = np.random.default_rng(0)
    stream = np.tile(np.arange(40, dtype=np.uint16), 400)
    noise = rng.random(stream.shape) < 0.05
    stream[noise] = rng.integers(0, 8000, noise.sum())
    np.save(tmp_path / "train.npy", stream)
    np.save(tmp_path / "validation.npy", stream[:2000])
    return str(tmp_path / "train.npy"), str(tmp_path / "validation.npy")


def _args(tmp_path, **overrides):
    train, val = _token_files(tmp_path)
    kw = dict(output_dir=str(tmp_path / "out"), train_tokens=train, validation_tokens=val, tokenizer_name_or_path=DEFAULT_MODEL,
              n_embd=32, n_layer=1, n_head=2, n_positions=32, batch_size=8, learning_rate=3e-3, warmup_steps=5,
              max_steps=80, eval_every=20, eval_windows=8, max_minutes=5.0)
    kw.update(overrides)
    return PretrainArguments(**kw)


def test_dense_reference_learns_and_saves_its_best_weights_with_the_curve(tmp_path):
    torch.manual_seed(0)
    args = _args(tmp_path)
    summary = train_dense_reference(args, log=lambda *_: None)
    curve = summary["curve"]
    assert curve[-1]["val_loss"] < curve[0]["val_loss"] - 0.5
    assert summary["best_val_loss"] == min(p["val_loss"] for p in curve)
    assert summary["stop_reason"] in ("schedule_end", "patience")
    saved = json.loads((tmp_path / "out" / "training_curve.json").read_text())
    assert saved["curve"] == curve
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    windows = torch.from_numpy(np.load(args.validation_tokens).astype(np.int64))[: 8 * 32].view(8, 32)
    with torch.no_grad():
        loss = model(windows, labels=windows).loss.item()
    assert abs(loss - summary["best_val_loss"]) < 0.05  # the saved weights are the best evaluation's


def test_schedule_is_shortened_to_end_within_the_time_cap(tmp_path):
    # the step time is probed between steps 20 and 60, which must fit in the cap: 2 sequences a step on one
    # thread take 30 ms at a load average of 4 on the shared 2 cores (8 sequences on two threads: 280-445 ms)
    args = _args(tmp_path, max_steps=100_000, max_minutes=0.1, eval_every=1000, batch_size=2)
    summary = train_dense_reference(args, log=lambda *_: None)
    assert 60 < summary["schedule_steps"] < 100_000
    assert summary["stop_reason"] in ("schedule_end", "max_minutes")
    assert summary["wall_s"] < 0.1 * 60 + 10
