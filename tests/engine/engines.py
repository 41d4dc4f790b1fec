"""Engine settings shared by the engine tests (a module of its own: test files import it, and
'conftest' is ambiguous once several test folders have one)."""

# A small token budget, so long prompts are chunked and steps mix prefill, denoise and commit.
ENGINE_KW = dict(
    dtype="float32",
    max_model_len=512,
    max_num_seqs=8,
    max_num_batched_tokens=128,
    disable_log_stats=False,  # so the vllm:diffusion_* metrics are collected
)


def make_llm(path, **kw):
    from vllm import LLM

    return LLM(model=str(path), **{**ENGINE_KW, **kw})
