"""vLLM's own loader finds the `twotower` plugin, and register() is cheap and repeatable."""

import subprocess
import sys

import pytest

import vllm_twotower


def test_import_is_light():
    # The .pth imports this package in every interpreter, so it must not pull these in.
    code = (
        "import sys, vllm_twotower; "
        "print(sorted(m for m in ('torch', 'vllm', 'triton', 'logging') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.engine
def test_vllm_loader_finds_register(monkeypatch):
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_plugins_by_group

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)  # an allowlist could hide it
    plugins = load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    assert plugins.get("twotower") is vllm_twotower.register


@pytest.mark.engine
def test_register_twice_registers_lazily():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    vllm_twotower.register()
    vllm_twotower.register()

    assert vllm_twotower.ARCHITECTURE in ModelRegistry.get_supported_archs()
    entry = ModelRegistry.models[vllm_twotower.ARCHITECTURE]
    module, cls = vllm_twotower.MODEL_CLASS.split(":")
    assert (entry.module_name, entry.class_name) == (module, cls)
    # Lazy: registering must not import the model module. Checked in a fresh interpreter,
    # since other tests in this process may have built the model already.
    code = (
        "import sys, vllm_twotower; vllm_twotower.register(); vllm_twotower.register(); "
        f"print({module!r} in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
