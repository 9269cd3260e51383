"""SparseGPT2 behaves like GPT-2 inside transformers (tiny CPU configs, every component on)."""

import os

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
    pipeline,
)

from modeling_sparse_gpt2 import (
    SparseGPT2ForSequenceClassification,
    SparseGPT2LMHeadModel,
    SparseGPT2Model,
    UltraEfficientSparseFFN,
)

from conftest import make_nonzero, run_without_the_package, tiny_config, tiny_model
from test_flops import TokenDataset


def ids(batch=2, seq=12, seed=0, vocab=97):
    return torch.randint(1, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_every_block_mlp_is_the_sparse_ffn(model):
    assert all(isinstance(b.mlp, UltraEfficientSparseFFN) for b in model.transformer.h)
    for b in model.transformer.h:  # GPT-2's names, the sparse model's (narrower) widths
        assert b.mlp.c_fc.out_features == b.mlp.c_proj.in_features < model.config.inner_dim
        assert b.mlp.c_proj.in_features == sum(s.stop - s.start for s in b.mlp.segments.values())


def test_auto_classes_resolve_sparse_gpt2(tmp_path):
    config = tiny_config()
    assert type(AutoModel.from_config(config)) is SparseGPT2Model
    assert type(AutoModelForCausalLM.from_config(config)) is SparseGPT2LMHeadModel
    assert type(AutoModelForSequenceClassification.from_config(config)) is SparseGPT2ForSequenceClassification
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "sparse_gpt2"


def test_save_and_load_give_identical_logits(model, tmp_path):
    x = ids()
    expected = model(x).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SparseGPT2LMHeadModel
    torch.testing.assert_close(loaded(x).logits, expected, atol=0, rtol=0)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_save_pretrained_writes_auto_map_and_model_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    for cls in ("AutoConfig", "AutoModel\"", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        assert cls in config
    for f in ("modeling_sparse_gpt2.py", "configuration_sparse_gpt2.py", "sparse_ffn.py", "polynomial.py",
              "spectral.py", "feedback.py", "tensor.py", "micro.py", "gates.py", "component_base.py"):
        assert (tmp_path / f).exists(), f


def test_remote_code_loads_without_the_package_installed(model, tmp_path):
    """A user without this package: trust_remote_code, in a fresh process that cannot import it."""
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    x = ids()
    torch.save({"ids": x, "logits": model(x).logits.detach()}, tmp_path / "expected.pt")
    out = run_without_the_package(f"""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        exp = torch.load({str(tmp_path / "expected.pt")!r})
        torch.testing.assert_close(model(exp["ids"]).logits, exp["logits"], atol=1e-6, rtol=0)
        print("REMOTE_OK", type(model).__name__)
        """, tmp_path, os.getcwd())
    assert "REMOTE_OK SparseGPT2LMHeadModel" in out.stdout, out.stderr[-3000:]


def test_input_and_output_embeddings_are_tied(model):
    assert model.lm_head.weight is model.transformer.wte.weight


def test_resize_token_embeddings(model):
    model.resize_token_embeddings(120)
    assert model.transformer.wte.weight.shape[0] == 120
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model(ids(vocab=120)).logits.shape[-1] == 120


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_cache_equals_without(model, num_beams):
    x = ids(batch=2, seq=7)
    kw = dict(max_new_tokens=16, do_sample=False, num_beams=num_beams, pad_token_id=0)
    if num_beams > 1:
        kw["num_return_sequences"] = 2
    with_cache = model.generate(x, use_cache=True, **kw)
    without = model.generate(x, use_cache=False, **kw)
    assert torch.equal(with_cache, without)


def test_left_padded_batch_equals_one_by_one(model):
    prompts = [ids(1, 5, seed=1)[0], ids(1, 9, seed=2)[0], ids(1, 2, seed=3)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, len(p):]
        # a row that reached eos alone stops there; in the batch it goes on with padding
        assert torch.equal(out[i, width : width + len(single)], single), i
        assert (out[i, width + len(single) :] == 0).all(), i


def test_eager_and_sdpa_attention_agree():
    x = ids()
    eager = tiny_model()
    eager.set_attn_implementation("eager")
    sdpa = tiny_model()
    sdpa.set_attn_implementation("sdpa")
    torch.testing.assert_close(eager(x).logits, sdpa(x).logits, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = ids()
    grads = []
    for checkpointing in (False, True):
        m = tiny_model().train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        m(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_every_parameter_gets_a_gradient():
    m = tiny_model().train()
    x = ids()
    m(x, labels=x).loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing


def test_torch_compile_forward_and_training_step():
    x = ids()
    m = tiny_model()
    expected = m(x).logits
    compiled = torch.compile(m, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(compiled(x).logits, expected, atol=1e-5, rtol=1e-5)

    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    step = torch.compile(lambda: m(x, labels=x).loss, backend="aot_eager")
    losses = []
    for _ in range(3):
        loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_finite(dtype):
    m = tiny_model().to(dtype)
    logits = m(ids()).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_text_generation_pipeline(model):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(ord("a") + i): i + 1 for i in range(26)}
    vocab["<eos>"] = 0
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    model.resize_token_embeddings(len(vocab))  # every id the model can choose has a spelling
    kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)  # min: no early stop on <eos>
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    out = pipe("abc", **kw)
    prompt = tokenizer("abc", return_tensors="pt").input_ids
    greedy = model.generate(prompt, pad_token_id=0, **kw)[0, prompt.shape[1] :]
    assert len(greedy) == 5, greedy
    assert out[0]["generated_text"] == "abc" + tokenizer.decode(greedy)  # the pipeline's text is greedy generate's


def test_sequence_classification_head():
    """Logits = the score head on the hidden state of each row's last non-pad token; loss = their CE."""
    torch.manual_seed(0)
    m = make_nonzero(SparseGPT2ForSequenceClassification(tiny_config(num_labels=3))).eval()
    x = ids(batch=3)
    x[0, 7:] = 0  # right padding (pad_token_id 0): row 0 ends at position 6, the others at 11
    x[2, 4:] = 0
    labels = torch.tensor([0, 2, 1])
    out = m(x, labels=labels)
    hidden = m.transformer(x).last_hidden_state
    expected = m.score(hidden[torch.arange(3), torch.tensor([6, 11, 3])])
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-6)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, labels), atol=1e-6, rtol=1e-6)


