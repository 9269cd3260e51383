#!/usr/bin/env python
"""Convert a dense GPT-2 into a SparseGPT2 checkpoint (calibration only; heal it afterwards).

    python scripts/convert_gpt2_to_sparse.py --model_name_or_path gpt2 --output_dir gpt2-sparse-0.4 \
        --ffn_flops_ratio 0.4 --calibration_file my_text.jsonl --num_calibration_samples 128 --block_size 512

The same as `sparse-gpt2 convert ...` (modeling_sparse_gpt2/tooling/cli.py); `--help` lists the flags.
"""

import sys

from modeling_sparse_gpt2.tooling.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
