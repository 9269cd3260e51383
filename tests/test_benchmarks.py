"""The benchmarks: their honesty rules (harness) and a CPU smoke run of each in the default test run."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent

from benchmarks import bench_all, bench_decode, bench_e2e, bench_ffn, bench_healing, make_report, profile_ffn, profile_step
from benchmarks import harness as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
TINY = ["--tiny", "--device", "cpu"]


# ---------------------------------------------------------------------------- harness rules
def test_kernel_time_counts_each_kernel_once():
    """A CPU operator carries its kernels' time as well: only device-side events are summed."""
    op = FunctionEvent(id=1, name="aten::mm", thread=0, start_us=0, end_us=100, use_device="cuda")
    op.append_kernel("gemm", 0, 40)
    gemm = FunctionEvent(id=2, name="gemm", thread=0, start_us=10, end_us=50, use_device="cuda", device_type=DeviceType.CUDA)
    copy = FunctionEvent(id=3, name="Memcpy HtoD", thread=0, start_us=60, end_us=65, use_device="cuda", device_type=DeviceType.CUDA)
    assert op.device_time_total == 40  # the double count the old sum over every row made
    assert H.kernel_ms_of_events([op, gemm, copy]) == pytest.approx(0.045)


def test_settle_waits_until_a_drifting_time_is_flat():
    # the drift seen in one ideal row: 0.152 -> 0.093 ms over the samples, then flat
    drifting = [0.152 * 0.94**i for i in range(9)] + [0.093] * 10
    calls = iter(drifting)
    out = H.settle(lambda: next(calls), min_samples=1, max_samples=30, tol=0.02)
    assert out["settled"] and out["warmup_samples"] >= 10  # not before the flat part has three samples
    never = iter([1.0 * 1.1**i for i in range(30)])
    out = H.settle(lambda: next(never), min_samples=1, max_samples=6, tol=0.02)
    assert out == dict(warmup_samples=6, settled=False, warmup_ms=out["warmup_ms"])


def test_git_state_names_the_commit_and_a_dirty_tree(tmp_path):
    def git(*cmd):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "code.py").write_text("a = 1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x")
    clean = H.git_state(tmp_path, ignore=("results/",))
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and "diff_sha256" not in clean
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "out.json").write_text("{}")  # what a benchmark writes does not dirty the tree
    assert H.git_state(tmp_path, ignore=("results/",))["dirty"] is False
    (tmp_path / "code.py").write_text("a = 2\n")
    dirty = H.git_state(tmp_path, ignore=("results/",))
    assert dirty["dirty"] is True and dirty["dirty_files"] == ["code.py"] and len(dirty["diff_sha256"]) == 64
    (tmp_path / "code.py").write_text("a = 3\n")
    assert H.git_state(tmp_path, ignore=("results/",))["diff_sha256"] != dirty["diff_sha256"]
    assert H.git_state(tmp_path / "results")["commit"] is not None  # inside the repository too
    assert H.git_state("/")["commit"] is None  # no repository: recorded as such, not guessed
    before = H.source_sha256(tmp_path, folders=("",))
    (tmp_path / "code.py").write_text("a = 4\n")
    assert H.source_sha256(tmp_path, folders=("",)) != before


def test_rows_past_the_budget_are_recorded_as_skipped_with_no_ratios(tmp_path):
    data = bench_ffn.main(TINY + ["--budget-s", "1e-9", "--output", str(tmp_path / "ffn.json")])
    rows = json.loads((tmp_path / "ffn.json").read_text())["ffn"]["rows"]
    assert rows == data["ffn"]["rows"] and len(rows) == 3
    assert all(r["status"] == "skipped" and "time budget" in r["reason"] for r in rows)
    assert all(r["fwd_bwd_median_ms_vs_dense"] is None and r["fwd_median_ms_vs_ideal"] is None for r in rows)


def test_the_ideal_is_plain_gpt2_as_wide_as_the_sparse_ffns_fused_down_projection():
    S = dict(device="cpu", gpu=False, dtype="fp32", align=16, sparse_kwargs={})
    models, info = H.build_models(H.TINY, 0.4, S)
    sparse_ffn = models["sparse"].transformer.h[0].mlp
    width = H.fused_width(sparse_ffn)
    assert width % 16 == 0 and info["ideal"]["inner"] == width == models["ideal"].config.n_inner
    assert info["sparse"]["ffn_flops_ratio"] == pytest.approx(width / (4 * H.TINY["n_embd"]))
    assert info["sparse"]["ffn_flops_ratio"] <= 0.4 and models["ideal"].transformer.h[0].mlp.c_fc.nf == width


