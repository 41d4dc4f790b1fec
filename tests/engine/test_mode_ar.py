"""AR mode: the context tower alone through stock vLLM decoding equals the reference's AR.

In its own module, after the diffusion modules: starting a second engine re-registers
vLLM's Prometheus collectors, which the diffusion metrics test reads.
"""

import pytest
from test_diffusion_parity import STOP_IDS, _generate, _params, _prompts

from vllm_twotower.reference import generate_ar

pytestmark = [pytest.mark.slow, pytest.mark.engine]


def test_ar_mode_parity(ar_llm, reference):
    prompts = _prompts(4, seed=4)
    got = _generate(ar_llm, prompts, _params(24))
    for prompt, tokens in zip(prompts, got, strict=True):
        (r,) = generate_ar(reference, [prompt], 24)
        assert tokens == r.output_ids(24, STOP_IDS)
