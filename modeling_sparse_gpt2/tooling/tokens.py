"""Token files for pre-training: text (via `datasets`) -> .npy token streams, optional BPE training."""

import os

import numpy as np


def _documents(file: str, source_prefix: str | None):
    import datasets

    ds = datasets.load_dataset("json", data_files={"data": file}, split="data")
    if source_prefix is not None:
        ds = ds.filter(lambda e: str(e.get("source", "")).startswith(source_prefix))
    return [t for t in ds["text"] if t and t.strip()]


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
                        train_tokenizer_vocab_size=None, source_prefix=None) -> dict:
    from transformers import AutoTokenizer

    from .data import token_stream

    os.makedirs(output_dir, exist_ok=True)
    train_texts = _documents(train_file, source_prefix)
    if train_tokenizer_vocab_size:
        tok_dir = os.path.join(output_dir, "tokenizer")
        tokenizer = train_bpe_tokenizer(train_texts, train_tokenizer_vocab_size, tok_dir)
    elif tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    else:
        raise ValueError("give --tokenizer_name_or_path or --train_tokenizer_vocab_size")
    out = {}
    for split, texts in (("train", train_texts), ("validation", _documents(validation_file, source_prefix))):
        ids = token_stream(texts, tokenizer).numpy()
        dtype = np.uint16 if len(tokenizer) < 65536 else np.int32
        np.save(os.path.join(output_dir, f"{split}.npy"), ids.astype(dtype))
        out[split] = {"documents": len(texts), "tokens": int(len(ids))}
    return out
