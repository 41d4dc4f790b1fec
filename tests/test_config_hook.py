"""Mode selection of the config hook (no engine needed)."""

from types import SimpleNamespace

import pytest

from vllm_twotower.config_hook import TwoTowerConfigHook, twotower_mode


def test_default_mode_is_diffusion_and_sets_the_canvas():
    hf = SimpleNamespace()
    TwoTowerConfigHook.verify_and_update_model_config(SimpleNamespace(hf_config=hf))
    assert hf.twotower_mode == "diffusion" and hf.canvas_length == 16


def test_ar_mode_leaves_the_model_autoregressive():
    hf = SimpleNamespace(twotower_mode="ar")
    TwoTowerConfigHook.verify_and_update_model_config(SimpleNamespace(hf_config=hf))
    assert getattr(hf, "canvas_length", None) is None


def test_mock_ar_is_refused_clearly():
    with pytest.raises(ValueError, match="mock_ar.*not supported"):
        twotower_mode(SimpleNamespace(twotower_mode="mock_ar"))


def test_unknown_mode_and_other_canvas_are_refused():
    with pytest.raises(ValueError, match="twotower_mode must be one of"):
        twotower_mode(SimpleNamespace(twotower_mode="fast"))
    hf = SimpleNamespace(canvas_length=32)
    with pytest.raises(ValueError, match="canvas_length must be 16"):
        TwoTowerConfigHook.verify_and_update_model_config(SimpleNamespace(hf_config=hf))
