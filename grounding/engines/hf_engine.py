"""transformers engine: the reference for vLLM, and a fallback where vLLM does not run.

Batched greedy ``generate`` with left padding; LoRA adapters through one `peft.PeftModel`
(``load_adapter`` once per name, ``set_adapter`` per batch group, the base through
``disable_adapter``). Log-probs are the log-softmax of the chosen token's logits.

Answer grammars (`EngineInput.grammar`) are applied with xgrammar, the library vLLM's
structured outputs use by default, as a logits processor: the same token masks as vLLM, so
constrained answers agree token for token between the engines. Log-probs then come from the
masked logits (the model's distribution over the tokens the grammar allows), as in vLLM.
"""

from __future__ import annotations

from grounding.engines.base import Engine, EngineConfig, EngineInput, Generation


class HFEngine(Engine):
    def __init__(self, cfg: EngineConfig, model=None, processor=None):
        """Load ``cfg.model``, or wrap an already loaded ``model`` and ``processor`` (a model
        being trained is evaluated through the same engine code as a served one)."""
        from grounding.engines.base import Device

        device = Device.detect()
        super().__init__(cfg.resolved(device))
        cfg = self.cfg
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.device = "cuda" if device.kind == "cuda" else "cpu"

        if processor is None:
            kw = {k: v for k, v in (("min_pixels", cfg.min_pixels),
                                    ("max_pixels", cfg.max_pixels)) if v}
            processor = AutoProcessor.from_pretrained(cfg.model, **kw)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self._xgr_compiler = None  # built at the first grammar (xgrammar is a heavy import)
        self._xgr_cache: dict[str, object] = {}
        if model is None:
            model = AutoModelForImageTextToText.from_pretrained(
                cfg.model, dtype=getattr(torch, cfg.dtype)).to(self.device)
            model.eval()
        else:
            self.device = model.device.type  # a model being trained stays where it is
        self.model = model
        self._peft = None
        self._loaded: set[str] = set()

    def chat_prompt(self, instruction: str) -> str:
        msgs = [{"role": "user",
                 "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def _model_for(self, adapter: str | None):
        if adapter is None:
            return self.model if self._peft is None else None
        path = self._adapter_path(adapter)
        from peft import PeftModel

        if self._peft is None:
            self._peft = PeftModel.from_pretrained(self.model, path, adapter_name=adapter)
            self._peft.eval()
        elif adapter not in self._loaded:
            self._peft.load_adapter(path, adapter_name=adapter)
        self._loaded.add(adapter)
        self._peft.set_adapter(adapter)
        return self._peft

    def generate(self, inputs: list[EngineInput]) -> list[Generation]:
        import contextlib

        out: list[Generation | None] = [None] * len(inputs)
        groups: dict[str | None, list[int]] = {}
        for i, inp in enumerate(inputs):
            groups.setdefault(inp.adapter, []).append(i)
        for adapter, idx in groups.items():
            model = self._model_for(adapter)
            ctx = contextlib.nullcontext()
            if model is None:  # base requested while adapters are attached
                model, ctx = self._peft, self._peft.disable_adapter()
            with ctx:
                for i, g in zip(idx, self._generate(model, [inputs[i] for i in idx]), strict=True):
                    out[i] = g
        return out  # type: ignore[return-value]

    def _compiled(self, grammar: str | None):
        """The xgrammar grammar of a regex for this tokenizer, compiled once per regex, in the
        Lark form vLLM gets (`grounding.families._grammar.as_lark`), on the full vocabulary;
        None: any text (a row without a grammar in a batch with some)."""
        import xgrammar as xgr

        if self._xgr_compiler is None:
            vocab = self.model.config.get_text_config().vocab_size
            info = xgr.TokenizerInfo.from_huggingface(self.processor.tokenizer, vocab_size=vocab)
            self._xgr_compiler = xgr.GrammarCompiler(info)
        if grammar not in self._xgr_cache:
            from grounding.families._grammar import as_lark

            self._xgr_cache[grammar] = (self._xgr_compiler.compile_regex(r"(?s:.)*")
                                        if grammar is None else
                                        self._xgr_compiler.compile_lark(as_lark(grammar)))
        return self._xgr_cache[grammar]

    def _grammar_processor(self, inputs: list[EngineInput]):
        """An xgrammar logits processor for a batch with grammars (None: unconstrained).
        Rows without a grammar get the regex of any text (xgrammar takes one per row)."""
        if all(i.grammar is None for i in inputs):
            return None
        from transformers import LogitsProcessorList
        from xgrammar.contrib.hf import LogitsProcessor

        grammars = [self._compiled(i.grammar) for i in inputs]
        return LogitsProcessorList([LogitsProcessor(grammars)])

    def _generate(self, model, inputs: list[EngineInput]) -> list[Generation]:
        import torch

        tok = self.processor.tokenizer
        enc = self.processor(text=[i.prompt for i in inputs], images=[i.image for i in inputs],
                             padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            res = model.generate(**enc, max_new_tokens=self.cfg.max_new_tokens,
                                 min_new_tokens=self.cfg.min_new_tokens or None, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=tok.pad_token_id,
                                 logits_processor=self._grammar_processor(inputs))
        new = res.sequences[:, enc["input_ids"].shape[1]:]
        logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in res.scores], dim=1)
        gens = []
        stop = {tok.eos_token_id, tok.pad_token_id}
        for row in range(new.shape[0]):
            ids, lps = [], []
            for t in range(new.shape[1]):
                tid = int(new[row, t])
                if tid in stop:
                    break
                ids.append(tid)
                lps.append(float(logp[row, t, tid]))
            gens.append(Generation(
                # Special tokens kept, as in the vLLM engine: some families' boxes are made of
                # them (Qwen2-VL's <|box_start|>); the parser strips end tokens.
                text=tok.decode(ids, skip_special_tokens=False), token_ids=ids, logprobs=lps,
                tokens=[tok.decode([i]) for i in ids]))
        return gens
