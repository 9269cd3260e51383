#!/usr/bin/env python
"""Train the dense GPT-2 reference from scratch (modeling_sparse_gpt2/tooling/pretraining.py).

Reference for the benchmarks (H200, ~5 minutes):
    python scripts/prepare_tokens.py --train_file DATA/train.jsonl.xz --validation_file DATA/validation.jsonl.xz \
        --tokenizer_name_or_path TOKENIZERS/gpt2 --output_dir tokens/gpt2
    python scripts/pretrain_dense_reference.py --train_tokens tokens/gpt2/train.npy \
        --validation_tokens tokens/gpt2/validation.npy --tokenizer_name_or_path TOKENIZERS/gpt2 --output_dir dense-512

The same as `sparse-gpt2 pretrain ...` (modeling_sparse_gpt2/tooling/cli.py); `--help` lists the flags.
"""

import sys

from modeling_sparse_gpt2.tooling.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", *sys.argv[1:]]))
