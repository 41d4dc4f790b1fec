"""vLLM plugin for NVIDIA Nemotron-Labs-TwoTower block-diffusion models.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: twotower``) in every process
it starts: API server, engine core, each worker, sometimes more than once. So it must be cheap
and idempotent, and importing this package must stay free of torch/vLLM imports: the CPU
start-up hook (``vllm_twotower_cpu_triton.pth``) imports ``vllm_twotower._cpu_triton``, and so
this file, in every Python process of the environment.
"""

from vllm_twotower import _cpu_triton

__version__ = "0.1.0"

ARCHITECTURE = "NemotronHTwoTowerForCausalLM"
# "module:Class" keeps registration lazy: vLLM imports the model only to serve it.
MODEL_CLASS = "vllm_twotower.model.two_tower:NemotronHTwoTowerForCausalLM"

# Under vLLM's logger, so records use its handlers, format and VLLM_LOGGING_LEVEL: vLLM 0.32
# configures only the "vllm" logger (no propagation), and does so lazily, after plugins load.
LOGGER_NAME = "vllm.twotower"

_registered = False


def register() -> None:
    """Register TwoTower with vLLM; safe to call any number of times, never raises."""
    global _registered
    if _registered:
        return
    _registered = True
    import logging

    logger = logging.getLogger(LOGGER_NAME)
    # Arms the CPU Triton stand-in if vLLM is not imported yet (normally the .pth did it).
    _cpu_triton.install()
    try:
        from vllm import ModelRegistry

        from vllm_twotower import _compat

        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
        _compat.install_config_hook()
        _compat.install_request_validation()
        _compat.install_block_room_check()
        _compat.install_prompt_logprobs_head()
        _compat.install_cpu_moe()
    except Exception:  # a broken plugin must not take vLLM down with it
        logger.exception("vllm_twotower: registering %s failed", ARCHITECTURE)
    missing = _cpu_triton.missing_reason()
    if missing:
        logger.warning("CPU Triton stand-in inactive, so no Model Runner V2: %s", missing)
