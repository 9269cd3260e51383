#!/usr/bin/env python
"""Heal a converted SparseGPT2 by distillation from its dense teacher, with `Trainer`.

    python scripts/heal_sparse_gpt2.py --model_name_or_path gpt2-sparse-0.4 --teacher_model_name_or_path gpt2 \
        --train_file train.jsonl --validation_file valid.jsonl --block_size 512 --output_dir gpt2-sparse-0.4-healed \
        --max_steps 2000 --per_device_train_batch_size 8 --learning_rate 3e-4 --bf16 --save_steps 500 \
        [--resume_from_checkpoint gpt2-sparse-0.4-healed.checkpoints/checkpoint-1000]

The same as `sparse-gpt2 heal ...`; every TrainingArguments flag works (bf16, gradient accumulation,
logging/report_to, accelerate launch); `--help_all` lists them.
"""

import sys

from modeling_sparse_gpt2.tooling.cli import main

if __name__ == "__main__":
    sys.exit(main(["heal", *sys.argv[1:]]))
