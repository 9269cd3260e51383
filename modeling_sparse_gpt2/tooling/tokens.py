"""Token files for pre-training: JSON-lines text (via `datasets`) -> .npy token streams, optional BPE training.

    sparse-gpt2 prepare-tokens --train_file train.jsonl.xz --validation_file validation.jsonl.xz \
        --tokenizer_name_or_path gpt2 --output_dir tokens/gpt2

``--output_dir`` receives ``train.npy`` and ``validation.npy`` (one stream each, EOS between documents;
uint16 when the vocabulary fits, else int32) and, with ``--train_tokenizer_vocab_size``, ``tokenizer/``;
it is written atomically and an existing non-empty one is refused unless ``--overwrite_output_dir``.
"""

import os
import sys
from dataclasses import dataclass, field

import numpy as np


@dataclass
class PrepareTokensArguments:
    train_file: str = field(metadata={"help": "JSON-lines file (optionally .xz/.gz) of training documents, one {\"text\": ...} per line."})
    validation_file: str = field(metadata={"help": "JSON-lines file (optionally .xz/.gz) of validation documents, the same format."})
    output_dir: str = field(metadata={"help": "Folder that receives train.npy, validation.npy (and tokenizer/), written atomically."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing non-empty --output_dir."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={
        "help": "Tokenizer to encode with: Hub id or local folder (a bare GPT-2 folder of vocab.json + merges.txt works)."})
    train_tokenizer_vocab_size: int | None = field(default=None, metadata={
        "help": "Instead of --tokenizer_name_or_path: train a byte-level BPE tokenizer of this many tokens (> 256) on the "
                "training texts and save it in OUTPUT_DIR/tokenizer."})
    source_prefix: str | None = field(default=None, metadata={"help": "Keep only documents whose 'source' field starts with this."})


def _documents(file: str, source_prefix: str | None, flag: str) -> list[str]:
    """The non-empty 'text' fields of a JSON-lines file (``data.load_texts``); errors name ``flag`` and the file."""
    import datasets

    from .data import load_texts

    if not sys.stderr.isatty():  # no "Generating data split" bars in logs
        datasets.disable_progress_bars()
    return load_texts(file, file_flag=flag, source_prefix=source_prefix)


def load_tokenizer_from_flag(name_or_path: str, flag: str = "--tokenizer_name_or_path"):
    """``checkpoints.load_tokenizer`` (GPT-2's bare vocab.json + merges.txt fallback included), its
    failures one line naming ``flag``."""
    from .checkpoints import load_tokenizer

    try:
        return load_tokenizer(name_or_path, flag=flag)
    except (OSError, ValueError) as err:
        if str(err).startswith(flag):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"{flag}: no tokenizer could be loaded from {name_or_path} (it needs tokenizer.json, or GPT-2's "
                         f"vocab.json + merges.txt): {type(err).__name__}: {first.rstrip(':')}") from err


def train_bpe_tokenizer(texts, vocab_size: int, output_dir: str):
    """A GPT-2-style byte-level BPE tokenizer trained on ``texts`` (EOS = <|endoftext|>)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(output_dir)
    return tok


def prepare_token_files(train_file, validation_file, output_dir, tokenizer_name_or_path=None,
                        train_tokenizer_vocab_size=None, source_prefix=None, overwrite_output_dir=False) -> dict:
    """Tokenize both files into ``output_dir`` (atomically); returns documents and tokens per split.

    Every input is checked before anything is written: the output folder, the tokenizer choice, the
    two data files, the tokenizer itself (``checkpoints.load_tokenizer``).
    """
    from .checkpoints import atomic_output_dir, check_output_dir
    from .data import token_stream

    check_output_dir(output_dir, overwrite_output_dir)
    if (tokenizer_name_or_path is None) == (train_tokenizer_vocab_size is None):
        raise ValueError("give exactly one of --tokenizer_name_or_path or --train_tokenizer_vocab_size")
    if train_tokenizer_vocab_size is not None and train_tokenizer_vocab_size <= 256:
        raise ValueError(f"--train_tokenizer_vocab_size must be > 256 (the byte alphabet), got {train_tokenizer_vocab_size}")
    for flag, file in (("--train_file", train_file), ("--validation_file", validation_file)):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{flag}: data file not found: {file}")
    tokenizer = None if tokenizer_name_or_path is None else load_tokenizer_from_flag(tokenizer_name_or_path)
    texts = {"train": _documents(train_file, source_prefix, "--train_file"),
             "validation": _documents(validation_file, source_prefix, "--validation_file")}
    out = {}
    with atomic_output_dir(output_dir, overwrite_output_dir) as tmp:
        if tokenizer is None:
            tokenizer = train_bpe_tokenizer(texts["train"], train_tokenizer_vocab_size, os.path.join(tmp, "tokenizer"))
        dtype = np.uint16 if len(tokenizer) < 65536 else np.int32
        for split, split_texts in texts.items():
            ids = token_stream(split_texts, tokenizer).numpy()
            np.save(os.path.join(tmp, f"{split}.npy"), ids.astype(dtype))
            out[split] = {"documents": len(split_texts), "tokens": int(len(ids))}
    return out
