from pathlib import Path

import pytest
from transformers import AutoConfig

from modeling_sparse_gpt2 import SparseGPT2Config
from modeling_sparse_gpt2.tooling.conversion import _layer_flops_ratio, preset_config

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
        ("sparse_components", ["spectral"], "'polynomial'"),
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
    achieved = [_layer_flops_ratio(preset, i) for i in range(preset.n_layer)]
    assert ratio - 0.005 <= min(achieved) and max(achieved) <= ratio
