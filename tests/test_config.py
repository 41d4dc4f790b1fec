"""Per-request knobs: defaults, valid values, and errors that name the key."""

import math

import pytest

from vllm_twotower.config import DecodeParams, parse_decode_params


def test_defaults():
    assert parse_decode_params(None) == DecodeParams(0.8, 16)
    assert parse_decode_params({"other_plugin_key": 1}) == DecodeParams(0.8, 16)


def test_valid_values():
    p = parse_decode_params({"twotower_confidence_threshold": 0.5, "diffusion_max_steps": 8})
    assert p == DecodeParams(0.5, 8)
    assert parse_decode_params({"twotower_confidence_threshold": 1}).confidence_threshold == 1.0
    assert parse_decode_params({"diffusion_max_steps": 4.0}).steps_per_block == 4
    assert parse_decode_params({"diffusion_canvas_length": 16}) == DecodeParams()


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"twotower_confidence_threshold": 0}, "twotower_confidence_threshold"),
        ({"twotower_confidence_threshold": -0.1}, "twotower_confidence_threshold"),
        ({"twotower_confidence_threshold": 1.5}, "twotower_confidence_threshold"),
        ({"twotower_confidence_threshold": math.nan}, "twotower_confidence_threshold"),
        ({"twotower_confidence_threshold": "0.5"}, "twotower_confidence_threshold"),
        ({"twotower_confidence_threshold": True}, "twotower_confidence_threshold"),
        ({"diffusion_max_steps": 0}, "diffusion_max_steps"),
        ({"diffusion_max_steps": 17}, "diffusion_max_steps"),
        ({"diffusion_max_steps": 2.5}, "diffusion_max_steps"),
        ({"diffusion_max_steps": "8"}, "diffusion_max_steps"),
        ({"diffusion_canvas_length": 32}, "diffusion_canvas_length"),
        ({"twotower_threshold": 0.5}, "twotower_threshold"),
    ],
)
def test_invalid_values_name_the_key(extra, key):
    with pytest.raises(ValueError, match=key):
        parse_decode_params(extra)