def test_trainer_loss_falls(tmp_path):
    model = tiny_model().train()
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    data = TokenDataset(24, 32, 20)  # 768 tokens drawn from 19 ids: learnable unigram statistics
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.5


def test_static_cache_generation_equals_generation_without_cache(model):
    x = ids(batch=2, seq=6)
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    static = model.generate(x, cache_implementation="static", **kw)
    assert torch.equal(static, model.generate(x, use_cache=False, **kw))


def test_a_training_step_reads_the_ffn_weights_in_place():
    """No concatenation, gate folding or copy of c_fc / c_proj per step: only the GEMMs read them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ffn = tiny_model().transformer.h[0].mlp.train()
    weights = {ffn.c_fc.weight.untyped_storage().data_ptr(), ffn.c_proj.weight.untyped_storage().data_ptr()}
    readers = set()

    class Readers(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [a for a in args if torch.is_tensor(a)] + [v for v in (kwargs or {}).values() if torch.is_tensor(v)]
            if any(t.untyped_storage().data_ptr() in weights for t in flat):
                readers.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 5, 32, requires_grad=True)
    with Readers():
        ffn(x).square().sum().backward()
    assert readers <= {"addmm", "mm", "t", "view", "transpose", "detach", "_unsafe_view", "alias"}, readers
    assert {"addmm", "mm"} & readers


@pytest.mark.parametrize("name", ["legacy_default", "legacy_all_token"])
def test_a_version_0_1_checkpoint_loads_with_identical_logits(name, tmp_path):
    """Checkpoints written by version 0.1 (projections on each component, a gate per output
    channel) load into the c_fc / c_proj layout exactly, and save back in the new layout.
    The fixtures were written by the 0.1 code: polynomial, spectral and feedback (its default then), and
    all five with token gates; per-channel gates not all 1, the micro gate constant over its channels."""
    folder = os.path.join(os.path.dirname(__file__), "fixtures", name)
    expected = torch.load(os.path.join(folder, "expected_logits.pt"))
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.gate_kind in ("scalar", "token")
    with torch.no_grad():
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
        model.save_pretrained(tmp_path)
        again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(expected["input_ids"]).logits, expected["logits"], atol=1e-5, rtol=0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not any("gates.channel" in k or "polynomial.w_in" in k for k in f.keys())
