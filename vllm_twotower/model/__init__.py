"""vLLM ``nn.Module``s of TwoTower (imported lazily by vLLM through ``MODEL_CLASS``)."""
