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


def _model_config(generation_config, overrides=None):
    return SimpleNamespace(
        override_generation_config=dict(overrides or {}),
        try_get_generation_config=lambda: dict(generation_config),
    )


def test_requests_default_to_greedy_unless_the_checkpoint_sets_a_temperature():
    from vllm_twotower.config_hook import _generation_defaults

    mc = _model_config({})
    _generation_defaults(mc)
    assert mc.override_generation_config == {"temperature": 0.0}
    mc = _model_config({"temperature": 0.6})
    _generation_defaults(mc)
    assert mc.override_generation_config == {}
    mc = _model_config({}, {"temperature": 1.0})  # the user's override wins
    _generation_defaults(mc)
    assert mc.override_generation_config == {"temperature": 1.0}


def test_checkpoint_defaults_diffusion_refuses_are_neutralised():
    from vllm_twotower.config_hook import _generation_defaults

    gen = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "repetition_penalty": 1.1}
    mc = _model_config(gen, {"top_k": 5})  # an explicit user override is kept (and refused later)
    _generation_defaults(mc)
    assert mc.override_generation_config == {"top_p": 1.0, "top_k": 5, "repetition_penalty": 1.0}


@pytest.mark.parametrize(
    ("kv_bytes", "util", "env", "expected"),
    [
        (None, 0.92, None, 2 << 30),  # nothing chosen: the plugin's CPU default
        (None, 0.92, "1", None),  # VLLM_CPU_KVCACHE_SPACE: vLLM applies it later
        (None, 0.5, None, None),  # an explicit utilisation keeps vLLM's meaning
        (123, 0.92, None, 123),  # --kv-cache-memory-bytes
    ],
)
def test_cpu_kv_cache_default(monkeypatch, kv_bytes, util, env, expected):
    from vllm_twotower.config_hook import _cpu_kv_cache_default

    if env is None:
        monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    else:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", env)
    cache = SimpleNamespace(kv_cache_memory_bytes=kv_bytes, gpu_memory_utilization=util)
    _cpu_kv_cache_default(cache)
    assert cache.kv_cache_memory_bytes == expected
