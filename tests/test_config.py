import itertools
import json
from dataclasses import fields
from pathlib import Path

import pytest
from transformers import AutoConfig, GPT2Config

from modeling_sparse_gpt2 import COMPONENTS, SparseGPT2Config
from modeling_sparse_gpt2.configuration_sparse_gpt2 import CONVERSION_DEFAULTS, SPARSE_KNOBS
from modeling_sparse_gpt2.tooling.budget import layer_flops_ratio
from modeling_sparse_gpt2.tooling.conversion import FITTED_KNOBS, ConversionArguments, preset_config, sparse_config_for_budget

from conftest import tiny_config


def test_config_round_trips_through_save_pretrained(tmp_path):
    config = tiny_config(poly_keep_ratio=[0.5, 0.25], gate_kind="token", sparse_components=[["polynomial"], ["polynomial", "tensor"]])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SparseGPT2Config)
    ignore = {"_name_or_path"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in ignore} == {
        k: v for k, v in config.to_dict().items() if k not in ignore
    }
    assert loaded.layer_spec(1).components == ("polynomial", "tensor")
    assert loaded.layer_spec(1).poly_neurons == 32


def test_per_layer_knobs_give_per_layer_shapes():
    config = tiny_config(poly_keep_ratio=[1.0, 0.25], k_freq=[4, 8], poly_degree=[3, 5])
    assert [config.layer_spec(i).poly_neurons for i in range(2)] == [128, 32]
    assert [config.layer_spec(i).spectral_freqs for i in range(2)] == [4, 8]
    assert [config.layer_spec(i).poly_degree for i in range(2)] == [3, 5]


@pytest.mark.parametrize(
    "knob, value, message",
    [
        ("poly_keep_ratio", 0.0, "poly_keep_ratio must be a number in (0, 1]"),
        ("poly_keep_ratio", 1.5, "poly_keep_ratio"),
        ("poly_keep_ratio", -0.1, "poly_keep_ratio"),
        ("micro_keep_ratio", 2, "micro_keep_ratio"),
        ("k_freq", 33, "k_freq must be an integer in [1, 32]"),
        ("k_freq", 0, "k_freq"),
        ("poly_degree", 0, "poly_degree"),
        ("poly_num_terms", 10, "poly_num_terms"),
        ("sparse_components", ["polynomial", "wavelet"], "unknown component 'wavelet'"),
        ("sparse_components", ["spectral", "spectral"], "duplicate component"),
        ("poly_coefficients", "per_channel", "poly_coefficients must be one of ('shared', 'per_neuron')"),
        ("sparse_components", [], "sparse_components"),
        ("poly_keep_ratio", [0.5], "n_layer=2 entries"),
        ("micro_steps", -1, "micro_steps"),
        ("micro_group_size", 5, "micro_group_size must divide n_embd"),
        ("tensor_blocks", 3, "tensor_blocks must divide n_embd"),
        ("feedback_rank", 0, "feedback_rank"),
        ("feedback_window", 0, "feedback_window"),
        ("gate_kind", "softmax", "gate_kind"),
        ("spectral_selection", "random", "spectral_selection"),
        ("poly_domain", -1.0, "poly_domain"),
        ("resid_pdrop", 1.5, "resid_pdrop"),
        ("poly_degree", 2.5, "poly_degree"),
    ],
)
def test_invalid_knob_raises_value_error_naming_it(knob, value, message):
    with pytest.raises(ValueError) as err:
        tiny_config(**{knob: value})
    assert message in str(err.value)
    assert knob in str(err.value)


