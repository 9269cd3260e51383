"""Reading a whole checkpoint's tensors, for loading sparse-gpt2 0.1 checkpoints into the current layout.

The model code that travels with a checkpoint reads no files; the package installs this reader on
``SparseGPT2PreTrainedModel.checkpoint_reader`` so that ``from_pretrained`` can rewrite a 0.1
checkpoint's per-component FFN tensors (``modeling_sparse_gpt2.load_legacy_ffn_weights``).
"""

import json

from safetensors.torch import load_file
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file


def read_checkpoint_tensors(name_or_path, kwargs) -> dict:
    """Every tensor of a safetensors checkpoint (one file or an index of shards), on the CPU."""
    hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token", "local_files_only") if kwargs.get(k) is not None}
    index = cached_file(name_or_path, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **hub)
    if index is None:
        return load_file(cached_file(name_or_path, SAFE_WEIGHTS_NAME, **hub))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(cached_file(name_or_path, shard, **hub)).items()}
