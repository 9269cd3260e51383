import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import Phase, settings

# the mutation run (tests/mutation/run_mutants.py) stops at the first failing example: no shrinking
settings.register_profile("mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate], database=None)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from modeling_sparse_gpt2 import COMPONENTS, SparseGPT2Config, SparseGPT2LMHeadModel  # noqa: E402

ALL = list(COMPONENTS)


def tiny_config(**overrides) -> SparseGPT2Config:
    """A tiny GPT-2 with every sparse component on (the default of the test suite)."""
    kwargs = dict(
        vocab_size=97,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        sparse_components=ALL,
        poly_keep_ratio=0.5,
        k_freq=6,
        feedback_rank=4,
        feedback_window=3,
        micro_group_size=8,
        micro_keep_ratio=0.5,
        tensor_blocks=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return SparseGPT2Config(**kwargs)


def make_nonzero(model, seed: int = 0):
    """Give the components that start at zero output (feedback, micro) random weights and the gates
    values other than 1, so tests exercise every component's contribution rather than a zero."""
    from modeling_sparse_gpt2.modeling_sparse_gpt2 import sparse_ffns

    g = torch.Generator().manual_seed(seed)
    randn = lambda t: torch.randn(t.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        for ffn in sparse_ffns(model):
            if "micro" in ffn.components:
                blocks = ffn.components["micro"].blocks
                blocks.copy_(randn(blocks) * 0.2)
            if "feedback" in ffn.components:  # strong enough that a wrong decode state changes tokens
                ffn.w_in("feedback").copy_(randn(ffn.w_in("feedback")) * 0.5)
                ffn.w_out("feedback").copy_(randn(ffn.w_out("feedback")) * 2.0)
            ffn.gates.weight.copy_(1 + 0.1 * randn(ffn.gates.weight))
    return model


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = SparseGPT2LMHeadModel(tiny_config(**overrides))
    return make_nonzero(model, seed).eval()


def run_without_the_package(body: str, tmp_path, hidden_path: str):
    """Run ``body`` (Python source) in a fresh process that cannot import this package (as a Hub user
    without it, remote code only), with its own remote-code cache; returns the CompletedProcess."""
    prelude = f"""
import builtins, sys
real_import = builtins.__import__
def guarded(name, *a, **k):
    if name == "modeling_sparse_gpt2" or name.startswith("modeling_sparse_gpt2."):
        raise ImportError("package not installed: " + name)
    return real_import(name, *a, **k)
builtins.__import__ = guarded
sys.path = [p for p in sys.path if p not in ("", {hidden_path!r})]
"""
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(body)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


def save_tiny_dense_gpt2(path, n_layer: int = 1, **overrides):
    """A tiny dense GPT-2 with the embedded model's tokenizer (so the scripts can read text), saved
    to ``path``; returns the model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from modeling_sparse_gpt2.tooling.checkpoints import DEFAULT_MODEL, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL)
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=n_layer, n_head=4, vocab_size=len(tok), n_positions=64,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **overrides)  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny shapes: a second OpenMP thread only adds spin-wait (10x slower when the two cores are
    shared with another process), so a module that asks for this runs with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model():
    return tiny_model()