# ---------------------------------------------------------------------------- smoke runs (seconds each)
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (on a shared CPU, idle threads spinning made each matmul ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ok(rows):
    assert rows and all(r["status"] == "ok" for r in rows), [H.row_summary(r) for r in rows if r["status"] != "ok"]


def smoke(module, tmp_path, *args) -> dict:
    """``module.main`` with the tiny settings on the CPU; the JSON it wrote, checked to name its run."""
    out = tmp_path / "out.json"
    module.main(TINY + list(args) + ["--output", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == module.__name__.split(".")[-1]
    assert {"commit", "dirty", "torch", "transformers", "command", "date_utc"} <= set(data["environment"])
    return data


def test_bench_ffn_smoke(tmp_path):
    data = smoke(bench_ffn, tmp_path, "--ratios", "0.5,0.3")
    rows = data["ffn"]["rows"]
    _ok(rows)
    assert [(r["kind"], r["target"]) for r in rows] == [("dense", None)] + [(k, t) for t in (0.5, 0.3) for k in ("sparse", "ideal")]
    for r in rows:
        for key in ("fwd", "fwd_bwd"):
            assert r[key]["median_ms"] > 0 and len(r[key]["reps_ms"]) == 2 and {"settled", "warmup_samples", "drift"} <= set(r[key])
    dense = rows[0]
    for sparse, ideal in (rows[1:3], rows[3:5]):  # each sparse FFN against its own ideal and the one dense MLP
        assert sparse["fwd_bwd_median_ms_vs_ideal"] == pytest.approx(sparse["fwd_bwd"]["median_ms"] / ideal["fwd_bwd"]["median_ms"])
        assert sparse["fwd_median_ms_vs_dense"] == pytest.approx(sparse["fwd"]["median_ms"] / dense["fwd"]["median_ms"])
        assert sparse["inner"] == ideal["inner"] and sparse["fwd_gpu_kernel_ms_vs_dense"] is None  # no GPU: no kernel time
    assert rows[3]["inner"] < rows[1]["inner"]
    table = make_report.kernel_tables(dict(data, ffn_cpu=data.pop("ffn")))
    assert "| eager | 64 | 0.5 | fwd_bwd |" in table


def test_bench_e2e_smoke(tmp_path):
    data = smoke(bench_e2e, tmp_path)
    rows = data["e2e"]["rows"]
    _ok(rows)
    assert {(r["stage"], r["mode"], r["kind"]) for r in rows} == {(s, "eager", k) for s in ("train", "prefill") for k in ("dense", "sparse", "ideal")}
    assert set(data["e2e"]["models"]) == {"dense", "sparse@0.4", "ideal@0.4"}
    assert all(r["tokens_per_s"] > 0 and r["median_ms_vs_dense"] > 0 for r in rows)
    assert "| train | eager | 0.4 | time |" in make_report.kernel_tables(data)


def test_bench_e2e_isolation_times_each_row_in_a_fresh_process(tmp_path, monkeypatch):
    """--isolation process (the GPU default): every row comes from its own spawned process, which
    builds its model afresh; the parent's models are not the ones timed."""
    parent_calls = []
    monkeypatch.setattr(bench_e2e, "measure_prefill", lambda *a: parent_calls.append(a) or {})
    data = smoke(bench_e2e, tmp_path, "--stages", "prefill", "--isolation", "process")
    rows = data["e2e"]["rows"]
    _ok(rows)
    assert parent_calls == [] and all(r["isolated_process"] and r["tokens_per_s"] > 0 for r in rows)
    assert [r["kind"] for r in rows] == ["dense", "sparse", "ideal"] and data["settings"]["isolation"] is True


def test_bench_decode_smoke_and_the_step_it_times_is_a_true_decode_step(tmp_path):
    data = smoke(bench_decode, tmp_path, "--batches", "2")
    rows = data["decode"]["rows"]
    measured = [r for r in rows if r["status"] == "ok"]
    assert {(r["stage"], r["mode"]) for r in measured} == {("generate", "eager"), ("step", "eager")}
    skipped = [r for r in rows if r["status"] != "ok"]
    assert {(r["stage"], r["mode"], r["status"], r["reason"]) for r in skipped} == {
        ("generate", "cuda_graphs", "skipped", "cuda_graphs needs CUDA"), ("step", "cuda_graph", "skipped", "cuda_graph needs CUDA")}
    assert all(r["median_ms_vs_dense"] is None for r in skipped)
    # the timed step (prompt in a static cache, one token) gives the logits of the full forward, every call
    S = bench_decode.settings(bench_decode.parse_args(TINY))
    models, _ = H.build_models(S["model"], 0.4, S, kinds=("sparse",))
    model = models["sparse"].eval()
    step = bench_decode.decode_step(model, S, batch=2)
    ids = bench_decode.prompt(model, S, 2)
    with torch.no_grad():
        full = model(torch.cat([ids, ids[:, -1:]], dim=1)).logits[:, -1]
    for _ in range(2):
        torch.testing.assert_close(step()[:, -1], full, atol=1e-4, rtol=1e-4)


def test_bench_healing_smoke(tmp_path):
    data = smoke(bench_healing, tmp_path, "--steps", "2")
    rows = data["healing"]["rows"]
    _ok(rows)
    sparse, pruned = rows
    assert (sparse["kind"], pruned["kind"]) == ("sparse", "pruned") and sparse["inner"] == pruned["inner"]
    assert len(sparse["step_ms"]) == 2 and sparse["tokens_per_s"] > 0
    assert sparse["median_ms_vs_pruned"] == pytest.approx(sparse["median_ms"] / pruned["median_ms"])


def test_bench_all_smoke_writes_every_section_asked_for_in_the_order_asked(tmp_path, capsys):
    data = smoke(bench_all, tmp_path, "--sections", "ffn_cpu,ffn", "--ffn-args", "--ratios 0.4")
    assert set(data) >= {"ffn", "ffn_cpu"} and not {"e2e", "decode", "healing"} & set(data)
    _ok(data["ffn"]["rows"] + data["ffn_cpu"]["rows"])
    assert {r["target"] for r in data["ffn"]["rows"]} == {None, 0.4} and data["ffn_cpu"]["settings"]["dtype"] == "fp32"
    out = capsys.readouterr().out
    assert "sparse  @0.4" in out
    assert out.index("[ffn_cpu] t=") < out.index("[ffn] t="), "a short budget must reach the sections named first"
    with pytest.raises(SystemExit, match="--sections: unknown"):
        bench_all.main(TINY + ["--sections", "ffn,warp", "--output", str(tmp_path / "x.json")])


def test_make_report_builds_the_docs_tables_from_the_committed_results():
    load = make_report.load
    table = make_report.ffn_table(load("speed_ffn_h200.json"))
    assert "| graphs | 1600 | sparse | 0.400 | 0.54 | 0.68 |" in table
    e2e = make_report.e2e_table(load("speed_e2e_h200.json"), [load(n) for n in make_report.DECODE_RUNS])
    assert "| prefill ms, compiled blocks | 4.92 (**1.00x**)" in e2e
    assert "| 0.4 | sparse-gpt2 (default: polynomial + spectral + feedback) | 0.400 | 15.233 |" in make_report.quality_tables(load("quality.json"))


def test_profile_ffn_builds_each_component_set_within_the_budget():
    S = dict(device="cpu", gpu=False, dtype="fp32", align=1, sparse_kwargs={})
    built = profile_ffn.modules(64, 0.5, S)
    assert list(built) == ["dense", "ideal", *profile_ffn.COMPONENT_SETS]
    for name, comps in profile_ffn.COMPONENT_SETS.items():
        ffn, info = built[name]
        assert list(ffn.components) == comps and 0.45 < info["ffn_flops_ratio"] <= 0.5


def test_kernel_breakdown_groups_device_events_by_name_per_call():
    gemm = [FunctionEvent(id=i, name="gemm", thread=0, start_us=10 * i, end_us=10 * i + 4, use_device="cuda",
                          device_type=DeviceType.CUDA) for i in range(4)]
    act = FunctionEvent(id=9, name="act", thread=0, start_us=90, end_us=91, use_device="cuda", device_type=DeviceType.CUDA)
    op = FunctionEvent(id=10, name="aten::mm", thread=0, start_us=0, end_us=100, use_device="cuda")
    graph = FunctionEvent(id=11, name="## Call CompiledFxGraph f1 ##", thread=0, start_us=0, end_us=95, use_device="cuda",
                          device_type=DeviceType.CUDA, is_user_annotation=True)  # spans the kernels: not one itself
    rows = H.kernel_breakdown(gemm + [act, op, graph], calls=2)
    assert rows == [dict(name="gemm", ms=0.008, launches=2.0), dict(name="act", ms=0.0005, launches=0.5)]
    assert H.kernel_ms_of_events(gemm + [act, op, graph]) == pytest.approx(0.017)


def test_profile_ffn_refuses_unknown_variants_naming_the_flag():
    with pytest.raises(SystemExit, match="--profile: unknown bogus"):
        profile_ffn.main(["--device", "cpu", "--variants", "none", "--profile", "ideal,bogus"])


def _trace_event(cat, name, ts, dur, tid=1, correlation=None):
    return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, tid=tid, args={} if correlation is None else {"correlation": correlation})


def test_step_gaps_split_host_late_from_device_gaps_and_name_the_launching_op():
    """Kernel a runs 0-10; b, launched at 2 (queued early), starts at 30: a 20 us device gap; c, launched
    at 78 from aten::mm inside the block's range, starts at 80 after the GPU idled 42 us: host-late,
    charged to the innermost op (aten::mm, not the enclosing range); d overlaps c (busy counted once)."""
    events = [
        _trace_event("user_annotation", "block", 70, 20),
        _trace_event("cpu_op", "aten::mm", 75, 5),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 1, 1, correlation=1),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 2, 1, correlation=2),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 78, 1, correlation=3),
        _trace_event("cuda_runtime", "cudaLaunchKernel", 79, 1, correlation=4),
        _trace_event("kernel", "a", 0, 10, tid=7, correlation=1),
        _trace_event("kernel", "b", 30, 8, tid=7, correlation=2),
        _trace_event("kernel", "c", 80, 10, tid=7, correlation=3),
        _trace_event("kernel", "d", 85, 10, tid=8, correlation=4),
    ]
    out = profile_step.analyse(events, calls=1)
    assert out["kernels_per_call"] == 4 and out["span_us"] == 95 and out["busy_us"] == 33
    assert out["idle_us"] == 62 and out["device_gap_us"] == 20 and out["host_late_us"] == 42
    assert out["host_late_by_op"] == [dict(op="aten::mm", us=42.0, gaps=1.0)]
    assert out["largest_gaps"][0] == dict(gap_us=42, host_late=True, kernel="c", launched_by="aten::mm")
    assert profile_step.analyse([], calls=1)["kernels_per_call"] == 0


