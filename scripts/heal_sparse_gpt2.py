#!/usr/bin/env python
"""Heal a converted SparseGPT2 by distillation from its dense teacher, with `Trainer`.

    python scripts/heal_sparse_gpt2.py --model_name_or_path gpt2-sparse-0.4 --teacher_model_name_or_path gpt2 \
        --train_file train.jsonl --validation_file valid.jsonl --block_size 512 --output_dir gpt2-sparse-0.4-healed \
        --max_steps 2000 --per_device_train_batch_size 8 --learning_rate 3e-4 --bf16 --save_steps 500 \
        [--resume_from_checkpoint gpt2-sparse-0.4-healed/checkpoint-1000]

Every TrainingArguments flag works (bf16, gradient accumulation, logging/report_to, accelerate launch).
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, TrainingArguments

from modeling_sparse_gpt2.tooling.distillation import DistillationArguments
from modeling_sparse_gpt2.tooling.commands import heal_and_save


@dataclass
class HealArguments:
    model_name_or_path: str = field(metadata={"help": "The converted SparseGPT2 (student)."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "The dense teacher (None: plain CE)."})
    train_file: str | None = None
    validation_file: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    block_size: int | None = None
    max_train_samples: int | None = None
    text_column: str = "text"


if __name__ == "__main__":
    heal_args, distill_args, training_args = HfArgumentParser((HealArguments, DistillationArguments, TrainingArguments)).parse_args_into_dataclasses()
    try:
        trainer, _ = heal_and_save(heal_args, distill_args, training_args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    # close the process group before exiting: under accelerate launch (gloo) a process that exits
    # with it open was seen to abort ("terminate called without an active exception", CI)
    trainer.accelerator.end_training()
