"""The scripts and the main job, as a user runs them (tiny models, real embedded text). The convert
script's refusals run its ``main`` in this process, and one of them as the script too."""

import json
import os
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import modeling_sparse_gpt2  # noqa: F401  (registers sparse_gpt2)
from modeling_sparse_gpt2.tooling import cli
from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_CALIBRATION, DEFAULT_MODEL, DEFAULT_VALIDATION, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), *map(str, args)],
                         capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A tiny dense GPT-2 with the embedded tokenizer (8,192 tokens)."""
    path = tmp_path_factory.mktemp("dense")
    tok = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=64,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def leftovers(parent, name):
    return [p for p in os.listdir(parent) if p.startswith(f".{name}.tmp-") or p.startswith(f".{name}.old-")]


def test_convert_script_writes_checkpoint_card_and_report(dense_dir, tmp_path):
    out = tmp_path / "sparse"
    run("convert_gpt2_to_sparse.py", "--model_name_or_path", dense_dir, "--output_dir", out, "--ffn_flops_ratio", 0.5,
        "--calibration_file", DEFAULT_CALIBRATION, "--num_calibration_samples", 10, "--block_size", 32, "--k_freq", 4,
        "--sparse_components", "polynomial", "spectral", "feedback")
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["ffn_flops_ratio"] <= 0.5
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "sparse_gpt2" and model.config.k_freq == 4
    assert model.transformer.h[0].mlp.components["spectral"].k == 4  # the flag reached the built component
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert "trust_remote_code=True" in card.text and "FLOPs per component" in card.text
    assert (out / "modeling_sparse_gpt2.py").exists()  # the code travels with the checkpoint
    assert not leftovers(tmp_path, "sparse")


def convert_in_process(capsys, *args):
    """``scripts/convert_gpt2_to_sparse.py`` without a new interpreter (the script is ``sys.exit(cli.main(["convert",
    *argv]))``; starting one costs ~10 s of imports on the CI machine): (exit status, stderr)."""
    rc = cli.main(["convert", *map(str, args)])
    return rc, capsys.readouterr().err


BAD_INPUTS = {  # case: (flags replaced, the message on stderr)
    "missing model": (["--model_name_or_path", "./no/such/model"], "model folder not found: ./no/such/model"),
    "missing calibration": (["--calibration_file", "/no/such/file.jsonl"], "data file not found: /no/such/file.jsonl"),
    "unsupported file": (["--calibration_file", __file__], "unsupported extension"),
    "budget too small": (["--ffn_flops_ratio", 0.005], "cannot be met"),
    "bad knob": (["--k_freq", 999], "k_freq must be an integer"),
}


def bad_convert_args(dense_dir, tmp_path, case):
    extra, message = BAD_INPUTS[case]
    args = {"--model_name_or_path": dense_dir, "--output_dir": tmp_path / "out", "--calibration_file": DEFAULT_CALIBRATION,
            "--num_calibration_samples": 10, "--block_size": 32}
    for k, v in zip(extra[::2], extra[1::2]):
        args[k] = v
    return [x for kv in args.items() for x in kv], message


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_convert_bad_input_gives_clear_error_and_no_output(capsys, dense_dir, tmp_path, case):
    args, message = bad_convert_args(dense_dir, tmp_path, case)
    rc, err = convert_in_process(capsys, *args)
    assert rc == 1 and message in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_convert_script_bad_input_exits_non_zero_with_the_message_and_no_output(dense_dir, tmp_path):
    """The script itself, on the error raised deepest (in the conversion, after the model and the text loaded)."""
    args, message = bad_convert_args(dense_dir, tmp_path, "budget too small")
    out = run("convert_gpt2_to_sparse.py", *args, check=False)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_convert_refuses_a_non_gpt2_model(capsys, tmp_path, dense_dir):
    from transformers import BertConfig, BertForMaskedLM

    bert = tmp_path / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)).save_pretrained(bert)
    rc, err = convert_in_process(capsys, "--model_name_or_path", bert, "--output_dir", tmp_path / "o", "--calibration_file", DEFAULT_CALIBRATION)
    assert rc == 1 and "is a 'bert' model; expected a dense GPT-2" in err


def test_convert_empty_or_short_calibration(capsys, dense_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    rc, err = convert_in_process(capsys, "--model_name_or_path", dense_dir, "--output_dir", tmp_path / "o", "--calibration_file", empty)
    assert rc == 1 and "no non-empty text" in err
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    rc, err = convert_in_process(capsys, "--model_name_or_path", dense_dir, "--output_dir", tmp_path / "o",
                                 "--calibration_file", short, "--block_size", 64)
    assert rc == 1 and "fewer than one block" in err


def test_existing_output_needs_overwrite_and_is_replaced_whole(capsys, dense_dir, tmp_path):
    out = tmp_path / "sparse"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    common = ["--model_name_or_path", dense_dir, "--output_dir", out, "--calibration_file", DEFAULT_CALIBRATION,
              "--num_calibration_samples", 10, "--block_size", 32]
    rc, err = convert_in_process(capsys, *common)
    assert rc == 1 and "--overwrite_output_dir" in err
    assert (out / "keep.txt").read_text() == "user data"
    assert convert_in_process(capsys, *common, "--overwrite_output_dir")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not leftovers(tmp_path, "sparse")


ARMED = """
import os, runpy, signal, sys
from transformers import TrainerCallback
import modeling_sparse_gpt2.tooling.commands as lib

