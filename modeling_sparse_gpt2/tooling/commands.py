"""The steps every command is made of (convert, heal, evaluate), and the convert / heal / evaluate commands.

Steps work on models in memory: ``convert_model``, ``heal_model`` and ``evaluation.perplexity``. Commands
read their inputs from disk, run one step and write one result: ``convert_and_save``,
``heal_and_save``, ``evaluate_model``. The main job (``main_job.py``) chains the same steps.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
from transformers import ProgressCallback, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from .checkpoints import atomic_output_dir, check_output_dir, load_causal_lm, load_tokenizer, save_json, save_model_and_tokenizer
from .conversion import convert_gpt2_to_sparse
from .data import block_size_for, load_split, token_stream, tokenize_blocks
from .distillation import build_healing_trainer
from .evaluation import perplexity
from .model_card import make_model_card


# ---------------------------------------------------------------------------- arguments of the commands
@dataclass
class ConvertArguments:
    model_name_or_path: str = field(metadata={"help": "Dense GPT2LMHeadModel to convert: Hub id or local folder."})
    output_dir: str = field(metadata={"help": "Folder the sparse checkpoint is written to (atomically)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output_dir."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer to use and save; default: the model's."})


@dataclass
class HealArguments:
    model_name_or_path: str = field(metadata={"help": "The converted sparse GPT-2 (the student): local folder or Hub id."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The dense teacher; without it healing is plain next-token CE."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output_dir."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap on healing sequences of --block_size tokens (default: all)."})


@dataclass
class EvaluateArguments:
    model_name_or_path: str = field(metadata={"help": "Any causal LM: local folder or Hub id."})
    split: str = field(default="validation", metadata={"help": "Split of --dataset_name to score."})
    stride: int | None = field(default=None, metadata={"help": "Tokens between window starts, 1 .. --block_size; default --block_size (no overlap)."})
    batch_size: int = field(default=8, metadata={"help": "Windows per forward pass."})
    max_eval_tokens: int | None = field(default=None, metadata={"help": "Score only the first N tokens of the text (default: all)."})
    output_file: str | None = field(default=None, metadata={"help": "Also write the result with evaluate.save: a .json file, or a folder (a result-<time>.json per run)."})


# ---------------------------------------------------------------------------- steps
def checkpoints_dir_for(output_dir: str) -> str:
    """Where healing keeps the Trainer's resumable ``checkpoint-N`` folders: ``<output_dir>.checkpoints``,
    beside the output folder, which only ever holds the finished checkpoint."""
    output_dir = os.path.abspath(output_dir)
    return output_dir + ".checkpoints"


def convert_model(dense, calibration_blocks: torch.Tensor, conv_args, log=print):
    """Calibration-only conversion of ``dense``; returns ``(sparse, report)``."""
    sparse, report = convert_gpt2_to_sparse(dense, calibration_blocks, conv_args, progress=log)
    log(f"achieved FFN FLOPs ratio {report['ffn_flops_ratio']:.4f} (requested {conv_args.ffn_flops_ratio})")
    return sparse, report


def healing_training_arguments(output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int = 0) -> TrainingArguments:
    """The short healing run of the main job: cosine schedule, 10% warm-up, no checkpoints, bf16 on a GPU that has it."""
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 10), weight_decay=0.0, logging_steps=max(1, steps // 10),
        save_strategy="no", report_to=[], seed=seed, dataloader_num_workers=0,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        disable_tqdm=not sys.stderr.isatty(), dataloader_pin_memory=torch.cuda.is_available(),
    )


class CompactLog(TrainerCallback):
    """One short line per Trainer log that carries a loss (step, loss, learning rate); the other logged
    keys (FLOPs, gates, throughput) still reach ``state.log_history`` and the reporters."""

    def __init__(self, write=print):
        self.write = write

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            lr = f"  lr {logs['learning_rate']:.2e}" if "learning_rate" in logs else ""
            self.write(f"  step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}{lr}")
        elif "eval_loss" in logs:
            self.write(f"  step {state.global_step}/{state.max_steps}  eval_loss {logs['eval_loss']:.4f}")
        elif "train_runtime" in logs:
            self.write(f"  trained {state.global_step} steps in {logs['train_runtime']:.1f} s")


def _compact_logs(trainer):
    """Replace the Trainer's printing of every log dictionary by ``CompactLog``; keep its tqdm bar."""
    bar = not trainer.args.disable_tqdm
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    if bar:
        trainer.add_callback(_QuietProgress())
        trainer.add_callback(CompactLog(write=_tqdm_write))
    else:
        trainer.add_callback(CompactLog())


def _tqdm_write(msg):
    from tqdm.auto import tqdm

    tqdm.write(msg)


