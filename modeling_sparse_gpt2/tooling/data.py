"""Text in, token blocks out: the one way every script here reads data (through `datasets`)."""

import os

import torch


def load_texts(
    file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    max_chars: int | None = None,
) -> list[str]:
    """Texts from a local ``.txt``/``.jsonl``/``.json`` (optionally ``.xz``/``.gz``) file or a Hub dataset.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and what is wrong with it.
    """
    import datasets

    if (file is None) == (dataset_name is None):
        raise ValueError("give exactly one of a local file (--calibration_file/--train_file/...) or --dataset_name")
    if file is not None:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"data file not found: {file}")
        base = file
        for ext in (".xz", ".gz", ".bz2", ".zst"):
            base = base.removesuffix(ext)
        kind = {".txt": "text", ".jsonl": "json", ".json": "json"}.get(os.path.splitext(base)[1])
        if kind is None:
            raise ValueError(f"data file {file}: unsupported extension; use .txt, .jsonl or .json (optionally compressed)")
        try:
            ds = datasets.load_dataset(kind, data_files={"data": file}, split="data")
        except Exception as err:  # datasets raises many types for unreadable files
            raise ValueError(f"data file {file} could not be read: {err}") from err
        if kind == "text":
            # the text loader yields one row per line; put documents back together
            texts = ["\n".join(ds["text"])]
        else:
            if text_column not in ds.column_names:
                raise ValueError(f"data file {file} has no {text_column!r} field (fields: {ds.column_names})")
            texts = ds[text_column]
        source = file
    else:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
        if text_column not in ds.column_names:
            raise ValueError(f"dataset {dataset_name} has no {text_column!r} column (columns: {ds.column_names})")
        texts = ds[text_column]
        source = dataset_name
    texts = [t for t in texts if t and t.strip()]
    if max_chars is not None:
        kept, total = [], 0
        for t in texts:
            kept.append(t[: max_chars - total])
            total += len(kept[-1])
            if total >= max_chars:
                break
        texts = kept
    if not texts:
        raise ValueError(f"{source}: no non-empty text found")
    return texts


def load_split(file, dataset_name, dataset_config_name, split: str, text_column: str = "text") -> list[str]:
    """Texts of a local file if given, else of ``split`` of the Hub dataset."""
    if file:
        return load_texts(file, text_column=text_column)
    return load_texts(dataset_name=dataset_name, dataset_config_name=dataset_config_name, split=split, text_column=text_column)


def tokenize_blocks(
    texts: list[str], tokenizer, block_size: int, max_blocks: int | None = None, source: str = "data"
) -> torch.Tensor:
    """Concatenate documents (separated by EOS) and cut non-overlapping ``block_size`` windows.

    Returns a ``(num_blocks, block_size)`` LongTensor; the tail shorter than a block is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * block_size
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(
            f"{source}: only {len(ids)} tokens, fewer than one block of block_size={block_size}; "
            "give more text or a smaller --block_size"
        )
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    """All documents as one 1-D token stream (EOS between documents), for sliding-window evaluation."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