def test_profile_step_smoke_profiles_each_stage_mode_and_kind(tmp_path):
    out = tmp_path / "gaps.json"
    rows = profile_step.main([*TINY, "--stages", "train,prefill", "--modes", "eager", "--steps", "1", "--output", str(out)])
    assert [(r["stage"], r["kind"]) for r in rows] == [("train", "ideal"), ("train", "sparse"), ("prefill", "ideal"), ("prefill", "sparse")]
    assert json.loads(out.read_text())["rows"][1]["kind"] == "sparse"


def test_profile_host_replays_true_decode_steps_on_the_sparse_models_cuda_path():
    """profile_host's calls: the sparse blocks take the kernels path (one stubbed Triton launch per
    block, none in GPT-2's), and each decode call after its setup is one step at position 16 of a
    cache holding the prompt."""
    from benchmarks import profile_host as P
    from modeling_sparse_gpt2 import ffn_kernels

    if ffn_kernels.triton is None:
        pytest.skip("profile_host stubs Triton's launcher")
    with P.LaunchStub([ffn_kernels]) as stub, torch.no_grad():
        for kind, model in P.build(2, torch.float32).items():
            calls = P.calls_of(model)
            assert list(calls) == list(P.CALLS)
            for name, (setup, step) in calls.items():
                assert P.dispatched_ops(setup, step, stub)["triton"] == (2 if kind.startswith("sparse") else 0), (kind, name)
                if name != "prefill":
                    setup()
                    step()
                    assert step.cache.get_seq_length() == P.PROMPT + 1, (kind, name)


