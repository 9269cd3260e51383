"""The generated model card: what a Hub user reads before using the checkpoint (issue 14.5)."""

import re

import pytest
from huggingface_hub import ModelCard

from modeling_sparse_gpt2.configuration_sparse_gpt2 import SPARSE_KNOBS
from modeling_sparse_gpt2.tooling.budget import flops_by_component
from modeling_sparse_gpt2.tooling.model_card import make_model_card

from conftest import tiny_model


def card_text(model, **kw):
    return make_model_card(model, base_model="gpt2", perplexities={"dense": 18.5, "healed": 21.0}, seq_len=32, **kw).text


def knob_table(text) -> dict:
    section = text.split("## Knobs", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (\w+) \| (.+?) \| .* \|$", section, re.M) if m.group(1) != "knob"}


def test_card_says_to_install_from_source_and_gives_context_length_use_and_measurement():
    text = card_text(tiny_model())
    assert "pip install sparse-gpt2" not in text
    assert "not published on PyPI" in text and "pip install ." in text
    assert "Context length: **64 tokens**" in text  # n_positions of the tiny model
    for section in ("## Intended use and limitations", "## How the numbers were measured"):
        assert section in text
    for loader in ("AutoModelForCausalLM", "AutoTokenizer"):  # without the package both need the remote-code flag
        assert re.search(rf'{loader}\.from_pretrained\("[^"]*", trust_remote_code=True\)', text), loader


def test_knob_table_gives_resolved_values_of_active_components_only():
    model = tiny_model(sparse_components=["polynomial", "spectral"], k_freq=None, poly_num_terms=None)
    table = knob_table(card_text(model))
    spec = model.config.layer_spec(0)
    active = [k.name for k in SPARSE_KNOBS if k.component in (None, "polynomial", "spectral")]
    assert list(table) == active  # no micro_*, feedback_* or tensor_blocks
    assert "None" not in "".join(table.values())
    assert table["k_freq"] == f"`{spec.spectral_freqs}`"  # n_embd // 16, not None
    assert table["poly_num_terms"] == f"`{spec.poly_degree + 1}`"
    assert table["poly_keep_ratio"] == f"`0.5 ({spec.poly_neurons} neurons)`"


def test_knob_table_shows_per_layer_values_where_layers_differ():
    model = tiny_model(sparse_components=[["polynomial"], ["polynomial", "feedback"]], poly_keep_ratio=[0.5, 0.25])
    table = knob_table(card_text(model))
    assert table["poly_keep_ratio"] == "layer 0: 0.5 (64 neurons); layer 1: 0.25 (32 neurons)"
    assert table["feedback_rank"] == "`4`"  # active in layer 1 only, shown for it
    assert "k_freq" not in table


@pytest.mark.parametrize("gate_kind", ["scalar", "token"])
def test_flops_table_rows_are_the_per_component_sums(gate_kind):
    model = tiny_model(gate_kind=gate_kind)
    text = card_text(model)
    report = model.flops_report(1, 32)
    for component, flops in flops_by_component(model, 1, 32).items():
        assert f"| {component} | {flops:,} | {flops / report['FLOPs/ffn_dense_equivalent']:.4f} |" in text
    assert sum(flops_by_component(model, 1, 32).values()) == report["FLOPs/ffn_total"]
    assert ("| gates |" in text) == (gate_kind == "token")  # scalar gates cost no matmul FLOPs


def test_card_round_trips_through_the_hub_format(tmp_path):
    make_model_card(tiny_model(), base_model="gpt2", perplexities={"healed": 21.0}, seq_len=32).save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model == "gpt2"
    assert card.data.eval_results[0].metric_value == 21.0
