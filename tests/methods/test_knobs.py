"""Every knob of every registered method has a declared type and range, checked when the method is
built (get_method, construction, dataclasses.replace, assignment, per_layer overrides)."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from sparse_attn.layout import SUPPORTED_BLOCK_SIZES
from sparse_attn.methods import METHODS, KnobError, KnobSpec, Method, get_method, register_method

DOCS = Path(__file__).resolve().parents[2] / "docs" / "methods.md"


def _knobs(cls):
    """(knob, spec) of every checked knob of a method class."""
    specs = cls.knob_specs()
    return [(f.name, specs[f.name]) for f in dataclasses.fields(cls) if f.name != "per_layer"]


def _bad_values(spec: KnobSpec):
    """Values outside the spec: wrong types, NaN, and just past each bound."""
    if spec.kind == "bool":
        return [1, 0, "yes", None]
    if spec.kind == "choice":
        return ["nope", None, 0, True, [spec.choices[0]]]
    if spec.kind == "path":
        return ["", 3, True, ["a.safetensors"]]
    values = ["high", None, True, False, float("nan")]
    if spec.kind == "int":
        values += [1.5, float(spec.low if spec.low is not None else 0) + 1.0]  # floats, even integral ones
    if spec.low is not None:
        values.append(spec.low if spec.low_open else spec.low - 1)
        values.append(-math.inf)
    if spec.high is not None:
        values.append(spec.high if spec.high_open else spec.high + 1)
        values.append(math.inf)
    return values


def _good_values(spec: KnobSpec):
    if spec.kind == "bool":
        return [True, False]
    if spec.kind == "choice":
        return list(spec.choices)
    if spec.kind == "path":
        return [None]  # a path must name a gates file (tests/methods/test_seer.py)
    if spec.kind == "int":
        low = spec.low if spec.low is not None else 0
        return [int(low), int(low) + 7 if low else 8]  # 1 and 8 divide every block size (xattention stride)
    low, high = spec.low, spec.high
    values = [(low + high) / 2]
    if not spec.low_open:
        values.append(int(low))
    if not spec.high_open:
        values.append(high)
    return values


CASES = [(name, knob, spec) for name, cls in sorted(METHODS.items()) for knob, spec in _knobs(cls)]


def test_every_knob_of_every_method_has_a_spec():
    for name, cls in METHODS.items():
        fields = {f.name for f in dataclasses.fields(cls)} - {"per_layer"}
        assert fields <= set(cls.knob_specs()), (name, fields - set(cls.knob_specs()))
        assert set(cls.knob_specs()) <= fields, name  # no spec without a knob


# Knobs whose valid values also depend on another knob: values valid with the other knobs' defaults.
GOOD_WITH_DEFAULTS = {("moba", "moba_block"): [128, 512, 4096]}  # a multiple of block_size (128)


@pytest.mark.parametrize("name,knob,spec", CASES, ids=[f"{n}.{k}" for n, k, _ in CASES])
def test_bad_values_are_refused_and_good_values_pass(name, knob, spec):
    for value in _bad_values(spec):
        with pytest.raises(KnobError) as info:
            get_method(name, **{knob: value})
        message = str(info.value)
        assert message.startswith(f"{name}: {knob}={value!r} "), message
        assert spec.range_text() in message, message
        assert isinstance(info.value, ValueError)
    for value in GOOD_WITH_DEFAULTS.get((name, knob), _good_values(spec)):
        method = get_method(name, **{knob: value})
        assert getattr(method, knob) == value
    if spec.per_head:
        good = _good_values(spec)
        assert getattr(get_method(name, **{knob: good}), knob) == good
        with pytest.raises(KnobError, match=re.escape(f"{name}: {knob}[1]=")):
            get_method(name, **{knob: [good[0], _bad_values(spec)[0]]})
        if spec.indices_of is None:
            with pytest.raises(KnobError, match=re.escape(f"{name}: {knob}=[] is empty")):
                get_method(name, **{knob: []})
        else:  # an index knob: none is a valid choice, the same index twice is not
            assert getattr(get_method(name, **{knob: []}), knob) == []
            with pytest.raises(KnobError, match=re.escape(f"{name}: {knob}=[1, 1] names a {spec.indices_of} twice")):
                get_method(name, **{knob: [1, 1]})
    else:
        with pytest.raises(KnobError, match=re.escape(f"{name}: {knob}=")):
            get_method(name, **{knob: [_good_values(spec)[0]]})


# The values of the user's report, each with the message it now gets.
REPORTED = [
    ("xattention", {"threshold": 2}, "xattention: threshold=2 is outside (0, 1]"),
    ("xattention", {"threshold": -1}, "xattention: threshold=-1 is outside (0, 1]"),
    ("xattention", {"threshold": float("nan")},
     "xattention: threshold=nan is not a number; expected a number in (0, 1]"),
    ("xattention", {"threshold": "high"}, "xattention: threshold='high' is not a number; expected a number in (0, 1]"),
    ("flexprefill", {"gamma": 5}, "flexprefill: gamma=5 is outside (0, 1]"),
    ("vertical_slash", {"vertical_size": -3}, "vertical_slash: vertical_size=-3 is not >= 0"),
    ("xattention", {"stride": 0}, "xattention: stride=0 is not >= 1"),
    ("strided", {"stride": 0}, "strided: stride=0 is not >= 1"),
    *[(name, {"block_size": 0}, f"{name}: block_size=0 is not one of 16, 32, 64, 128, 256")
      for name in sorted(METHODS)],
]


@pytest.mark.parametrize("name,knobs,message", REPORTED, ids=[f"{n}-{k}" for n, k, _ in REPORTED])
def test_reported_values_are_refused_when_built(name, knobs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_method(name, **knobs)
    with pytest.raises(ValueError, match=re.escape(message)):
        METHODS[name](**knobs)
    with pytest.raises(ValueError, match=re.escape(message)):
        dataclasses.replace(get_method(name), **knobs)
    with pytest.raises(ValueError, match=re.escape(message.replace(": ", ": per_layer[2]: ", 1))):
        get_method(name, per_layer={2: knobs})
    method = get_method(name)
    before = dataclasses.asdict(method)
    knob, value = next(iter(knobs.items()))
    with pytest.raises(ValueError, match=re.escape(message)):
        setattr(method, knob, value)
    assert dataclasses.asdict(method) == before  # a refused assignment leaves the method as it was


def test_reported_values_no_longer_fail_deep_inside_a_forward():
    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    with pytest.raises(KnobError, match="threshold='high'"):
        get_method("xattention", block_size=16, threshold="high").estimate(q, k)
    for name in sorted(METHODS):  # the defaults, and good values, still estimate (trained gates: test_seer.py)
        if not getattr(METHODS[name], "needs_gates", False):
            get_method(name, block_size=16).estimate(q, k)
    get_method("xattention", block_size=16, stride=16, threshold=1).estimate(q, k)
    get_method("vertical_slash", block_size=16, vertical_size=0, slash_size=[0, 3]).estimate(q, k)
    get_method("flexprefill", block_size=16, gamma=[1.0, 0.5], tau=0, min_budget=0).estimate(q, k)


def test_cross_knob_constraint_xattention_stride_divides_the_block_size():
    with pytest.raises(KnobError, match=r"xattention: stride=32 does not divide block_size=16"):
        get_method("xattention", block_size=16, stride=32)
    method = get_method("xattention", block_size=64, stride=32)
    with pytest.raises(KnobError, match="does not divide block_size=16"):
        method.block_size = 16
    assert method.block_size == 64
    with pytest.raises(KnobError, match=r"xattention: per_layer\[1\]: stride=64 does not divide block_size=32"):
        get_method("xattention", per_layer={1: {"block_size": 32, "stride": 64}})
    get_method("xattention", per_layer={1: {"block_size": 16, "stride": 16}})


def test_per_layer_overrides_are_checked():
    method = get_method("oracle", per_layer={3: {"top_p": 0.5}, "4": {"top_p": [0.5, 1.0]}})
    assert method.per_layer == {3: {"top_p": 0.5}, 4: {"top_p": [0.5, 1.0]}}  # JSON-style keys read as ints
    assert method.for_layer(4).top_p == [0.5, 1.0]
    with pytest.raises(KnobError, match=r"oracle: per_layer\[3\] has no knob\(s\) \['gamma'\]"):
        get_method("oracle", per_layer={3: {"gamma": 0.5}})
    with pytest.raises(KnobError, match=r"per_layer\[3\] has no knob\(s\) \['per_layer'\]"):
        get_method("oracle", per_layer={3: {"per_layer": {}}})
    with pytest.raises(KnobError, match="not a layer index"):
        get_method("oracle", per_layer={-1: {"top_p": 0.5}})
    with pytest.raises(KnobError, match="not a layer index"):
        get_method("oracle", per_layer={True: {"top_p": 0.5}})
    with pytest.raises(KnobError, match=r"per_layer\[0\]=0.5 is not a dict"):
        get_method("oracle", per_layer={0: 0.5})
    with pytest.raises(KnobError, match=r"per_layer=\[\] is not a dict"):
        get_method("oracle", per_layer=[])
    with pytest.raises(KnobError, match=re.escape("oracle: per_layer[1]: top_p[0]=1.5 is outside (0, 1]")):
        get_method("oracle", per_layer={1: {"top_p": [1.5, 0.5]}})
    method = get_method("oracle")
    with pytest.raises(KnobError, match=r"per_layer\[2\]: top_p=2 is outside"):
        method.per_layer = {2: {"top_p": 2}}
    assert method.per_layer == {}


def test_unknown_knob_is_a_knob_error_and_a_value_error():
    with pytest.raises(KnobError, match=r"method 'xattention' has no knob\(s\) \['gamma'\]"):
        get_method("xattention", gamma=0.3)
    assert issubclass(KnobError, ValueError)


def test_register_method_refuses_a_knob_without_a_spec():
    @dataclasses.dataclass
    class Unchecked(Method):
        name = "unchecked_test_method"
        strength: float = 1.0

    with pytest.raises(TypeError, match=r"knob\(s\) \['strength'\] have no KnobSpec"):
        register_method(Unchecked)
    assert "unchecked_test_method" not in METHODS

    @dataclasses.dataclass
    class Checked(Method):
        name = "checked_test_method"
        KNOBS = {"strength": KnobSpec.real(0.0, 2.0, low_open=True)}
        strength: float = 1.0

    try:
        register_method(Checked)
        assert get_method("checked_test_method", strength=2).strength == 2
        with pytest.raises(KnobError, match=re.escape("checked_test_method: strength=0 is outside (0, 2]")):
            get_method("checked_test_method", strength=0)
        with pytest.raises(KnobError, match="granularity"):  # the shared knobs come with the base class
            Checked(granularity="row")
    finally:
        METHODS.pop("checked_test_method", None)


def test_knob_spec_text():
    assert KnobSpec.fraction().range_text() == "(0, 1]"
    assert KnobSpec.real(0, 1).range_text() == "[0, 1]"
    assert KnobSpec.integer(1).range_text() == ">= 1"
    assert KnobSpec.real(high=2, high_open=True).range_text() == "< 2"
    assert KnobSpec.choice(*SUPPORTED_BLOCK_SIZES).range_text() == "one of 16, 32, 64, 128, 256"
    assert KnobSpec.fraction().describe() == "a number in (0, 1] (or a list of them, one per head)"
    with pytest.raises(ValueError):
        KnobSpec("str")
    with pytest.raises(ValueError):
        KnobSpec("choice")


def test_docs_give_every_knobs_range():
    """docs/methods.md has a row per knob with its range (per-method tables)."""
    text = DOCS.read_text()
    section = text[text.index("### Knob types and ranges"):text.index("## Deciding sparse vs dense")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for name, knob, spec in CASES:
        match = [row for row in rows if f"`{knob}`" in row.split("|")[1] + row.split("|")[2]]
        assert match, (name, knob)
        if spec.kind == "choice" and isinstance(spec.choices[0], str):
            assert any(all(f"`{c!r}`" in row for c in spec.choices) for row in match), (name, knob)
        else:
            assert any(spec.range_text() in row for row in match), (name, knob, spec.range_text())
