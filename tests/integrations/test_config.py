"""SparseConfig is the one place that validates the integration's settings: at construction, on
assignment and from a file, naming the field (and the file)."""

import dataclasses
import json
import re

import pytest

from sparse_attn.integrations.hf import SparseConfig
from sparse_attn.integrations.hf.config import FALLBACKS, SparseConfigError
from sparse_attn.methods import KnobError

BAD = [
    ({"method": "nope"}, "SparseConfig: method: unknown method 'nope'"),
    ({"method": 3}, "SparseConfig: method=3 is not a method name"),
    ({"knobs": {"threshold": 2}}, "SparseConfig: knobs: xattention: threshold=2 is outside (0, 1]"),
    ({"knobs": {"threshold": float("nan")}}, "SparseConfig: knobs: xattention: threshold=nan is not a number"),
    ({"knobs": {"threshold": "high"}}, "SparseConfig: knobs: xattention: threshold='high' is not a number"),
    ({"knobs": {"stride": 0}}, "SparseConfig: knobs: xattention: stride=0 is not >= 1"),
    ({"knobs": {"block_size": 0}}, "SparseConfig: knobs: xattention: block_size=0 is not one of"),
    ({"knobs": {"gamma": 0.5}}, "SparseConfig: knobs: method 'xattention' has no knob(s) ['gamma']"),
    ({"method": "flexprefill", "knobs": {"gamma": 5}}, "SparseConfig: knobs: flexprefill: gamma=5 is outside (0, 1]"),
    ({"method": "vertical_slash", "knobs": {"vertical_size": -3}},
     "SparseConfig: knobs: vertical_slash: vertical_size=-3 is not >= 0"),
    ({"knobs": {"per_layer": {1: {"threshold": 2}}}},
     "SparseConfig: knobs: xattention: per_layer[1]: threshold=2 is outside (0, 1]"),
    ({"knobs": []}, "SparseConfig: knobs=[] is not a dict"),
    ({"layers": {3: {"threshold": 2}}}, "SparseConfig: layers[3]: xattention: threshold=2 is outside (0, 1]"),
    ({"layers": {3: {"method": "flexprefill", "gamma": 5}}}, "SparseConfig: layers[3]: flexprefill: gamma=5"),
    ({"layers": {3: {"method": "nope"}}}, "SparseConfig: layers[3]: unknown method 'nope'"),
    ({"layers": {3: {"method": "dense", "window": 4}}}, "SparseConfig: layers[3]: method 'dense' has no knob(s)"),
    ({"layers": {-1: {"method": "dense"}}}, "SparseConfig: layers has key -1, not a layer index"),
    ({"layers": {"x": {}}}, "SparseConfig: layers has key 'x', not a layer index"),
    ({"layers": {1: "dense"}}, "SparseConfig: layers[1]='dense' is not a dict"),
    ({"dense_first_layers": -1}, "SparseConfig: dense_first_layers=-1 is not >= 0"),
    ({"min_kv_len": -1}, "SparseConfig: min_kv_len=-1 is not >= 0"),
    ({"min_kv_len": 1.5}, "SparseConfig: min_kv_len=1.5 is not an int"),
    ({"min_kv_len": "8192"}, "SparseConfig: min_kv_len='8192' is not an int"),
    ({"min_kv_len": True}, "SparseConfig: min_kv_len=True is a bool"),
    ({"fallback": "sometimes"}, "SparseConfig: fallback='sometimes' is not one of 'auto', 'length', 'never'"),
    ({"decode": "nope"}, "SparseConfig: decode: unknown method 'nope'"),
    ({"decode": {"top_k": 8}}, "SparseConfig: decode={'top_k': 8} has no 'method' key"),
    ({"decode": {"method": "quest", "top_k": 0}}, "SparseConfig: decode: quest: top_k=0 is not >= 1"),
    ({"decode": 3}, "SparseConfig: decode=3 is not 'dense', a method name"),
    ({"record": "yes"}, "SparseConfig: record='yes' is not a bool"),
    ({"measure_recall": 1}, "SparseConfig: measure_recall=1 is not a bool"),
    ({"backend": "cuda"}, "SparseConfig: backend='cuda' is not one of"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[m.split(": ", 1)[1][:40] for _, m in BAD])
def test_constructor_refuses_bad_fields(fields, message):
    with pytest.raises(SparseConfigError, match=re.escape(message)):
        SparseConfig(**fields)
    with pytest.raises(SparseConfigError, match=re.escape(message)):
        SparseConfig.from_dict(fields)


def test_good_fields_pass():
    config = SparseConfig(method="flexprefill", knobs={"gamma": [0.9, 1.0], "tau": 0, "min_budget": 0},
                          layers={"2": {"method": "oracle", "top_p": 1}, 3: {"method": "dense"}, 4: {"gamma": 0.5}},
                          dense_first_layers=1, min_kv_len=0, fallback="never",
                          decode={"method": "quest", "top_k": 32}, record=True, measure_recall=True,
                          backend="reference")
    assert set(config.layers) == {2, 3, 4}  # JSON-style keys read as ints
    assert config.method_for(0) is None and config.method_for(3) is None
    assert config.method_for(2).name == "oracle" and config.method_for(2).top_p == 1
    assert config.method_for(4).gamma == 0.5 and config.method_for(4).tau == 0  # the layer inherits knobs
    assert config.method_for(7).gamma == [0.9, 1.0]
    for fallback in FALLBACKS:
        SparseConfig(fallback=fallback)


def test_errors_are_value_errors():
    assert issubclass(SparseConfigError, KnobError) and issubclass(SparseConfigError, ValueError)


def test_assignment_is_checked_and_a_refused_value_leaves_the_config_as_it_was():
    config = SparseConfig(knobs={"threshold": 0.9})
    with pytest.raises(SparseConfigError, match=re.escape("SparseConfig: min_kv_len=-1 is not >= 0")):
        config.min_kv_len = -1  # what `sparse-attn generate --min-kv-len -1` does
    assert config.min_kv_len == 8192
    config.min_kv_len = 0
    assert config.min_kv_len == 0
    with pytest.raises(SparseConfigError, match="fallback='x'"):
        config.fallback = "x"
    with pytest.raises(SparseConfigError, match="record=1"):
        config.record = 1
    config.record = True
    with pytest.raises(SparseConfigError, match=re.escape("knobs: xattention: threshold=2 is outside (0, 1]")):
        config.knobs = {"threshold": 2}
    assert config.knobs == {"threshold": 0.9} and config.method_for(0).threshold == 0.9
    with pytest.raises(SparseConfigError, match="unknown method 'nope'"):
        config.method = "nope"
    assert config.method == "xattention"
    # A new valid value rebuilds the methods it affects.
    config.knobs = {"threshold": 0.5}
    assert config.method_for(0).threshold == 0.5
    with pytest.raises(SparseConfigError, match=re.escape("knobs: method 'oracle' has no knob(s) ['threshold']")):
        config.method = "oracle"  # the knobs are xattention's: change both at once with dataclasses.replace
    assert config.method == "xattention"
    config = dataclasses.replace(config, method="oracle", knobs={"top_p": 0.5})
    assert config.method_for(0).name == "oracle" and config.min_kv_len == 0 and config.record
    config.layers = {"1": {"method": "dense"}}
    assert config.layers == {1: {"method": "dense"}} and config.method_for(1) is None
    config.decode = "quest"
    assert config._decode_method.name == "quest"
    config.decode = "dense"
    assert config._decode_method is None


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def test_from_file_refuses_a_bad_knob_naming_the_file_and_the_field(tmp_path):
    path = _write(tmp_path / "bad_knob.json", {"method": "xattention", "knobs": {"threshold": 2}})
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: SparseConfig: knobs: xattention: threshold=2 "
                                                          "is outside (0, 1]")):
        SparseConfig.from_file(path)
    path = _write(tmp_path / "bad_layer.json", {"layers": {"3": {"method": "oracle", "top_p": -1}}})
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: SparseConfig: layers[3]: oracle: top_p=-1")):
        SparseConfig.from_file(path)
    path = _write(tmp_path / "bad_length.json", {"min_kv_len": -1})
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: SparseConfig: min_kv_len=-1 is not >= 0")):
        SparseConfig.from_file(path)


