#!/usr/bin/env python
"""Convert a dense GPT-2 into a SparseGPT2 checkpoint (calibration only; heal it afterwards).

    python scripts/convert_gpt2_to_sparse.py --model_name_or_path gpt2 --output_dir gpt2-sparse-0.4 \
        --ffn_flops_ratio 0.4 --calibration_file my_text.jsonl --num_calibration_samples 128 --block_size 512

Every ConversionArguments field is a flag (--k_freq, --feedback_rank, --budget_mode sensitivity, ...).
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from modeling_sparse_gpt2.tooling.conversion import ConversionArguments
from modeling_sparse_gpt2.tooling.checkpoints import DataArguments
from modeling_sparse_gpt2.tooling.commands import convert_and_save


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Dense GPT2LMHeadModel: hub id or local folder."})
    output_dir: str = field(metadata={"help": "Where the sparse checkpoint is written."})
    overwrite_output_dir: bool = False
    tokenizer_name_or_path: str | None = None


if __name__ == "__main__":
    hf_logging.set_verbosity_error()
    model_args, data_args, conv_args = HfArgumentParser((ModelArguments, DataArguments, ConversionArguments)).parse_args_into_dataclasses()
    try:
        convert_and_save(model_args, data_args, conv_args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        sys.exit(f"error: {err}")
