#!/usr/bin/env python
"""Tokenize JSON-lines text files (read with `datasets`) into .npy token streams (EOS between documents).

    python scripts/prepare_tokens.py --train_file train.jsonl.xz --validation_file validation.jsonl.xz \
        --tokenizer_name_or_path path/to/gpt2-tokenizer --output_dir tokens/gpt2 [--source_prefix python]

With --train_tokenizer_vocab_size N a new byte-level BPE tokenizer of N tokens is first trained on
the training texts and saved in --output_dir/tokenizer (used for the small embedded default model).
The same as `sparse-gpt2 prepare-tokens ...` (modeling_sparse_gpt2/tooling/cli.py); `--help` lists the flags.
"""

import sys

from modeling_sparse_gpt2.tooling.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare-tokens", *sys.argv[1:]]))