def test_profile_host_compile_needs_a_gpu():
    """--compile times compiled blocks' real launches; on the CPU (launcher stubbed) there is nothing to time."""
    from benchmarks import profile_host as P

    with pytest.raises(SystemExit):
        P.parse_args(["--compile"])
    assert P.parse_args(["--compile", "--device", "cuda"]).compile


def test_profile_host_measures_the_chosen_models_and_calls_beside_the_ideal(tmp_path):
    """--models / --call-kinds: only those rows are built and timed (--compile defaults to the compiled question's
    few, so compiling fits a device call); the ideal cannot be left out, and an unknown name is refused."""
    from benchmarks import profile_host as P
    from modeling_sparse_gpt2 import ffn_kernels

    args = P.parse_args(["--compile", "--device", "cuda"])
    assert (args.models, args.call_kinds) == (list(P.COMPILE_DEFAULT[0]), list(P.COMPILE_DEFAULT[1]))
    assert P.parse_args(["--call-kinds", "decode_static,prefill"]).call_kinds == ["prefill", "decode_static"]  # the table's order
    assert (P.parse_args([]).models, P.parse_args([]).call_kinds) == (list(P.MODELS), list(P.CALLS))
    for bad in (["--models", "sparse_poly"], ["--models", "ideal,gelu"], ["--call-kinds", "decode"], ["--call-kinds", ""]):
        with pytest.raises(SystemExit):
            P.parse_args(bad)
    if ffn_kernels.triton is None:
        pytest.skip("profile_host stubs Triton's launcher")
    threads = torch.get_num_threads()
    result = P.main(["--smoke", "--models", "ideal,sparse_poly", "--call-kinds", "prefill", "--output", str(tmp_path / "h.json")])
    # the process's settings come back as they were: one thread and flushed denormals broke later tests
    assert torch.get_num_threads() == threads and torch.tensor(1e-40).item() != 0.0
    assert [(r["model"], r["call"]) for r in result["rows"]] == [("ideal", "prefill"), ("sparse_poly", "prefill")]
    assert set(result["models"]) == {"ideal", "sparse_poly"} and "cprofile_sparse_poly_prefill" in result
    assert "cprofile_sparse_psf_decode_dynamic" not in result
    assert {key.split("/")[2] for key in result["samples_us_per_call"]} == {"prefill"}  # nothing else was timed
    assert json.loads((tmp_path / "h.json").read_text())["rows"] == result["rows"]


