#!/usr/bin/env python
"""Perplexity (exp of the mean next-token NLL) of any causal LM on held-out text, printed and saved as JSON.

    python scripts/evaluate_perplexity.py --model_name_or_path gpt2-sparse-0.4 --validation_file valid.jsonl \
        --block_size 512 --stride 512 --output_file ppl.json
"""

import json
import sys
from dataclasses import dataclass

from transformers import HfArgumentParser

from modeling_sparse_gpt2.tooling.commands import evaluate_model


@dataclass
class EvalArguments:
    model_name_or_path: str
    validation_file: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    split: str = "validation"
    block_size: int | None = None
    stride: int | None = None
    batch_size: int = 8
    max_eval_tokens: int | None = None
    text_column: str = "text"
    output_file: str | None = None


if __name__ == "__main__":
    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses()
    try:
        result = evaluate_model(args)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(result, indent=1))
