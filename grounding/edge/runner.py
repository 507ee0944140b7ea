"""Run an exported ONNX model folder (`groundlabel export-model`) with onnxruntime and numpy:
image + referring expression -> boxes in ORIGINAL-image pixels (xyxy floats), like every
other engine. Imports neither torch nor vLLM nor Ray (tests/grounding/test_onnx_runner.py
checks this in a fresh interpreter).

The same steps as the transformers engine, one image at a time: the family's prompt inside the
checkpoint's chat template (rendered at export), the processor's resize and patches
(`grounding.edge.preprocess`), the vision graph, the token embeddings with the image's
embeddings in place of its tokens, M-RoPE positions, a prefill through the decoder, then greedy
decoding with the KV cache, one token per step, under the family's answer grammar (a logits
mask: `grounding.edge.grammar`, the same masks as xgrammar's) unless ``constrained=False``.
Log-probs come from the masked logits, as in both other engines; the family's parser turns the
text into boxes (`grounding.engines.grounder.BoxReader`).

Python::

    from grounding.edge.runner import OnnxGrounder
    from PIL import Image
    g = OnnxGrounder("runs/onnx")
    g.ground(Image.open("x.png"), "the red circle").boxes  # original-image pixels

CLI: ``groundlabel ground --onnx runs/onnx x.png "the red circle"``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from pydantic import Field

from grounding.edge import ExportError
from grounding.settings import Settings

GRAPHS = ("vision.onnx", "embed.onnx", "decoder.onnx")


class ExportVersionError(ExportError):
    """An export folder written by another groundlabel version (or layout)."""


class GroundConfig(Settings):
    """Settings of ``groundlabel ground``: one image, one referring expression."""

    image: str = Field(description="Image file to ground the expression in.",
                       json_schema_extra={"positional": True})
    text: str = Field(description="Referring expression, e.g. 'the red circle'.",
                      json_schema_extra={"positional": True})
    onnx: str = Field(description="ONNX model folder written by `groundlabel export-model`.")
    constrained: bool = Field(True, description="Decode under the family's answer grammar "
                              "(a logits mask), as the other engines do by default.")
    max_new_tokens: int = Field(64, ge=1, description="Answer token limit.")
    threads: int = Field(0, ge=0, description="onnxruntime intra-op threads (0: its default).")


def read_manifest(folder: str | Path) -> dict:
    """The folder's manifest, refused (`ExportVersionError`, naming both versions) when
    another groundlabel version wrote it."""
    import grounding.edge as edge

    p = Path(folder)
    if not (p / "manifest.json").is_file():
        raise FileNotFoundError(f"{p} is not an ONNX export folder (no manifest.json)")
    manifest = json.loads((p / "manifest.json").read_text())
    ours, theirs = edge.groundlabel_version(), manifest.get("groundlabel_version")
    if theirs != ours or manifest.get("format") != edge.FORMAT:
        raise ExportVersionError(
            f"{p} was exported by groundlabel {theirs} (format {manifest.get('format')}); this "
            f"is groundlabel {ours} (format {edge.FORMAT}): export it again with this version")
    for name in GRAPHS:
        want = manifest.get("files", {}).get(name, {}).get("sha256")
        if want is None or not (p / name).is_file():
            raise FileNotFoundError(f"{p}: {name} is missing")
        got = hashlib.sha256((p / name).read_bytes()).hexdigest()
        if got != want:
            raise ValueError(f"{p}/{name} does not match its manifest (sha256 {got[:12]} != "
                             f"{want[:12]}): the folder was changed after export")
    return manifest


class OnnxGrounder:
    """An exported model, loaded: `ground` one image and expression at a time."""

    def __init__(self, folder: str | Path, constrained: bool = True, max_new_tokens: int = 64,
                 threads: int = 0):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        from grounding.checkpoint import resize_spec
        from grounding.edge.preprocess import ProcessorSettings
        from grounding.engines.grounder import BoxReader
        from grounding.families import get_family

        self.folder = Path(folder)
        self.manifest = m = read_manifest(self.folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {name.removesuffix(".onnx"): ort.InferenceSession(
            str(self.folder / name), opts, providers=["CPUExecutionProvider"])
            for name in GRAPHS}
        self.tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        self.family = get_family(m["family"])
        self.spec = ProcessorSettings(**m["processor"])
        self.reader = BoxReader(self.family, resize_spec(self.folder))
        self.max_new_tokens = max_new_tokens
        self.stop = set(m["tokens"]["eos"]) | ({m["tokens"]["pad"]} - {None})
        self.grammar = None
        if constrained:
            from grounding.edge.grammar import TokenGrammar

            gv = json.loads((self.folder / "grammar_vocab.json").read_text())
            self.grammar = TokenGrammar(self.family.grammar,
                                        [bytes.fromhex(t) for t in gv["tokens"]],
                                        set(gv["special_token_ids"]), set(gv["stop_token_ids"]))

    def prompt(self, text: str) -> str:
        """The chat prompt of one expression, with one image placeholder."""
        instruction = self.family.prompt(text)
        if not self.family.chat:
            return instruction
        return self.manifest["chat"]["template"].replace("{instruction}", instruction)

    def generate(self, image, text: str):
        """Greedy tokens for one PIL image and expression: a `Generation`."""
        from grounding.edge import preprocess as pre
        from grounding.engines.base import Generation

        m = self.manifest
        vi = pre.vision_inputs(pre.resize(image.convert("RGB"), self.spec), self.spec)
        vision = self.sessions["vision"]
        outs = vision.run(None, {i.name: getattr(vi, i.name) for i in vision.get_inputs()})
        embeds = outs[0]
        deep = outs[1] if len(outs) > 1 else None  # Qwen3-VL's deepstack features
        n_img = embeds.shape[0]
        image_token = m["chat"]["image_token"]
        prompt = self.prompt(text).replace(image_token, image_token * n_img)
        ids = np.asarray([self.tokenizer.encode(prompt, add_special_tokens=False).ids],
                         np.int64)
        x = self.sessions["embed"].run(None, {"input_ids": ids})[0]
        is_img = ids[0] == m["tokens"]["image"]
        if int(is_img.sum()) != n_img:
            raise ValueError(f"the prompt has {int(is_img.sum())} image tokens, the image "
                             f"{n_img} embeddings")
        x[0, is_img] = embeds
        feed = {}
        if deep is not None:
            feed["deepstack"] = np.zeros((deep.shape[0], 1, ids.shape[1], x.shape[2]),
                                         np.float32)
            feed["deepstack"][:, 0, is_img] = deep
        pos, delta = pre.mrope_positions(ids, m["tokens"]["image"], vi.grid, self.spec.merge_size)
        t = m["text"]
        past = {f"past_{kv}_{i}": np.zeros((1, t["kv_heads"], 0, t["head_dim"]), np.float32)
                for i in range(t["layers"]) for kv in ("key", "value")}
        state = self.grammar.start if self.grammar is not None else None
        out_ids, lps = [], []
        length = ids.shape[1]
        for _ in range(self.max_new_tokens):
            res = self.sessions["decoder"].run(None, {"inputs_embeds": x, "position_ids": pos,
                                                      **feed, **past})
            logits = res[0][0].astype(np.float32)
            past = {k: v for k, v in zip(past, res[1:], strict=True)}
            if state is not None:
                allowed = self.grammar.mask(state)
                logits = np.where(allowed[:logits.shape[0]], logits, -np.inf) \
                    if allowed.shape[0] >= logits.shape[0] else logits
            tid = int(np.argmax(logits))
            if tid in self.stop:
                break
            top = logits.max()
            logp = float(logits[tid] - top - np.log(np.exp(logits - top).sum()))
            out_ids.append(tid)
            lps.append(logp)
            if state is not None:
                state = self.grammar.advance(state, tid)
            x = self.sessions["embed"].run(None, {"input_ids": np.asarray([[tid]], np.int64)})[0]
            pos = np.full((3, 1, 1), length + delta, np.int64)
            if deep is not None:  # no image features at generated positions
                feed["deepstack"] = np.zeros((deep.shape[0], 1, 1, x.shape[2]), np.float32)
            length += 1
        tok = self.tokenizer
        return Generation(text=tok.decode(out_ids, skip_special_tokens=False), token_ids=out_ids,
                          logprobs=lps, tokens=[tok.decode([i], skip_special_tokens=False)
                                                for i in out_ids])

    def ground(self, image, text: str):
        """Boxes for one PIL image and expression: a `GroundingResult`, boxes in pixels of
        ``image`` as given (the family converts from its own coordinates)."""
        gen = self.generate(image, text)
        return self.reader.read(gen, image.size)


def ground(cfg: GroundConfig) -> dict:
    """``groundlabel ground --onnx``: the result as a JSON-ready dict."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(cfg.image)).convert("RGB")
    res = OnnxGrounder(cfg.onnx, cfg.constrained, cfg.max_new_tokens, cfg.threads).ground(
        image, cfg.text)
    return {"boxes": [b.model_dump() for b in res.boxes], "status": res.status,
            "score": res.score, "raw_text": res.raw_text, "num_tokens": res.num_tokens,
            "image_size": list(image.size)}