class _QuietProgress(ProgressCallback):
    """The Trainer's progress bar without its printing of each log dictionary."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def heal_model(student, teacher, train_blocks, eval_blocks, training_args, distill_args, resume_from_checkpoint=None):
    """Distil ``teacher`` into ``student`` with Trainer (compact log, no pin_memory without CUDA); returns the trainer."""
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False
    trainer = build_healing_trainer(student, teacher, train_blocks, eval_blocks, training_args, distill_args)
    _compact_logs(trainer)
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer


# ---------------------------------------------------------------------------- commands
def convert_and_save(model_args: ConvertArguments, data_args, conv_args, log=print):
    """Load the dense model and calibration text, convert, write checkpoint + card + report atomically."""
    out = model_args.output_dir
    check_output_dir(out, model_args.overwrite_output_dir)
    dense = load_causal_lm(model_args.model_name_or_path, expect="gpt2").eval()
    if torch.cuda.is_available():
        dense = dense.cuda()
    tok_flag = "--tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "--model_name_or_path"
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path, flag=tok_flag)
    block = block_size_for(dense.config, data_args.block_size)
    texts = load_split(data_args.calibration_file, data_args.dataset_name, data_args.dataset_config_name, "train", data_args.text_column)
    calib = tokenize_blocks(texts, tokenizer, block, data_args.num_calibration_samples, source=data_args.calibration_file or data_args.dataset_name)
    sparse, report = convert_model(dense, calib, conv_args, log)
    sparse = sparse.cpu()
    with atomic_output_dir(out, model_args.overwrite_output_dir) as tmp:
        save_model_and_tokenizer(tmp, sparse, tokenizer)
        make_model_card(sparse, base_model=model_args.model_name_or_path, perplexities={}, seq_len=block,
                        dataset=data_args.dataset_name, provenance=f"Calibration-only conversion: {json.dumps(report['arguments'])}").save(os.path.join(tmp, "README.md"))
        save_json(os.path.join(tmp, "conversion_report.json"), report)
    log(f"wrote {out}")
    return sparse, report


def heal_and_save(heal_args: HealArguments, data_args, distill_args, training_args: TrainingArguments, log=print):
    """Distil the teacher into the student with Trainer; resumable; writes the healed checkpoint + card atomically.

    ``training_args.output_dir`` is where the healed checkpoint goes; the Trainer's resumable
    ``checkpoint-N`` folders go to ``checkpoints_dir_for(output_dir)`` beside it.
    """
    out = training_args.output_dir
    check_output_dir(out, heal_args.overwrite_output_dir)  # before any work
    student = load_causal_lm(heal_args.model_name_or_path, expect="sparse_gpt2")
    teacher = None
    if heal_args.teacher_model_name_or_path:
        teacher = load_causal_lm(heal_args.teacher_model_name_or_path, expect="gpt2", flag="--teacher_model_name_or_path")
    tokenizer = load_tokenizer(heal_args.model_name_or_path)
    block = block_size_for(student.config, data_args.block_size)
    args = (data_args.dataset_name, data_args.dataset_config_name)
    train = tokenize_blocks(
        load_split(data_args.train_file, *args, "train", data_args.text_column, file_flag="--train_file"),
        tokenizer, block, heal_args.max_train_samples, source=data_args.train_file or data_args.dataset_name,
    )
    val = None
    if data_args.validation_file or data_args.dataset_name:
        val = tokenize_blocks(
            load_split(data_args.validation_file, *args, "validation", data_args.text_column, file_flag="--validation_file"),
            tokenizer, block, None, source=data_args.validation_file or data_args.dataset_name,
        )
    training_args.output_dir = checkpoints_dir_for(out)
    trainer = heal_model(student, teacher, train, val, training_args, distill_args, training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if val is not None else {}
    # every process calls save_model: under FSDP it gathers the sharded weights (a collective), and
    # only the main process writes; calling it on rank 0 alone leaves rank 0 waiting on NCCL forever
    if trainer.is_world_process_zero():
        with atomic_output_dir(out, heal_args.overwrite_output_dir) as tmp:
            save_model_and_tokenizer(tmp, trainer.model, tokenizer, save_model=trainer.save_model)
            ppl = {"healed": float(torch.exp(torch.tensor(metrics["eval_loss"])))} if "eval_loss" in metrics else {}
            make_model_card(
                trainer.model, base_model=heal_args.teacher_model_name_or_path or heal_args.model_name_or_path,
                perplexities=ppl, seq_len=block, dataset=data_args.dataset_name,
                perplexity_note="exp(eval_loss): next-token CE on the validation blocks" if ppl else "",
                provenance=f"Healed from {heal_args.model_name_or_path} by distillation (T={distill_args.temperature}, alpha_kl={distill_args.alpha_kl}) for {trainer.state.global_step} steps.",
            ).save(os.path.join(tmp, "README.md"))
            save_json(os.path.join(tmp, "healing_log.json"), trainer.state.log_history)
        log(f"wrote {out} (resumable Trainer checkpoints, if any: {training_args.output_dir})")
    else:
        trainer.save_model(training_args.output_dir)  # the collective; writes nothing on this process
    training_args.output_dir = out
    trainer.accelerator.wait_for_everyone()  # no process returns before the checkpoint is written whole
    return trainer, metrics


def evaluate_model(args: EvaluateArguments, data_args) -> dict:
    """Perplexity of a saved model on held-out text (the ``sparse_perplexity`` metric); optionally saved with ``evaluate.save``."""
    model = load_causal_lm(args.model_name_or_path).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer(args.model_name_or_path)
    block = block_size_for(model.config, data_args.block_size)
    texts = load_split(data_args.validation_file, data_args.dataset_name, data_args.dataset_config_name, args.split,
                       data_args.text_column, file_flag="--validation_file")
    tokens = token_stream(texts, tokenizer)
    if args.max_eval_tokens:
        tokens = tokens[: args.max_eval_tokens]
    result = perplexity(model, tokens, block, args.stride, args.batch_size)
    result["model"] = args.model_name_or_path
    if args.output_file:
        import evaluate

        evaluate.save(args.output_file, **result)
    return result