def test_invalid_knob_in_saved_config_fails_at_load(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(path.read_text().replace('"k_freq": 6', '"k_freq": 999'))
    with pytest.raises(ValueError, match="k_freq"):
        SparseGPT2Config.from_pretrained(tmp_path)


def test_config_writes_auto_map_naming_every_auto_class():
    auto_map = tiny_config().auto_map
    for cls in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        assert cls in auto_map


@pytest.mark.parametrize("ratio", [0.5, 0.4, 0.2])
def test_config_presets_are_what_the_conversion_picks_and_meet_their_budget(ratio):
    path = Path(__file__).resolve().parents[1] / "configs" / f"gpt2-small-ffn{ratio}.json"
    preset = SparseGPT2Config.from_json_file(str(path))
    expected = preset_config(ratio)
    assert preset.to_diff_dict() == expected.to_diff_dict(), "run scripts/make_config_presets.py"
    achieved = [layer_flops_ratio(preset, i) for i in range(preset.n_layer)]
    assert ratio - 0.005 <= min(achieved) and max(achieved) <= ratio


@pytest.mark.parametrize("size", range(1, len(COMPONENTS) + 1))
def test_every_non_empty_component_set_is_a_valid_config(size):
    for components in itertools.combinations(COMPONENTS, size):
        config = tiny_config(sparse_components=list(reversed(components)))
        assert config.layer_spec(0).components == components  # in canonical order


def test_config_fields_are_the_declared_knobs_with_their_defaults():
    config = SparseGPT2Config()
    written = json.loads(config.to_json_string(use_diff=False))
    for knob in SPARSE_KNOBS:
        expected = list(COMPONENTS) if knob.name == "sparse_components" else knob.default
        assert getattr(config, knob.name) == expected, knob.name
        assert written[knob.name] == expected, knob.name  # a dataclass field, so it is saved


def test_legacy_channel_gates_load_as_scalar_and_save_as_scalar(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, "gate_kind": ["channel", "token"]}))
    loaded = SparseGPT2Config.from_pretrained(tmp_path)
    assert loaded.gate_kind == ["scalar", "token"]
    assert loaded.layer_spec(0).gate_kind == "scalar"
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["gate_kind"] == ["scalar", "token"]


def _other_valid_value(knob):
    """A valid value of ``knob`` for an n_embd=32 model that is neither its config nor its conversion default."""
    if knob.kind == "choice":
        return next(c for c in knob.choices if c != knob.default)
    if knob.kind == "int":
        return 2 if knob.divides_n_embd else 3
    return {"components": ["polynomial", "tensor"], "ratio": 0.5, "number": 2.5}[knob.kind]


def test_conversion_arguments_are_the_knobs_with_the_stated_defaults_and_reach_the_config():
    own = {"ffn_flops_ratio", "neuron_selection", "budget_mode", "poly_domain_rule", "ridge", "calibration_batch_size"}
    knobs = [k for k in SPARSE_KNOBS if k.name not in FITTED_KNOBS]
    assert {f.name for f in fields(ConversionArguments)} == own | {k.name for k in knobs}
    defaults = ConversionArguments()
    for knob in knobs:
        assert getattr(defaults, knob.name) == CONVERSION_DEFAULTS.get(knob.name, (knob.default,))[0], knob.name
    dense = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=97, bos_token_id=0, eos_token_id=0)
    chosen = {k.name: _other_valid_value(k) for k in knobs}
    config = sparse_config_for_budget(dense, ConversionArguments(**chosen, ffn_flops_ratio=0.9))
    for name, value in chosen.items():
        if name != "poly_keep_ratio":
            assert config.knob(name, 1) == value, name
    assert config.poly_keep_ratio == [0.5, 0.5]  # given, it overrides the budget


def test_conversion_arguments_refuse_a_bad_knob_before_any_work():
    with pytest.raises(ValueError, match=r"gate_kind must be one of \('scalar', 'token'\)"):
        ConversionArguments(gate_kind="softmax")
    with pytest.raises(ValueError, match=r"k_freq must be an integer in \[1, n_embd\]"):
        ConversionArguments(k_freq=0)
    with pytest.raises(ValueError, match="add polynomial to --sparse_components"):
        ConversionArguments(sparse_components=["spectral", "tensor"])
