"""The benchmark commands keep working (CPU smoke runs of each; the GPU runs use the same code paths)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from modeling_sparse_gpt2.tooling.data import load_texts, token_stream
from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_CALIBRATION, DEFAULT_MODEL, DEFAULT_VALIDATION, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
ENV = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")

pytestmark = pytest.mark.slow


def run(script, *args, timeout=900):
    res = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_bench_speed_cpu_smoke_measures_every_variant_and_stage(tmp_path):
    out = tmp_path / "speed.json"
    run("bench_speed.py", "--device", "cpu", "--quick", "--output", str(out))
    result = json.loads(out.read_text())
    ffn = {r["kind"]: r for r in result["ffn"]}
    assert set(ffn) == {"dense", "sparse", "ideal", "sparse_all"}
    assert all("fwd_bwd" in r and r["fwd_bwd"]["median_ms"] > 0 for r in ffn.values())
    assert ffn["sparse"]["components"] == ["polynomial", "spectral", "feedback"]
    stages = {(r["model"], r["stage"], r.get("batch")) for r in result["e2e"]["rows"] if "median_ms" in r}
    for model in ("dense", "sparse@0.4", "ideal@0.4"):
        assert {(model, "train", None), (model, "prefill", None), (model, "decode", 1)} <= stages


def test_bench_speed_e2e_stages_runs_only_the_stages_asked_for(tmp_path):
    out = tmp_path / "speed.json"
    run("bench_speed.py", "--device", "cpu", "--quick", "--sections", "e2e", "--e2e-ratios", "0.4", "--e2e-stages", "prefill",
        "--output", str(out))
    rows = json.loads(out.read_text())["e2e"]["rows"]
    assert {r["stage"] for r in rows} == {"prefill"} and all("median_ms" in r for r in rows)
    res = subprocess.run([sys.executable, os.path.join(BENCH, "bench_speed.py"), "--e2e-stages", "prefill,warp", "--output", str(out)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "--e2e-stages: unknown ['warp']" in res.stderr


def test_bench_quality_resumes_its_rows_and_starts_none_after_the_deadline(tmp_path):
    tok = load_tokenizer(DEFAULT_MODEL)
    for split, path in (("train", DEFAULT_CALIBRATION), ("validation", DEFAULT_VALIDATION)):
        np.save(tmp_path / f"{split}.npy", token_stream(load_texts(path), tok).numpy().astype(np.uint16))
    common = ["--train_tokens", str(tmp_path / "train.npy"), "--validation_tokens", str(tmp_path / "validation.npy"),
              "--tokenizer_name_or_path", DEFAULT_MODEL, "--dense_model", DEFAULT_MODEL, "--work_dir", str(tmp_path / "work"),
              "--output", str(tmp_path / "q.json"), "--heal_steps", "2", "--heal_batch", "2", "--calibration_samples", "8",
              "--max_eval_tokens", "4096", "--methods", "sparse_gpt2,prune_ls", "--extra_methods", ""]
    run("bench_quality.py", *common, "--ratios", "0.4")
    first = json.loads((tmp_path / "q.json").read_text())
    assert [r["method"] for r in first["rows"]] == ["sparse_gpt2", "prune_ls"]
    assert all(r["ppl_calibration_only"] > first["dense"]["perplexity"] and "ppl_healed" in r for r in first["rows"])
    stdout = run("bench_quality.py", *common, "--ratios", "0.4,0.2", "--resume", "--deadline_minutes", "0")
    second = json.loads((tmp_path / "q.json").read_text())
    assert second["rows"] == first["rows"]  # the 0.4 rows kept as they were, none started at 0.2
    assert "deadline: not starting sparse_gpt2 at 0.2" in stdout


def test_bench_distributed_cpu_smoke_runs_one_process_ddp_and_fsdp(tmp_path):
    out = tmp_path / "dist.json"
    run("bench_distributed.py", "--cpu", "--tiny", "--block_size", "64", "--steps", "4", "--warmup_steps", "1",
        "--global_batch", "4", "--output", str(out))
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"single", "ddp_x2", "fsdp_x2"}
    for name in ("ddp_x2", "fsdp_x2"):
        assert len(runs[name]["losses"]) == 4 and runs[name]["max_relative_loss_difference"] < 1e-2
        assert runs[name]["tokens_per_s"] > 0 and runs[name]["speedup"] > 0
