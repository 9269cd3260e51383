#!/usr/bin/env python
"""Tokenize text files (read with `datasets`) into .npy token streams (EOS between documents).

    python scripts/prepare_tokens.py --train_file train.jsonl.xz --validation_file validation.jsonl.xz \
        --tokenizer_name_or_path path/to/gpt2-tokenizer --output_dir tokens/gpt2 [--source_prefix python]

With --train_tokenizer_vocab_size N a new byte-level BPE tokenizer of N tokens is first trained on
the training texts and saved in --output_dir/tokenizer (used for the small embedded default model).
"""

from dataclasses import dataclass, field

from transformers import HfArgumentParser

from modeling_sparse_gpt2.tooling.tokens import prepare_token_files


@dataclass
class Arguments:
    train_file: str
    validation_file: str
    output_dir: str
    tokenizer_name_or_path: str | None = None
    train_tokenizer_vocab_size: int | None = None
    source_prefix: str | None = field(default=None, metadata={"help": "Keep only documents whose 'source' starts with this."})


if __name__ == "__main__":
    (a,) = HfArgumentParser(Arguments).parse_args_into_dataclasses()
    print(prepare_token_files(**vars(a)))
