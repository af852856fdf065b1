import pytest

import kvcompress
from kvcompress import StrategySpec, make_cache, parse_strategy
from kvcompress.codecs import CODECS
from kvcompress.strategy import split_strategies

from .conftest import tiny_model


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("full", "full"),
        ("int8", "int8"),
        ("full+int8+device", "int8"),
        ("sink:sinks=4,window=1024", "sink"),
        ("sink:sinks=4,window=1024+int8:group=64,residual=128", "sink+int8:group=64,residual=128"),
        ("window:window=256+fp8:format=e5m2", "window:window=256+fp8:format=e5m2"),
        ("int4:group=16", "int4:group=16"),
    ],
)
def test_grammar_round_trips(text, canonical):
    spec = parse_strategy(text)
    assert str(spec) == canonical
    assert parse_strategy(str(spec)) == spec


def test_members_and_params():
    spec = parse_strategy("sink:sinks=2,window=64+int8:residual=16")
    assert (spec.retention.name, spec.codec.name, spec.tier.name) == ("sink", "int8", "device")
    assert spec.retention.capacity(1000) == 66
    assert spec.params["retention"] == {"sinks": 2, "window": 64}
    assert spec.params["codec"]["residual"] == 16


def test_split_strategies_keeps_parameter_commas():
    text = "full, sink:sinks=4,window=512+int8:group=32,residual=8,fp8,window:window=64"
    assert split_strategies(text) == [
        "full",
        "sink:sinks=4,window=512+int8:group=32,residual=8",
        "fp8",
        "window:window=64",
    ]


def test_list_strategies_are_the_presets():
    assert [str(s) for s in kvcompress.list_strategies()] == list(kvcompress.PRESETS)


@pytest.mark.parametrize(
    "text, message",
    [
        ("int9", "unknown strategy part 'int9'"),
        ("int9", "codec: " + ", ".join(CODECS.names())),
        ("int8:bits=3", "unknown parameter 'bits' for codec 'int8'; allowed: group, residual"),
        ("int8:group=x", "int8:group must be int"),
        ("int8:group", "must be written key=value"),
        ("window:window=0", "window:window must be > 0"),
        ("window:window=-5", "window:window must be > 0"),
        ("sink:sinks=8,window=4", "sink:sinks (8) must not exceed sink:window (4)"),
        ("sink:sinks=-1", "sink:sinks must be >= 0"),
        ("window+sink", "names two retention members"),
        ("fp8:format=e3m4", "fp8:format must be one of e4m3, e5m2"),
        ("int8:residual=-1", "int8:residual must be >= 0"),
        ("window:window=10+int8:residual=20", "int8:residual (20) must not exceed the window budget"),
        ("", "strategy must be a non-empty string"),
    ],
)
def test_bad_strategies_name_the_parameter(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_strategy(text)


def test_codec_group_must_divide_head_dim():
    with pytest.raises(ValueError, match=r"int8:group \(12\) must divide the model's head_dim \(16\)"):
        make_cache(tiny_model(), "int8:group=12")


def test_fp8_without_float8_dtypes(monkeypatch):
    import torch

    monkeypatch.delattr(torch, "float8_e5m2")
    with pytest.raises(ValueError, match="fp8:format 'e5m2' needs torch.float8_e5m2"):
        parse_strategy("fp8:format=e5m2")


def test_spec_default_is_full():
    assert str(StrategySpec()) == "full"