class Watch(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if os.environ.get("STEP_LOG"):  # every optimizer step this process runs
            with open(os.environ["STEP_LOG"], "a") as f:
                f.write(f"{state.global_step}\\n")
        if state.global_step == int(os.environ.get("KILL_AT_STEP", -1)):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no flush: as a crash or an OOM kill

build = lib.build_healing_trainer
def build_and_arm(*a, **k):
    trainer = build(*a, **k)
    trainer.add_callback(Watch())
    return trainer
lib.build_healing_trainer = build_and_arm
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_armed(tmp_path, args, **env):
    """The healing script with a callback that logs each step run (STEP_LOG) or SIGKILLs (KILL_AT_STEP)."""
    armed = tmp_path / "armed.py"
    armed.write_text(ARMED)
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, armed, os.path.join(ROOT, "scripts", "heal_sparse_gpt2.py"), *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_heal_killed_mid_training_resumes_to_the_same_weights_and_loss(dense_dir, tmp_path):
    sparse = tmp_path / "sparse"
    run("convert_gpt2_to_sparse.py", "--model_name_or_path", dense_dir, "--output_dir", sparse, "--ffn_flops_ratio", 0.5,
        "--calibration_file", DEFAULT_CALIBRATION, "--num_calibration_samples", 10, "--block_size", 32,
        "--sparse_components", "polynomial", "spectral", "feedback")  # every GEMM segment's weights and moments resume
    held_out = tmp_path / "held_out.jsonl"  # its first two documents, 14 blocks: all 2,773 made each run 3x longer
    held_out.write_text("".join(open(DEFAULT_VALIDATION).readlines()[:2]))
    common = ["--model_name_or_path", sparse, "--teacher_model_name_or_path", dense_dir, "--train_file", DEFAULT_CALIBRATION,
              "--validation_file", held_out, "--block_size", 32, "--max_train_samples", 32,
              "--per_device_train_batch_size", 4, "--learning_rate", 1e-3, "--save_steps", 3, "--logging_steps", 1,
              "--report_to", "none", "--use_cpu", "--seed", 0, "--data_seed", 0, "--disable_tqdm", "true", "--max_steps", 6]
    full, part = tmp_path / "full", tmp_path / "part"
    run("heal_sparse_gpt2.py", *common, "--output_dir", full)
    killed = run_armed(tmp_path, [*common, "--output_dir", part], KILL_AT_STEP="5")
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILLed after step 5, its last checkpoint is step 3
    checkpoints = tmp_path / "part.checkpoints"  # the Trainer's checkpoints live beside the output folder
    assert (checkpoints / "checkpoint-3").exists() and not part.exists()
    steps = tmp_path / "resumed_steps.txt"
    resumed = run_armed(tmp_path, [*common, "--output_dir", part, "--resume_from_checkpoint", checkpoints / "checkpoint-3"], STEP_LOG=str(steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resumed process trains only the remaining steps (a restart from step 0 would log 1..6)
    assert steps.read_text().split() == ["4", "5", "6"]
    a = AutoModelForCausalLM.from_pretrained(full).state_dict()
    b = AutoModelForCausalLM.from_pretrained(part).state_dict()
    for k in a:  # identical: same CPU kernels, optimizer state, RNG state and data order restored
        assert torch.equal(a[k], b[k]), k
    log_full = json.loads((full / "healing_log.json").read_text())
    log_part = json.loads((part / "healing_log.json").read_text())
    loss = lambda log, step: next(e["loss"] for e in log if e.get("step") == step and "loss" in e)  # noqa: E731
    assert loss(log_part, 6) == pytest.approx(loss(log_full, 6), rel=1e-6)
    assert any("FLOPs/ffn_ratio" in e for e in log_full) and any("eval_loss" in e for e in log_full)
    card = ModelCard.load(full / "README.md")
    assert card.data.eval_results and card.data.eval_results[0].metric_type == "perplexity"


def test_evaluate_perplexity_script_prints_and_writes_json(dense_dir, tmp_path):
    out = tmp_path / "ppl.json"
    res = run("evaluate_perplexity.py", "--model_name_or_path", dense_dir, "--validation_file", DEFAULT_VALIDATION,
              "--block_size", 32, "--stride", 16, "--max_eval_tokens", 500, "--output_file", out)
    written = json.loads(out.read_text())
    assert written["tokens_scored"] == 499 and written["stride"] == 16
    assert str(round(written["perplexity"], 3))[:5] in res.stdout


def test_main_job_runs_offline_on_the_embedded_default(tmp_path):
    from modeling_sparse_gpt2.tooling.main_job import main

    out = tmp_path / "job"
    rc = main(["--output_dir", str(out), "--heal_steps", "2", "--heal_batch_size", "2", "--num_calibration_samples", "38",
               "--block_size", "64", "--max_eval_tokens", "1500"])
    assert rc == 0
    results = json.loads((out / "sparse_gpt2_results.json").read_text())
    assert set(results["perplexity"]) == {"dense", "converted", "healed"}
    assert results["flops"]["FLOPs/ffn_ratio"] <= 0.4
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results[0].metric_type == "perplexity"
    assert card.data.library_name == "transformers"
    assert main(["--output_dir", str(out), "--heal_steps", "0"]) == 1  # exists, no --overwrite_output_dir


SAVE_KILLER = """
import os, runpy, signal, sys
from modeling_sparse_gpt2 import SparseGPT2LMHeadModel

save = SparseGPT2LMHeadModel.save_pretrained
def save_then_die(self, path, *a, **k):
    save(self, path, *a, **k)  # the weights are half of what the folder will hold
    os.kill(os.getpid(), signal.SIGKILL)
SparseGPT2LMHeadModel.save_pretrained = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_conversion_killed_while_writing_leaves_no_output_folder(dense_dir, tmp_path):
    killer = tmp_path / "killer.py"
    killer.write_text(SAVE_KILLER)
    out = tmp_path / "sparse"
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, killer, os.path.join(ROOT, "scripts", "convert_gpt2_to_sparse.py"),
                          "--model_name_or_path", dense_dir, "--output_dir", out, "--calibration_file", DEFAULT_CALIBRATION,
                          "--num_calibration_samples", "10", "--block_size", "32"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == -9, res.stderr[-2000:]
    assert not out.exists()  # only the hidden temporary folder beside it holds the partial write
    assert leftovers(tmp_path, "sparse")
