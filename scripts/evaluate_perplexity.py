#!/usr/bin/env python
"""Perplexity (exp of the mean next-token NLL) of any causal LM on held-out text, printed and saved as JSON.

    python scripts/evaluate_perplexity.py --model_name_or_path gpt2-sparse-0.4 --validation_file valid.jsonl \
        --block_size 512 --stride 512 --output_file ppl.json

The same as `sparse-gpt2 evaluate ...`; `--help` lists the flags.
"""

import sys

from modeling_sparse_gpt2.tooling.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
