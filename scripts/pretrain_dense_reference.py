#!/usr/bin/env python
"""Train the dense GPT-2 reference from scratch (see modeling_sparse_gpt2/pretraining.py).

Reference for the benchmarks (H200, ~5 minutes):
    python scripts/prepare_tokens.py --train_file DATA/train.jsonl.xz --validation_file DATA/validation.jsonl.xz \
        --tokenizer_name_or_path TOKENIZERS/gpt2 --output_dir tokens/gpt2
    python scripts/pretrain_dense_reference.py --train_tokens tokens/gpt2/train.npy \
        --validation_tokens tokens/gpt2/validation.npy --tokenizer_name_or_path TOKENIZERS/gpt2 --output_dir dense-512
"""

from transformers import HfArgumentParser

from modeling_sparse_gpt2.tooling.pretraining import PretrainArguments, train_dense_reference

if __name__ == "__main__":
    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses()
    summary = train_dense_reference(args)
    print(f"best validation perplexity {summary['best_val_ppl']:.2f} after {summary['steps']} steps ({summary['wall_s']} s)")
