"""Loading, saving and the argument groups shared by the scripts and the main job."""

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default")
DEFAULT_MODEL = os.path.join(DEFAULT_DIR, "dense-gpt2-pydocs")
DEFAULT_CALIBRATION = os.path.join(DEFAULT_DIR, "data", "pydocs-train-sample.jsonl")
DEFAULT_VALIDATION = os.path.join(DEFAULT_DIR, "data", "pydocs-heldout.jsonl")


@dataclass
class DataArguments:
    calibration_file: str | None = field(default=None, metadata={"help": "Local .txt/.jsonl (with a 'text' field) for calibration."})
    train_file: str | None = field(default=None, metadata={"help": "Local text for healing (default: the calibration text)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local held-out text for perplexity."})
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset instead of local files (e.g. wikitext)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "e.g. wikitext-2-raw-v1."})
    num_calibration_samples: int = field(default=64, metadata={"help": "Calibration sequences of block_size tokens."})
    block_size: int | None = field(default=None, metadata={"help": "Sequence length (default: min(n_positions, 512))."})
    text_column: str = field(default="text", metadata={"help": "Field holding the text."})

    def __post_init__(self):
        if self.num_calibration_samples < 1:
            raise ValueError(f"num_calibration_samples must be >= 1, got {self.num_calibration_samples}")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}")


def load_tokenizer(name_or_path: str):
    """AutoTokenizer, falling back to GPT-2's vocab.json/merges.txt pair in a bare folder."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception:
        if os.path.isfile(os.path.join(name_or_path, "vocab.json")) and os.path.isfile(os.path.join(name_or_path, "merges.txt")):
            return GPT2TokenizerFast.from_pretrained(name_or_path)
        raise


def load_causal_lm(name_or_path: str, expect: str | None = None, dtype=torch.float32):
    """Load a causal LM; ``expect="gpt2"`` refuses any other model_type with a clear error."""
    looks_local = name_or_path.startswith((".", os.path.sep, "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"model folder not found: {name_or_path}")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read a model config from {name_or_path}: {err}") from err
    if expect is not None and config.model_type != expect:
        raise ValueError(f"{name_or_path} is a {config.model_type!r} model; expected a dense GPT-2 (model_type {expect!r})")
    return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)


def check_output_dir(output_dir: str, overwrite: bool):
    """Refuse an existing non-empty output folder unless ``overwrite`` (before any work starts)."""
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"output folder {output_dir} exists and is not empty; pass --overwrite_output_dir to replace it")


@contextlib.contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool):
    """Yield a temporary folder beside ``output_dir``; it replaces ``output_dir`` only on success.

    An existing non-empty ``output_dir`` without ``overwrite`` is an error before any work starts;
    an exception (or a kill) leaves no partial ``output_dir`` behind.
    """
    output_dir = os.path.abspath(output_dir)
    check_output_dir(output_dir, overwrite)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(output_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.replace(output_dir, os.path.join(old, "x"))
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def save_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
