"""Text in, token blocks out: the one way every command here reads data (through `datasets`).

The data flags are declared once, in small argument groups that each command combines:
``TextArguments`` (where text comes from on the Hub, and the block size), ``CalibrationText``,
``TrainText``, ``HeldOutText``; ``ConvertDataArguments`` .. ``MainJobDataArguments`` are the combinations.
"""

import os
from dataclasses import dataclass, field

import torch

DEFAULT_BLOCK_SIZE = 512


def _next_post_init(obj, cls):
    """Run the next ``__post_init__`` in the MRO, so every combined argument group checks its own fields."""
    nxt = getattr(super(cls, obj), "__post_init__", None)
    if nxt is not None:
        nxt()


@dataclass
class TextArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset to read instead of local files (e.g. wikitext)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name (e.g. wikitext-2-raw-v1)."})
    text_column: str = field(default="text", metadata={"help": "Field (column) that holds the text."})
    block_size: int | None = field(default=None, metadata={"help": f"Tokens per sequence; default min(n_positions, {DEFAULT_BLOCK_SIZE})."})

    def __post_init__(self):
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be >= 2, got {self.block_size}")
        _next_post_init(self, TextArguments)


@dataclass
class CalibrationText:
    calibration_file: str | None = field(default=None, metadata={"help": "Local .txt/.jsonl/.json file (optionally .gz/.xz) of calibration text."})
    num_calibration_samples: int = field(default=64, metadata={"help": "Calibration sequences of --block_size tokens."})

    def __post_init__(self):
        if self.num_calibration_samples < 1:
            raise ValueError(f"--num_calibration_samples must be >= 1, got {self.num_calibration_samples}")
        _next_post_init(self, CalibrationText)


@dataclass
class TrainText:
    train_file: str | None = field(default=None, metadata={"help": "Local text file for healing (default: the 'train' split of --dataset_name)."})


@dataclass
class HeldOutText:
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out text file (default: the 'validation' split of --dataset_name)."})


@dataclass
class ConvertDataArguments(CalibrationText, TextArguments):
    pass


@dataclass
class HealDataArguments(TrainText, HeldOutText, TextArguments):
    pass


@dataclass
class EvaluateDataArguments(HeldOutText, TextArguments):
    pass


@dataclass
class MainJobDataArguments(CalibrationText, TrainText, HeldOutText, TextArguments):
    pass


def block_size_for(config, requested: int | None) -> int:
    """``requested``, or ``min(n_positions, DEFAULT_BLOCK_SIZE)``; never more than the model's context."""
    block = requested or min(config.n_positions, DEFAULT_BLOCK_SIZE)
    if block > config.n_positions:
        raise ValueError(f"--block_size {block} exceeds the model's context n_positions={config.n_positions}")
    return block


def load_texts(
    file: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    text_column: str = "text",
    file_flag: str = "--calibration_file",
    source_prefix: str | None = None,
) -> list[str]:
    """Texts from a local ``.txt``/``.jsonl``/``.json`` (optionally ``.xz``/``.gz``/``.bz2``/``.zst``) file or a Hub dataset.

    ``source_prefix`` keeps only the records whose ``source`` field starts with it (JSON files).
    Raises ``FileNotFoundError`` / ``ValueError`` naming the file (or ``file_flag``) and what is wrong.
    """
    import datasets

    if (file is None) == (dataset_name is None):
        raise ValueError(f"give exactly one of {file_flag} (a local file) or --dataset_name")
    if file is not None:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file_flag}: data file not found: {file}")
        if os.path.getsize(file) == 0:
            raise ValueError(f"{file_flag}: data file {file} is empty (0 bytes)")
        base = file
        for ext in (".xz", ".gz", ".bz2", ".zst"):
            base = base.removesuffix(ext)
        kind = {".txt": "text", ".jsonl": "json", ".json": "json"}.get(os.path.splitext(base)[1])
        if kind is None:
            raise ValueError(f"{file_flag}: data file {file}: unsupported extension; use .txt, .jsonl or .json (optionally compressed)")
        try:
            ds = datasets.load_dataset(kind, data_files={"data": file}, split="data")
        except Exception as err:  # datasets raises many types for unreadable files, some with empty messages
            cause = err.__cause__ or err.__context__
            why = str(err) or (f"{type(cause).__name__}: {cause}" if cause else type(err).__name__)
            raise ValueError(f"{file_flag}: data file {file} could not be read as {kind}: {why}") from err
        if kind == "text":
            # the text loader yields one row per line; put documents back together
            texts = ["\n".join(ds["text"])]
        else:
            if text_column not in ds.column_names:
                raise ValueError(f"{file_flag}: data file {file} has no {text_column!r} field (fields: {ds.column_names}); see --text_column")
            if source_prefix is not None:
                if "source" not in ds.column_names:
                    raise ValueError(f"--source_prefix: data file {file} has no 'source' field (fields: {ds.column_names})")
                ds = ds.filter(lambda e: str(e.get("source", "")).startswith(source_prefix))
            texts = ds[text_column]
        source = f"{file_flag}: data file {file}" + (f" (records whose 'source' starts with {source_prefix!r})" if source_prefix else "")
    else:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
        if text_column not in ds.column_names:
            raise ValueError(f"--dataset_name {dataset_name} has no {text_column!r} column (columns: {ds.column_names}); see --text_column")
        texts = ds[text_column]
        source = f"--dataset_name {dataset_name} (split {split})"
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError(f"{source}: no non-empty text found in the {text_column!r} field")
    return texts


def load_split(file, dataset_name, dataset_config_name, split: str, text_column: str = "text", file_flag: str = "--calibration_file") -> list[str]:
    """Texts of a local file if given, else of ``split`` of the Hub dataset."""
    if file:
        return load_texts(file, text_column=text_column, file_flag=file_flag)
    return load_texts(dataset_name=dataset_name, dataset_config_name=dataset_config_name, split=split, text_column=text_column, file_flag=file_flag)


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