def test_from_file_refuses_unknown_keys_naming_them(tmp_path):
    path = _write(tmp_path / "typo.json", {"method": "oracle", "min_kv_length": 0})
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: unknown SparseConfig field(s) "
                                                          "['min_kv_length']")):
        SparseConfig.from_file(path)
    path = _write(tmp_path / "knob_typo.json", {"method": "oracle", "knobs": {"topp": 0.9}})
    with pytest.raises(SparseConfigError, match=re.escape("has no knob(s) ['topp']")):
        SparseConfig.from_file(path)
    path = _write(tmp_path / "layer_typo.json", {"method": "oracle", "layers": {"1": {"topp": 0.9}}})
    with pytest.raises(SparseConfigError, match=re.escape("layers[1]: method 'oracle' has no knob(s) ['topp']")):
        SparseConfig.from_file(path)
    path = _write(tmp_path / "list.json", [1, 2])
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: a SparseConfig needs a mapping")):
        SparseConfig.from_file(path)
    path = tmp_path / "broken.json"
    path.write_text("{method: oracle")
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: not valid JSON")):
        SparseConfig.from_file(path)


def test_from_yaml_file_is_checked_too(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("method: oracle\nknobs:\n  top_p: 1.5\n")
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: SparseConfig: knobs: oracle: top_p=1.5 "
                                                          "is outside (0, 1]")):
        SparseConfig.from_file(path)
    path.write_text("method: oracle\nknobs:\n  top_p: 0.9\nlayers:\n  1: {method: dense}\nmin_kv_len: 0\n")
    config = SparseConfig.from_file(path)
    assert config.method_for(0).top_p == 0.9 and config.method_for(1) is None and config.min_kv_len == 0
    path.write_text("method: [oracle\n")
    with pytest.raises(SparseConfigError, match=re.escape(f"{path}: not valid YAML")):
        SparseConfig.from_file(path)


def test_saved_config_round_trips_with_per_layer_knobs(tmp_path):
    config = SparseConfig(method="oracle", knobs={"top_p": [0.9, 0.95], "per_layer": {1: {"top_p": 0.5}}},
                          layers={2: {"method": "quest", "top_k": 4}})
    config.save(tmp_path / "c.json")
    back = SparseConfig.from_file(tmp_path / "c.json")  # JSON turns the per_layer keys into strings
    assert back.method_for(0).for_layer(1).top_p == 0.5
    assert back.method_for(2).top_k == 4