# ---------------------------------------------------------------------------- the long benchmarks (slow)
def run_module(module, *args, timeout=900):
    res = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_bench_quality_resumes_its_rows_and_records_those_after_the_deadline_as_skipped(tmp_path):
    from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_CALIBRATION, DEFAULT_MODEL, DEFAULT_VALIDATION, load_tokenizer
    from modeling_sparse_gpt2.tooling.data import load_texts, token_stream

    tok = load_tokenizer(DEFAULT_MODEL)
    for split, path in (("train", DEFAULT_CALIBRATION), ("validation", DEFAULT_VALIDATION)):
        np.save(tmp_path / f"{split}.npy", token_stream(load_texts(path), tok).numpy().astype(np.uint16))
    common = ["--train_tokens", str(tmp_path / "train.npy"), "--validation_tokens", str(tmp_path / "validation.npy"),
              "--tokenizer_name_or_path", DEFAULT_MODEL, "--dense_model", DEFAULT_MODEL, "--work_dir", str(tmp_path / "work"),
              "--output", str(tmp_path / "q.json"), "--heal_steps", "2", "--heal_batch", "2", "--calibration_samples", "10",
              "--max_eval_tokens", "4096", "--methods", "sparse_gpt2,prune_ls", "--extra_methods", ""]
    run_module("bench_quality", *common, "--ratios", "0.4")
    first = json.loads((tmp_path / "q.json").read_text())
    assert [r["method"] for r in first["rows"]] == ["sparse_gpt2", "prune_ls"] and "commit" in first["environment"]
    assert all(r["status"] == "ok" and r["ppl_calibration_only"] > first["dense"]["perplexity"] and "ppl_healed" in r
               for r in first["rows"])
    stdout = run_module("bench_quality", *common, "--ratios", "0.4,0.2", "--resume", "--deadline_minutes", "0")
    second = json.loads((tmp_path / "q.json").read_text())
    assert second["rows"][:2] == first["rows"]  # the 0.4 rows kept as they were
    assert [(r["method"], r["status"]) for r in second["rows"][2:]] == [("sparse_gpt2", "skipped"), ("prune_ls", "skipped")]
    assert "deadline: not starting sparse_gpt2 at 0.2" in stdout


@pytest.mark.slow
def test_bench_distributed_cpu_smoke_runs_one_process_ddp_and_fsdp(tmp_path):
    out = tmp_path / "dist.json"
    run_module("bench_distributed", "--cpu", "--tiny", "--block_size", "64", "--steps", "4", "--warmup_steps", "1",
               "--global_batch", "4", "--output", str(out))
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert set(runs) == {"single", "ddp_x2", "fsdp_x2"} and "commit" in result["environment"]
    for name in ("ddp_x2", "fsdp_x2"):
        assert len(runs[name]["losses"]) == 4 and runs[name]["max_relative_loss_difference"] < 1e-2
        assert runs[name]["tokens_per_s"] > 0 and runs[name]["speedup"] > 0


def test_chebyshev_fit_error_falls_with_the_degree_and_grows_with_the_domain(tmp_path):
    """The numbers docs/benchmarks.md §2.3 quotes for the activation's approximation: a higher degree fits
    GELU better at the conversion's wide domains; a bad list is refused naming the flags."""
    from benchmarks import chebyshev_fit_error

    out = tmp_path / "fit.json"
    rows = chebyshev_fit_error.main(["--degrees", "8,16", "--domains", "4,8", "--sigmas", "2", "--samples", "20000",
                                     "--output", str(out)])
    err = {(r["domain"], r["degree"]): r["relative_rms_error"] for r in rows}
    assert err[(8.0, 16)] < err[(8.0, 8)] / 4 and err[(4.0, 8)] < err[(8.0, 8)]
    assert 0.01 < err[(8.0, 8)] < 0.2 and json.loads(out.read_text())["rows"] == rows
    with pytest.raises(SystemExit, match="--degrees"):
        chebyshev_fit_error.main(["--degrees", "eight"])


# ---------------------------------------------------------------------------- a device sitting (sitting.sh)
def run_sitting(env, timeout=600):
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "sitting.sh")], env=dict(ENV, **env),
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_sitting_refuses_missing_tokens_or_tokenizer_in_one_line_before_writing_anything(tmp_path):
    job, tokens = tmp_path / "job", tmp_path / "tokens"
    tokens.mkdir()
    env = {"JOB_DIR": str(job), "TOKENS": "", "TOKENIZER": ""}
    cases = [({}, "TOKENS: not set"), ({"TOKENS": str(tokens)}, "TOKENS: no train.npy or train.npy.xz"),
             ({"TOKENS": str(tokens), "TOKENIZER": str(tmp_path)}, "TOKENIZER: not a folder with GPT-2's vocab.json"),
             ({"SMOKE": "1", "HOST_STEPS": "eager compild"}, "HOST_STEPS: 'compild' is neither eager nor compiled"),
             ({"SMOKE": "1", "SPEED": "decode; ffn --ffn-args '--ratios 0.4"}, "SPEED: cannot split ' ffn --ffn-args")]
    for given, problem in cases:
        if given.get("TOKENIZER"):  # the tokens are there now (compressed): the tokenizer is what is missing
            for split in ("train", "validation"):
                (tokens / f"{split}.npy.xz").write_bytes(b"")
        res = run_sitting(dict(env, **given))
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and problem in res.stderr, res.stderr
        assert not job.exists()


