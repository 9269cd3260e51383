#!/usr/bin/env python
"""Write configs/gpt2-small-ffn{ratio}.json: the configs the conversion picks for GPT-2 small.

    python scripts/make_config_presets.py            # rewrites configs/ (tests/test_config.py checks they match)

Each preset is ``sparse_config_for_budget(GPT2Config(), ConversionArguments(ffn_flops_ratio=r))``:
GPT-2 small's shape, the conversion's default components and knobs, uniform budget.
"""

import argparse
import os

from modeling_sparse_gpt2.tooling.conversion import preset_config

RATIOS = (0.5, 0.4, 0.2)

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--output_dir", default=os.path.join(os.path.dirname(__file__), "..", "configs"))
    args = p.parse_args()
    for ratio in RATIOS:
        path = os.path.join(args.output_dir, f"gpt2-small-ffn{ratio}.json")
        preset_config(ratio).to_json_file(path)
        print(path)
