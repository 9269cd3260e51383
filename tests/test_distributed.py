"""Healing under `accelerate launch` on two CPU processes (gloo): DDP and FSDP match one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest

from modeling_sparse_gpt2.tooling import cli
from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_CALIBRATION
from modeling_sparse_gpt2.tooling.distillation import fsdp_accelerate_config

from conftest import save_tiny_dense_gpt2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


STUDENTS = {"all": "polynomial spectral feedback tensor micro", "poly_tensor": "polynomial tensor"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``models(name)``: the folder of a tiny dense GPT-2 ("dense"; no dropout, so runs are comparable) or of
    one of its conversions (STUDENTS), converted in this process on first use."""
    base = tmp_path_factory.mktemp("ddp")
    save_tiny_dense_gpt2(base / "dense", n_layer=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def model(name):
        out = base / name
        if not out.exists():
            assert cli.main(["convert", "--model_name_or_path", str(base / "dense"), "--output_dir", str(out), "--ffn_flops_ratio", "0.6",
                             "--calibration_file", DEFAULT_CALIBRATION, "--num_calibration_samples", "10", "--block_size", "32",
                             "--sparse_components", *STUDENTS[name].split()]) == 0
        return out

    return model


@pytest.fixture(scope="module")
def one_process(models, tmp_path_factory):
    """``one_process(student)``: (losses, output folder) of healing it in one process with the global batch of
    4 sequences; run on first use, then shared by the DDP and FSDP tests."""
    runs = {}

    def run(student):
        if student not in runs:
            out = tmp_path_factory.mktemp(f"one_process_{student}") / "healed"
            runs[student] = heal(models, student, out, [sys.executable], per_device_batch=4), out
        return runs[student]

    return run


def heal(models, student, out, launcher, per_device_batch):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [os.path.join(ROOT, "scripts", "heal_sparse_gpt2.py"), "--model_name_or_path", str(models(student)),
            "--teacher_model_name_or_path", str(models("dense")), "--train_file", DEFAULT_CALIBRATION, "--block_size", "32",
            "--max_train_samples", "64", "--per_device_train_batch_size", str(per_device_batch), "--max_steps", "5",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none", "--save_strategy", "no",
            "--seed", "0", "--disable_tqdm", "true", "--output_dir", str(out), "--use_cpu"]
    res = subprocess.run(launcher + args, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return [e["loss"] for e in json.loads((out / "healing_log.json").read_text()) if "loss" in e]


# --multi_gpu: torchrun starts the processes, and the script's --use_cpu puts them on the CPU with gloo
# (`--cpu --num_processes 2` starts ONE process: this test then compared batches of 2 with batches of 4)
DDP = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
       "--mixed_precision", "no", "--dynamo_backend", "no"]


def assert_trains_like_one_process(losses, out, student, one_process, models):
    """Two processes of 2 sequences per step against one of 4: the same training up to the order of float
    sums. Measured (DDP and FSDP alike): losses within 9e-8 relative, weights 6e-7 of the update away;
    one process of 2 sequences per step instead (what `--cpu` launched): 0.65 of the update."""
    from transformers import AutoModelForCausalLM

    single, single_dir = one_process(student)
    assert len(losses) == len(single) == 5
    assert losses == pytest.approx(single, rel=1e-5)
    weights = lambda path: AutoModelForCausalLM.from_pretrained(path).state_dict()  # noqa: E731
    got, want, start = weights(out), weights(single_dir), weights(models(student))
    names = [n for n in want if want[n].is_floating_point()]
    gap = sum(((got[n] - want[n]).double() ** 2).sum() for n in names).sqrt()
    update = sum(((want[n] - start[n]).double() ** 2).sum() for n in names).sqrt()
    assert gap < 1e-3 * update, (gap / update).item()


# poly_tensor (components off) is slow: DDP all-reduces every parameter alike whichever components hold it,
# and that every FFN parameter gets a gradient with components off is checked in one process for six
# component sets (test_components.py::test_any_component_set_builds_trains_and_matches_the_reference)
@pytest.mark.parametrize("student", ["all", pytest.param("poly_tensor", marks=pytest.mark.slow)])
def test_ddp_on_two_cpu_processes_matches_one_process(models, one_process, tmp_path, student):
    ddp = heal(models, student, tmp_path / "ddp", DDP, per_device_batch=2)
    assert_trains_like_one_process(ddp, tmp_path / "ddp", student, one_process, models)


def test_fsdp_wraps_sparse_blocks_and_saves_a_checkpoint_that_loads_back(models, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    from modeling_sparse_gpt2 import SparseGPT2PreTrainedModel

    assert "SparseGPT2Block" in SparseGPT2PreTrainedModel._no_split_modules
    config = tmp_path / "fsdp.yaml"
    config.write_text(fsdp_accelerate_config(2, use_cpu=True))
    # accelerate refuses TRANSFORMER_BASED_WRAP when the named block class is not in the model
    fsdp = heal(models, "all", tmp_path / "fsdp", [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)], per_device_batch=2)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_trains_like_one_process(fsdp, tmp_path / "fsdp", "all", one_process, models)


def test_heal_and_save_gathers_the_checkpoint_on_every_process(models, tmp_path, monkeypatch):
    """Under FSDP, ``save_model`` gathers the shards (a collective): a process that is not the main
    one must still call it, or the main one waits on it forever; it writes nothing itself."""
    from transformers import HfArgumentParser, TrainingArguments

    from modeling_sparse_gpt2.tooling import commands
    from modeling_sparse_gpt2.tooling.data import HealDataArguments
    from modeling_sparse_gpt2.tooling.distillation import DistillationArguments

    saved = []
    build_healing_trainer = commands.build_healing_trainer

    def build_as_second_process(*args, **kwargs):
        trainer = build_healing_trainer(*args, **kwargs)
        trainer.is_world_process_zero = lambda: False
        trainer.save_model = lambda output_dir=None, **kw: saved.append(output_dir)
        return trainer

    monkeypatch.setattr(commands, "build_healing_trainer", build_as_second_process)
    out = tmp_path / "rank1"
    heal_args = commands.HealArguments(model_name_or_path=str(models("all")), teacher_model_name_or_path=str(models("dense")),
                                       max_train_samples=4)
    data_args = HealDataArguments(train_file=DEFAULT_CALIBRATION, block_size=32)
    (training_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none",
         "--save_strategy", "no", "--disable_tqdm", "true"])
    commands.heal_and_save(heal_args, data_args, DistillationArguments(), training_args)
    assert len(saved) == 1  # the collective was called once (where to, only the main process uses)
    assert not (out / "healing_log.json").exists() and not (out / "README.md").exists()
