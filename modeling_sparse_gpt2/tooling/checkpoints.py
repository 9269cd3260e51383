"""Finding, loading and writing checkpoints: local folders checked before any Hub call, atomic output folders."""

import contextlib
import json
import os
import shutil
import tempfile

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2TokenizerFast

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "default")
DEFAULT_MODEL = os.path.join(DEFAULT_DIR, "dense-gpt2-pydocs")
DEFAULT_CALIBRATION = os.path.join(DEFAULT_DIR, "data", "pydocs-train-sample.jsonl")
DEFAULT_VALIDATION = os.path.join(DEFAULT_DIR, "data", "pydocs-heldout.jsonl")

MODEL_KINDS = {"gpt2": "a dense GPT-2", "sparse_gpt2": "a sparse GPT-2 (a converted checkpoint)"}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def check_model_source(name_or_path: str, flag: str = "--model_name_or_path"):
    """Fail fast, before any Hub call, when ``name_or_path`` can be neither a local folder nor a Hub model.

    A name that looks like a path (``./x``, ``../x``, ``/x``, ``~/x``, ``a/b/c``), or any name while
    ``HF_HUB_OFFLINE`` is set and nothing is cached for it, must be an existing folder. Other names
    are Hub ids: one quick look-up tells a missing repository or an unreachable Hub apart in seconds
    (the download path retries for about half a minute first).
    """
    if os.path.isdir(name_or_path):
        return
    looks_local = name_or_path.startswith((".", os.path.sep, "~")) or name_or_path.count("/") > 1 or os.path.exists(name_or_path)
    if looks_local:
        raise FileNotFoundError(f"{flag}: model folder not found: {name_or_path}")
    from huggingface_hub import model_info, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return  # in the local Hub cache
    except HFValidationError:
        raise FileNotFoundError(f"{flag}: {name_or_path} is not a local folder nor a valid Hub model id") from None
    if _hub_offline():
        raise FileNotFoundError(f"{flag}: model folder not found: {name_or_path} (HF_HUB_OFFLINE is set and the Hub cache has no such model)")
    try:
        model_info(name_or_path, timeout=10)
    except GatedRepoError:
        return  # exists; from_pretrained says what access it needs
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{flag}: {name_or_path} is not a local folder nor a model on the Hub") from None
    except Exception as err:  # connection errors of the HTTP client (httpx), timeouts
        raise FileNotFoundError(
            f"{flag}: {name_or_path} is not a local folder, and the Hub could not be reached to fetch it ({type(err).__name__}: {err})"
        ) from None


def load_tokenizer(name_or_path: str, flag: str = "--model_name_or_path"):
    """AutoTokenizer, falling back to GPT-2's vocab.json/merges.txt pair in a bare folder."""
    check_model_source(name_or_path, flag)
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception:
        if os.path.isfile(os.path.join(name_or_path, "vocab.json")) and os.path.isfile(os.path.join(name_or_path, "merges.txt")):
            return GPT2TokenizerFast.from_pretrained(name_or_path)
        raise


def load_causal_lm(name_or_path: str, expect: str | None = None, dtype=torch.float32, flag: str = "--model_name_or_path"):
    """Load a causal LM; ``expect`` ("gpt2" or "sparse_gpt2") refuses any other model_type, saying what it got.

    Unreadable weights raise ``ValueError`` naming the weight file.
    """
    check_model_source(name_or_path, flag)
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{flag}: could not read a model config from {name_or_path}: {err}") from err
    if expect is not None and config.model_type != expect:
        raise ValueError(
            f"{flag}: {name_or_path} is a {config.model_type!r} model; expected {MODEL_KINDS[expect]} (model_type {expect!r})"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except Exception as err:
        if type(err).__name__ != "SafetensorError" and not isinstance(err, (OSError, EOFError, RuntimeError)):
            raise
        files = sorted(f for f in os.listdir(name_or_path) if f.endswith((".safetensors", ".bin"))) if os.path.isdir(name_or_path) else []
        where = ", ".join(os.path.join(name_or_path, f) for f in files) or name_or_path
        raise ValueError(f"{flag}: the weights in {where} could not be read ({type(err).__name__}: {err})") from err


def check_output_dir(output_dir: str, overwrite: bool):
    """Refuse an existing non-empty output folder unless ``overwrite`` (before any work starts)."""
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)) and not overwrite:
        raise FileExistsError(f"--output_dir: {output_dir} exists and is not empty; pass --overwrite_output_dir to replace it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool):
    """Yield a temporary folder beside ``output_dir``; it replaces ``output_dir`` only on success.

    An existing non-empty ``output_dir`` without ``overwrite`` is an error before any work starts;
    an exception (or a kill) leaves no partial ``output_dir`` behind. The folder and its files get
    the permissions the user's umask gives (``mkdtemp`` alone would leave the folder 0700).
    """
    output_dir = os.path.abspath(output_dir)
    check_output_dir(output_dir, overwrite)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
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


def save_model_and_tokenizer(folder: str, model, tokenizer, save_model=None):
    """Write ``model`` (through ``save_model(folder)`` if given, e.g. ``trainer.save_model``) and its tokenizer.

    The saved config says ``use_cache: true`` (training turns it off) and the tokenizer's
    ``model_max_length`` is the model's context, ``n_positions``.
    """
    model.config.use_cache = True
    (save_model or model.save_pretrained)(folder)
    tokenizer.model_max_length = model.config.n_positions
    tokenizer.save_pretrained(folder)


def save_json(path: str, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
