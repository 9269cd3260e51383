"""The library functions behind scripts/convert_gpt2_to_sparse.py, heal_sparse_gpt2.py and evaluate_perplexity.py."""

import json
import os

import torch

from .conversion import convert_gpt2_to_sparse
from .data import load_split, token_stream, tokenize_blocks
from .distillation import build_healing_trainer
from .evaluation import perplexity
from .model_card import make_model_card
from .checkpoints import atomic_output_dir, check_output_dir, load_causal_lm, load_tokenizer, save_json


def convert_and_save(model_args, data_args, conv_args, log=print):
    """Load the dense model and calibration text, convert, write checkpoint + card + report atomically."""
    out = model_args.output_dir
    check_output_dir(out, model_args.overwrite_output_dir)
    dense = load_causal_lm(model_args.model_name_or_path, expect="gpt2").eval()
    if torch.cuda.is_available():
        dense = dense.cuda()
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path)
    block = data_args.block_size or min(dense.config.n_positions, 512)
    texts = load_split(data_args.calibration_file, data_args.dataset_name, data_args.dataset_config_name, "train", data_args.text_column)
    calib = tokenize_blocks(texts, tokenizer, block, data_args.num_calibration_samples, source=data_args.calibration_file or data_args.dataset_name)
    sparse, report = convert_gpt2_to_sparse(dense, calib, conv_args, progress=log)
    log(f"achieved FFN FLOPs ratio {report['ffn_flops_ratio']:.4f} (requested {conv_args.ffn_flops_ratio})")
    with atomic_output_dir(out, model_args.overwrite_output_dir) as tmp:
        sparse.cpu().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_model_card(sparse, base_model=model_args.model_name_or_path, perplexities={}, seq_len=block,
                        dataset=data_args.dataset_name, provenance=f"Calibration-only conversion: {json.dumps(report['arguments'])}").save(os.path.join(tmp, "README.md"))
        save_json(os.path.join(tmp, "conversion_report.json"), report)
    return sparse, report


def heal_and_save(heal_args, distill_args, training_args, log=print):
    """Distil the teacher into the student with Trainer; resumable; saves the healed checkpoint + card."""
    student = load_causal_lm(heal_args.model_name_or_path, expect="sparse_gpt2")
    teacher = load_causal_lm(heal_args.teacher_model_name_or_path, expect="gpt2") if heal_args.teacher_model_name_or_path else None
    tokenizer = load_tokenizer(heal_args.model_name_or_path)
    block = heal_args.block_size or min(student.config.n_positions, 512)
    train = tokenize_blocks(
        load_split(heal_args.train_file, heal_args.dataset_name, heal_args.dataset_config_name, "train", heal_args.text_column),
        tokenizer, block, heal_args.max_train_samples, source=heal_args.train_file or heal_args.dataset_name,
    )
    val = None
    if heal_args.validation_file or heal_args.dataset_name:
        val = tokenize_blocks(
            load_split(heal_args.validation_file, heal_args.dataset_name, heal_args.dataset_config_name, "validation", heal_args.text_column),
            tokenizer, block, None, source=heal_args.validation_file or heal_args.dataset_name,
        )
    trainer = build_healing_trainer(student, teacher, train, val, training_args, distill_args)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate() if val is not None else {}
    # every process calls save_model: under FSDP it gathers the sharded weights (a collective), and
    # only the main process writes; calling it on rank 0 alone leaves rank 0 waiting on NCCL forever
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        ppl = {"healed": float(torch.exp(torch.tensor(metrics["eval_loss"])))} if "eval_loss" in metrics else {}
        tokenizer.save_pretrained(training_args.output_dir)
        make_model_card(
            trainer.model, base_model=heal_args.teacher_model_name_or_path or heal_args.model_name_or_path,
            perplexities=ppl, seq_len=block, dataset=heal_args.dataset_name,
            perplexity_note="eval_loss of the distillation objective's CE on the validation blocks" if ppl else "",
            provenance=f"Healed from {heal_args.model_name_or_path} by distillation (T={distill_args.temperature}, alpha_kl={distill_args.alpha_kl}) for {trainer.state.global_step} steps.",
        ).save(os.path.join(training_args.output_dir, "README.md"))
        save_json(os.path.join(training_args.output_dir, "healing_log.json"), trainer.state.log_history)
    trainer.accelerator.wait_for_everyone()  # no process returns before the checkpoint is written whole
    return trainer, metrics


def evaluate_model(args):
    model = load_causal_lm(args.model_name_or_path).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer(args.model_name_or_path)
    block = args.block_size or min(model.config.n_positions, 512)
    tokens = token_stream(load_split(args.validation_file, args.dataset_name, args.dataset_config_name, args.split, args.text_column), tokenizer)
    if args.max_eval_tokens:
        tokens = tokens[: args.max_eval_tokens]
    result = perplexity(model, tokens, block, args.stride, args.batch_size)
    result["model"] = args.model_name_or_path
    if args.output_file:
        save_json(args.output_file, result)
    return result