@pytest.mark.slow
def test_sitting_smoke_runs_host_work_curve_rows_and_speed_rows_and_resumes_in_its_folder(tmp_path):
    """SMOKE=1: every step of a sitting on the CPU; the curve row it was given is healed to its last point,
    a malformed row is reported, and a second call in the same folder resumes the curve (nothing re-healed)."""
    job = tmp_path / "job"
    env = {"SMOKE": "1", "JOB_DIR": str(job), "JOB_SECONDS": "500", "TAIL_S": "60", "ROWS": "0.4 prune_ls;oops"}
    res = run_sitting(env)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "ROWS: 'oops' is not 'RATIO METHOD'" in res.stdout
    for name in ("host_cost.json", "speed_1.json", "curve/healing_curve.json", "curve/healing_curve.md", "sitting.log"):
        assert (job / name).is_file(), name
    curve = json.loads((job / "curve" / "healing_curve.json").read_text())
    assert [(r["key"], r["status"]) for r in curve["rows"]] == [("prune_ls@0.4", "done")]
    assert json.loads((job / "speed_1.json").read_text())["settings"]["sections"] == ["decode", "e2e"]
    # no host work; an extra command; two speed calls, the second with quoted flags of its own
    again = run_sitting(dict(env, ROWS="0.4 prune_ls", HOST_STEPS="", EXTRA_STEPS="echo swept > $JOB_DIR/swept.txt",
                             SPEED="decode; ffn --ffn-args '--ratios 0.3 --modes eager'"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert "host_eager" not in again.stdout and (job / "swept.txt").read_text() == "swept\n"
    ffn = json.loads((job / "speed_2.json").read_text())
    assert ffn["settings"]["sections"] == ["ffn"] and {r["target"] for r in ffn["ffn"]["rows"]} == {None, 0.3}
    assert "all rows done" in (job / "curve_prune_ls_0.4.log").read_text()
    assert json.loads((job / "curve" / "healing_curve.json").read_text())["rows"] == curve["rows"]


# ---------------------------------------------------------------------------- kernel tiles offline (no GPU)
def test_kernel_tiles_read_their_suffixes_round_trip_and_refuse_malformed_ones():
    from benchmarks.harness import parse_tiles, tile_name

    tiles = parse_tiles("64x128x8, 4x128x4r,8x128x8rfp106,4x128x4rfs5,")
    assert tiles == [dict(tokens=64, columns=128, warps=8, in_registers=False, prefetch=False, token_programs=None),
                     dict(tokens=4, columns=128, warps=4, in_registers=True, prefetch=False, token_programs=None),
                     dict(tokens=8, columns=128, warps=8, in_registers=True, prefetch=True, token_programs=106),
                     dict(tokens=4, columns=128, warps=4, in_registers=True, prefetch=True, token_programs=None,
                          programs_per_sm=5)]
    assert [tile_name(t) for t in tiles] == ["64x128x8", "4x128x4r", "8x128x8rfp106", "4x128x4rfs5"]
    for bad in ("4x128", "4x128x4q", "0x128x4", "4x128x4rfs0", "4x128x4s5r"):
        with pytest.raises(SystemExit, match=f"--sweep: '{bad}' is not TOKENSxCOLUMNSxWARPS"):
            parse_tiles(f"64x128x8,{bad}")


def test_fastest_tile_is_the_one_whose_polynomial_backward_kernel_took_least_gpu_time():
    """The sweep ranks tiles by the kernel's own GPU time, not the whole call's wall time."""
    from benchmarks.kernel_microbench import fastest_tile

    def entry(spec, wall, kernel):
        from benchmarks.harness import parse_tiles

        return dict(parse_tiles(spec)[0], backward_ms=wall, kernel_ms={"_backward_kernel": kernel, "other": 9.0})

    result = {"backward": [{"sweep": [entry("64x128x8", 0.1, 0.30), entry("4x128x4rf", 0.5, 0.05),
                                      entry("8x128x8r", 0.2, 0.07)]}, {"sweep": []}]}
    assert fastest_tile(result) == "4x128x4rf"
    with pytest.raises(SystemExit, match="no sweep entry"):
        fastest_tile({"backward": [{"sweep": [dict(tokens=4, columns=8, warps=1, backward_ms=1.0)]}]})


def test_fastest_flat_is_the_forward_and_backward_whose_kernels_took_least_gpu_time():
    """``--fastest-flat-of`` reads a flat sweep: the fastest forward and backward items by their kernels' GPU
    time (wall time does not count), spelled for ``--flat-tile``; ``fwd:off`` / ``bwd:off`` for a side the tiled
    kernels won, ``off`` when they won both."""
    from benchmarks.kernel_microbench import fastest_flat

    def entry(item, side, kernels_ms, ms=1.0):
        return dict(item=item, side=side, ms=ms, kernels_ms=kernels_ms)

    sweep = [entry("off", "forward", 0.017), entry("off", "backward", 0.036), entry("fwd:1024x4x4h", "forward", 0.011),
             entry("fwd:2048x8x4h", "forward", 0.012, ms=0.001), entry("bwd:1024x4x8p", "backward", 0.025),
             entry("bwd:512x4x8p", "backward", 0.021)]
    assert fastest_flat({"flat": [{"sweep": sweep}]}) == "fwd:1024x4x4h+bwd:512x4x8p"
    tiled_wins = [entry("off", "forward", 0.01), entry("off", "backward", 0.01), entry("fwd:1024x4x4h", "forward", 0.02)]
    assert fastest_flat({"flat": [{"sweep": tiled_wins}]}) == "off"
    backward_tiled = [entry("off", "forward", 0.02), entry("off", "backward", 0.01), entry("fwd:1024x4x4h", "forward", 0.01),
                      entry("bwd:1024x4x4p", "backward", 0.02)]
    assert fastest_flat({"flat": [{"sweep": backward_tiled}]}) == "fwd:1024x4x4h+bwd:off"
    forward_tiled = [entry("off", "forward", 0.01), entry("off", "backward", 0.03), entry("fwd:1024x4x4h", "forward", 0.02),
                     entry("bwd:1024x4x4p", "backward", 0.02)]
    assert fastest_flat({"flat": [{"sweep": forward_tiled}]}) == "fwd:off+bwd:1024x4x4p"
    with pytest.raises(SystemExit, match="no flat sweep entry"):
        fastest_flat({"flat": [{"sweep": [dict(item="off", side="forward", ms=1.0)]}]})


def test_flat_tile_flag_sets_the_flat_kernels_and_the_settings_record_it(monkeypatch):
    import argparse

    from benchmarks import harness as H
    from modeling_sparse_gpt2 import ffn_kernels as fk

    monkeypatch.setattr(fk, "FLAT_TILE", dict(fk.FLAT_TILE))
    p = H.add_common_args(argparse.ArgumentParser(), output=None)
    S = H.common_settings(p.parse_args(["--device", "cpu", "--flat-tile", "fwd:2048x8x2+bwd:512x2x16p"]), budget_s=1.0)
    assert fk.FLAT_TILE == S["flat_tile"]
    assert (fk.FLAT_TILE["forward_block"], fk.FLAT_TILE["forward_warps"], fk.FLAT_TILE["forward_per_sm"]) == (2048, 8, 2)
    assert fk.FLAT_TILE["horner"] is False and fk.FLAT_TILE["prefetch"] is True
    assert fk.FLAT_TILE["forward_on"] is True and fk.FLAT_TILE["backward_on"] is True
    assert fk.FLAT_TILE["backward_block"] == 512 and fk.FLAT_TILE["backward_per_sm"] == 16
    monkeypatch.setattr(fk, "FLAT_TILE", dict(fk.FLAT_TILE, forward_on=False, forward_block=64))  # a fresh process
    H.configure_torch(S)
    assert fk.FLAT_TILE == S["flat_tile"]
    S = H.common_settings(p.parse_args(["--device", "cpu", "--flat-tile", "off"]), budget_s=1.0)
    assert fk.FLAT_TILE["forward_on"] is fk.FLAT_TILE["backward_on"] is False and S["flat_tile"] == fk.FLAT_TILE
    S = H.common_settings(p.parse_args(["--device", "cpu", "--flat-tile", "fwd:512x4x8h+bwd:off"]), budget_s=1.0)
    assert (fk.FLAT_TILE["forward_on"], fk.FLAT_TILE["backward_on"], fk.FLAT_TILE["forward_block"]) == (True, False, 512)
    for bad, says in (("fwd:1024x4x4p", "is not fwd:"), ("bwd:1000x4x8p", "power of two"), ("fwd:1024x4", "is not")):
        with pytest.raises(SystemExit, match=f"--flat-tile: .*{says}"):
            H.common_settings(p.parse_args(["--device", "cpu", "--flat-tile", bad]), budget_s=1.0)
    spec = "fwd:1024x4x4h,bwd:256x1x16,off,fwd:off,bwd:off"
    assert [H.flat_item_name(i) for i in H.parse_flat_tile_items(spec)] == spec.split(",")


def test_backward_tile_flag_sets_the_kernel_tile_and_the_settings_record_it(monkeypatch):
    import argparse

    from benchmarks import harness as H
    from modeling_sparse_gpt2 import ffn_kernels as fk

    monkeypatch.setattr(fk, "BACKWARD_TILE", dict(fk.BACKWARD_TILE))
    p = H.add_common_args(argparse.ArgumentParser(), output=None)
    S = H.common_settings(p.parse_args(["--device", "cpu", "--backward-tile", "4x128x4rf"]), budget_s=1.0)
    assert fk.BACKWARD_TILE["tokens"] == 4 and fk.BACKWARD_TILE["prefetch"] is True
    assert S["backward_tile"] == fk.BACKWARD_TILE and S["backward_tile"]["warps"] == 4
    monkeypatch.setattr(fk, "BACKWARD_TILE", dict(fk.BACKWARD_TILE, tokens=64, prefetch=False))  # a fresh process
    H.configure_torch(S)  # ... which each isolated row calls first: the run's tile, not the default
    assert fk.BACKWARD_TILE == S["backward_tile"]
    with pytest.raises(SystemExit, match="--backward-tile: one tile"):
        H.common_settings(p.parse_args(["--device", "cpu", "--backward-tile", "4x128x4,8x128x8"]), budget_s=1.0)


def test_forward_tile_flag_sets_the_kernel_tile_and_the_settings_record_it(monkeypatch):
    import argparse

    from benchmarks import harness as H
    from modeling_sparse_gpt2 import ffn_kernels as fk

    monkeypatch.setattr(fk, "FORWARD_TILE", dict(fk.FORWARD_TILE))
    p = H.add_common_args(argparse.ArgumentParser(), output=None)
    S = H.common_settings(p.parse_args(["--device", "cpu", "--forward-tile", "16x128x8"]), budget_s=1.0)
    assert fk.FORWARD_TILE == S["forward_tile"] == dict(tokens=16, columns=128, warps=8)
    monkeypatch.setattr(fk, "FORWARD_TILE", dict(tokens=32, columns=64, warps=4))  # a fresh process
    H.configure_torch(S)
    assert fk.FORWARD_TILE == S["forward_tile"]
    for bad, says in (("16x128x8,8x64x4", "one tile"), ("16x128", "not TOKENSxCOLUMNSxWARPS")):
        with pytest.raises(SystemExit, match=f"--forward-tile: .*{says}"):
            H.common_settings(p.parse_args(["--device", "cpu", "--forward-tile", bad]), budget_s=1.0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its ptxas)")
def test_kernel_registers_compiles_for_sm90_and_the_register_sums_do_not_spill(tmp_path):
    """The backward with its coefficient sums in registers exists to keep small tiles free of
    cross-warp reductions and spills: compiled for sm_90 by triton's ptxas, it uses no local memory."""
    from benchmarks import kernel_registers

    out = tmp_path / "regs.json"
    result = kernel_registers.main(["--tiles", "4x128x4r", "--output", str(out)])
    forward, flat_forward, flat_backward, backward = result["rows"]
    assert forward["kernel"] == "_forward_kernel" and backward["in_registers"] is True
    assert (flat_forward["kernel"], flat_backward["kernel"]) == ("_flat_forward_kernel", "_flat_backward_kernel")
    for row in result["rows"]:
        assert 0 < row["registers"] <= 255 and row["resident_per_sm"] >= 1
    for row in (backward, flat_forward):
        assert row["spill_store_bytes"] == row["spill_load_bytes"] == 0
    # the flat backward, capped at 128 registers so that 4 programs fit an SM, spills one register's word
    assert flat_backward["registers"] <= 128 and flat_backward["spill_store_bytes"] <= 8
    # the loops' static cost per element: the flat backward's even-series loop is the cheaper one, and both
    # flat kernels' loops are cheaper than the tiled backward's (vector loads, no column masks)
    even, general = flat_backward["loop_instructions_per_element"][:2]
    assert even < general < backward["loop_instructions_per_element"][1]
    assert flat_forward["loop_instructions_per_element"][0] < even
    assert json.loads(out.read_text())["rows"] == result["rows"]


def test_kernel_registers_compiles_each_flat_setting_so_that_its_wave_fits_an_sm():
    """``--flat`` compiles flat-kernel settings beside the default's, each with the register cap its launch
    passes: every setting's programs per SM fit on one SM at once (the flat grid is one wave of them), and a
    setting with fewer programs per SM is allowed more registers."""
    from benchmarks import kernel_registers

    result = kernel_registers.main(["--tiles", "", "--flat", "bwd:1024x4x2p,bwd:512x4x6,fwd:512x2x16h"])
    rows = {row["setting"]: row for row in result["rows"] if row["kernel"].startswith("_flat")}
    assert {"bwd:1024x4x2p", "bwd:512x4x6", "fwd:512x2x16h"} <= set(rows)
    assert rows["fwd:512x2x16h"]["kernel"] == "_flat_forward_kernel"
    assert rows["bwd:512x4x6"]["kernel"] == "_flat_backward_kernel"
    for row in rows.values():
        assert row["resident_per_sm"] >= row["per_sm"], row
    assert rows["bwd:1024x4x2p"]["registers"] > 128 >= rows["bwd:1024x4x4p"]["registers"]
