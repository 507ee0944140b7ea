"""``groundlabel export-model``: a checkpoint (optionally + a registry adapter, merged) as an
ONNX folder that `grounding.edge` runs with onnxruntime alone (no torch, vLLM or Ray).

Three graphs, exported with ``torch.onnx.export(dynamo=True)`` (docs/edge.md says why not
optimum):

* ``vision.onnx``: ``pixel_values`` (patches x C*T*P*P, the processor's layout) and the rotary
  positions ``rot_pos_ids`` (patches x 2: row, column), plus per family what depends on the
  grid, all computed by the runner in numpy (`grounding.edge.preprocess`):

  - Qwen3-VL: the learned position embedding's interpolation taps ``interp_indices`` /
    ``interp_weights`` -> ``image_embeds`` (visual tokens x hidden) and ``deepstack``
    (deepstack layers x visual tokens x hidden). Attention spans all of the image's patches
    (one image per call is one segment).
  - Qwen2.5-VL: ``window_index`` (the merged tokens in window order), ``window_segments`` (each
    patch's window, in that order) and ``reverse_index`` -> ``image_embeds``. Windowed blocks
    attend within a window (a mask built in the graph from ``window_segments``: what
    ``cu_window_seqlens`` splits), the ``fullatt_block_indexes`` blocks over the whole image.
* ``embed.onnx``: ``input_ids`` (1 x S) -> ``inputs_embeds`` (1 x S x hidden).
* ``decoder.onnx``: ``inputs_embeds`` (1 x S x hidden), ``position_ids`` (3 x 1 x S, M-RoPE
  t/h/w positions), for Qwen3-VL ``deepstack`` (D x 1 x S x hidden, the vision features added
  after the first D layers; zeros at text positions and in decoding steps), ``past_key_i`` /
  ``past_value_i`` (1 x kv heads x P x head dim, P may be 0) -> ``logits`` (1 x vocab, the last
  position only) and ``present_key_i`` / ``present_value_i`` (P + S long): the KV cache, so
  each new token costs one position.

Beside them: the tokenizer, the processor settings, the chat prompt around the instruction,
the grammar vocabulary (each token's bytes and which ids are special or stop tokens, as
xgrammar sees them, so the runner masks logits exactly like the transformers engine), and
``manifest.json``: groundlabel version, family and prompt version, the source checkpoint and
adapter, the exporter and library versions, and every file's sha256.

Run::

    groundlabel export-model --out runs/onnx
    groundlabel export-model --registry runs/adapters --name production --out runs/onnx-prod
    groundlabel ground --onnx runs/onnx image.png "the red circle"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from grounding.edge import ExportError
from grounding.paths import DEFAULT_MODEL
from grounding.settings import Settings
from grounding.storage import StorageOptions

SUPPORTED = {"Qwen3VLForConditionalGeneration": "qwen3_vl",
             "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
"""HF architectures the exporter handles -> family (others are refused before any work)."""

OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"


class ExportConfig(Settings):
    """Settings of ``groundlabel export-model``."""

    out: str = Field(description="Folder to write the ONNX model folder into (created; must "
                     "be empty or absent).")
    model: str = Field(str(DEFAULT_MODEL), description="Base checkpoint folder (a Qwen3-VL or "
                       "Qwen2.5-VL `save_pretrained` folder); default: the bundled tiny "
                       "Qwen3-VL.")
    adapter: str | None = Field(None, description="LoRA adapter folder to merge before "
                                "export (or use --registry / --name).")
    registry: str | None = Field(None, description="Adapter registry to take --name from; "
                                 "the adapter is merged into the base before export.")
    name: str | None = Field(None, description="Adapter name in --registry, or `production` "
                             "(the default when --registry is given).")
    storage: StorageOptions = Field(default_factory=StorageOptions,
                                    description="Object storage for the registry.")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8: onnxruntime's dynamic quantization of the three graphs "
        "(int8 weights, activations quantized per call): about 3.5x smaller and answers that "
        "differ from float32 more often (bench/RESULTS.md measures how often).")


def check_exportable(model: str | Path) -> str:
    """The family of a checkpoint the exporter handles; `ExportError` naming the architecture and
    what is supported otherwise (read from config.json alone, before anything loads)."""
    p = Path(model)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ExportError(f"{p} is not a checkpoint folder (no config.json)")
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED:
        raise ExportError(f"cannot export {p} to ONNX: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED))})")
    return SUPPORTED[arch]


def _prompt_version(family) -> str:
    # The same string as pipelines.label.prompt_version (train may not import pipelines).
    return f"{family.name}:{hashlib.sha1(family.prompt_id().encode()).hexdigest()[:8]}"


def _resolve_adapter(cfg: ExportConfig) -> tuple[str | None, dict]:
    """The adapter folder to merge (None: base only) and what the manifest says about it."""
    if cfg.adapter is None and cfg.registry is None:
        if cfg.name is not None:
            raise ValueError("--name needs --registry")
        return None, {}
    if cfg.adapter is not None and cfg.registry is not None:
        raise ValueError("give --adapter DIR or --registry URI [--name NAME], not both")
    if cfg.adapter is not None:
        return cfg.adapter, {"adapter": str(cfg.adapter)}
    from grounding.registry import AdapterRegistry, RegistryError

    reg = AdapterRegistry(cfg.registry, cfg.storage)
    name = cfg.name if cfg.name not in (None, "production") else reg.production()
    if name is None:
        raise RegistryError(f"{cfg.registry} has no production adapter; pass --name")
    path = reg.download(name, tempfile.mkdtemp(prefix="gl-export-"))
    return path, {"adapter": name, "registry": cfg.registry,
                  "asked": cfg.name or "production"}


@contextlib.contextmanager
def _masked_vision_attention():
    """Qwen3-VL's and Qwen2.5-VL's vision attention split their patches by ``cu_seqlens`` with
    ``.tolist()`` (data dependent, which torch.export cannot trace). During export the attention
    runs over all patches at once with an optional additive ``attn_mask`` (0 within a segment,
    -inf across): the same arithmetic as one attention per segment. One image is one segment
    (no mask); Qwen2.5-VL's windows are segments of its windowed blocks (a mask)."""
    import torch
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m25
    from transformers.models.qwen3_vl import modeling_qwen3_vl as m3

    def make(rotary):
        def forward(self, hidden_states, cu_seqlens=None, position_embeddings=None,
                    attn_mask=None, **kwargs):
            n = hidden_states.shape[0]
            q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(
                1, 0, 2, 3).unbind(0)
            cos, sin = position_embeddings
            q, k = rotary(q, k, cos, sin)
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, scale=self.scaling)
            return self.proj(out.transpose(1, 2).reshape(n, -1))
        return forward

    classes = {m3.Qwen3VLVisionAttention: m3.apply_rotary_pos_emb_vision,
               m25.Qwen2_5_VLVisionAttention: m25.apply_rotary_pos_emb_vision}
    old = {cls: cls.forward for cls in classes}
    for cls, rotary in classes.items():
        cls.forward = make(rotary)
    try:
        yield
    finally:
        for cls, fwd in old.items():
            cls.forward = fwd


def _graphs(model, family: str):
    """The three modules to export, wrapping the loaded model's own submodules."""
    import torch

    visual = model.model.visual
    text = model.model.language_model
    head = model.lm_head

    class Qwen3Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values, interp_indices, interp_weights, rot_pos_ids):
            v = self.visual
            h = v.patch_embed(pixel_values)
            h = h + (v.pos_embed(interp_indices) * interp_weights[:, :, None]).sum(1)
            pos = v.rotary_pos_emb(h, rot_pos_ids)
            deep = []
            for i, blk in enumerate(v.blocks):
                h = blk(h, cu_seqlens=None, position_embeddings=pos)
                if i in v.deepstack_visual_indexes:
                    deep.append(v.deepstack_merger_list[v.deepstack_visual_indexes.index(i)](h))
            return v.merger(h), torch.stack(deep)

    class Qwen25Vision(torch.nn.Module):
        """``Qwen2_5_VisionTransformerPretrainedModel.forward`` for one image with its window
        layout given: patches permuted into window order, windowed blocks masked to their
        window, full-attention blocks unmasked, merged tokens put back in raster order."""

        def __init__(self):
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values, rot_pos_ids, window_index, window_segments,
                    reverse_index):
            v = self.visual
            unit = v.spatial_merge_unit

            def permute(x):
                return x.reshape(-1, unit, x.shape[-1])[window_index].reshape(-1, x.shape[-1])

            h = permute(v.patch_embed(pixel_values))
            cos, sin = v.rotary_pos_emb(h, rot_pos_ids)
            pos = (permute(cos), permute(sin))
            same = window_segments[:, None] == window_segments[None, :]
            mask = torch.where(same, 0.0, float("-inf")).to(h.dtype)[None, None]
            for i, blk in enumerate(v.blocks):
                h = blk(h, cu_seqlens=None, position_embeddings=pos,
                        attn_mask=None if i in v.fullatt_block_indexes else mask)
            return v.merger(h)[reverse_index]

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = text.embed_tokens

        def forward(self, input_ids):
            return self.embed(input_ids)

    class _Cache:
        """The few cache methods the attention layers call: append and return the whole."""

        def __init__(self, past):
            self.kv = list(past)

        def update(self, k, v, layer_idx, *args, **kwargs):
            pk, pv = self.kv[layer_idx]
            self.kv[layer_idx] = (torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2))
            return self.kv[layer_idx]

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = text
            self.head = head

        def forward(self, inputs_embeds, position_ids, deepstack, *past):
            return self.step(inputs_embeds, position_ids, deepstack, past)

        def step(self, inputs_embeds, position_ids, deepstack, past):
            n = len(self.text.layers)
            cache = _Cache([(past[2 * i], past[2 * i + 1]) for i in range(n)])
            s = inputs_embeds.shape[1]
            p = past[0].shape[2]
            # Causal over past + new positions: new position i sees columns <= p + i.
            cols = torch.arange(p + s)
            rows = torch.arange(s) + p
            mask = torch.where(cols[None, :] <= rows[:, None], 0.0, float("-inf"))
            mask = mask[None, None].to(inputs_embeds.dtype)
            h = inputs_embeds
            pos = self.text.rotary_emb(h, position_ids)
            for i, layer in enumerate(self.text.layers):
                h = layer(h, attention_mask=mask, position_embeddings=pos,
                          past_key_values=cache)
                if deepstack is not None and i < deepstack.shape[0]:
                    h = h + deepstack[i]  # zeros away from the image: the same as HF's scatter
            h = self.text.norm(h)
            logits = self.head(h[:, -1])
            flat = [t for kv in cache.kv for t in kv]
            return (logits, *flat)

    class PlainDecoder(Decoder):
        """Qwen2.5-VL: no deepstack input."""

        def forward(self, inputs_embeds, position_ids, *past):
            return self.step(inputs_embeds, position_ids, None, past)

    if family == "qwen3_vl":
        return Qwen3Vision().eval(), Embed().eval(), Decoder().eval()
    return Qwen25Vision().eval(), Embed().eval(), PlainDecoder().eval()


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes) -> None:
    import torch

    prog = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                             input_names=input_names, output_names=output_names,
                             dynamic_shapes=dynamic_shapes, external_data=False,
                             optimize=True, verbose=False)
    prog.save(str(path))


def export_model(cfg: ExportConfig) -> dict:
    """Export; returns the manifest. Every refusal (architecture, adapter) comes first."""
    from grounding.engines.base import check_adapter_dir, check_adapter_fits

    family_name = check_exportable(cfg.model)
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty")
    adapter, adapter_info = _resolve_adapter(cfg)
    if adapter is not None:
        try:
            check_adapter_dir(adapter)
            check_adapter_fits(adapter, cfg.model)  # an adapter of another base
        except ValueError as e:
            raise ExportError(f"cannot merge the adapter into {cfg.model}: {e}") from e

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    processor = AutoProcessor.from_pretrained(cfg.model)
    tmp = Path(tempfile.mkdtemp(prefix="gl-onnx-", dir=out.parent if out.parent.exists()
                                else None))
    # mkdtemp makes the folder 0700; an export is meant to be copied and read by others
    tmp.chmod(0o755)
    try:
        _write(model, processor, cfg, family_name, tmp, adapter_info)
        manifest = _finish_manifest(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def _write(model, processor, cfg: ExportConfig, family_name: str, out: Path,
           adapter_info: dict) -> None:
    import numpy as np
    import torch

    import grounding.edge.preprocess as pre
    from grounding.families import get_family

    family = get_family(family_name)
    mcfg = model.config
    tcfg, vcfg = mcfg.text_config, mcfg.vision_config
    ip = processor.image_processor
    qwen3 = family_name == "qwen3_vl"
    settings = {
        "patch_size": int(vcfg.patch_size), "temporal_patch_size": int(vcfg.temporal_patch_size),
        "merge_size": int(vcfg.spatial_merge_size), "in_channels": int(vcfg.in_channels),
        "num_grid_per_side": int(vcfg.num_position_embeddings ** 0.5) if qwen3 else None,
        "window_size": None if qwen3 else int(vcfg.window_size),
        "min_pixels": int(ip.size["shortest_edge"]), "max_pixels": int(ip.size["longest_edge"]),
        "image_mean": [float(x) for x in ip.image_mean],
        "image_std": [float(x) for x in ip.image_std],
        "rescale_factor": float(ip.rescale_factor), "resample": int(ip.resample),
    }
    pspec = pre.ProcessorSettings(**settings)
    # An example image grid for tracing: h, w even (whole merge cells); for Qwen2.5-VL more
    # than one window on each side, so windowed and full blocks differ while tracing.
    grid = (1, 8, 12) if qwen3 else (1, 12, 20)
    example = pre.vision_inputs(np.zeros((grid[1] * pspec.patch_size,
                                          grid[2] * pspec.patch_size, 3), np.uint8), pspec)
    vision, embed, decoder = _graphs(model, family_name)
    t = torch.from_numpy
    with torch.no_grad(), _masked_vision_attention():
        if qwen3:
            patches = torch.export.Dim("patches", min=4, max=65536)
            _export(vision, (t(example.pixel_values), t(example.interp_indices),
                             t(example.interp_weights), t(example.rot_pos_ids)),
                    out / "vision.onnx",
                    ["pixel_values", "interp_indices", "interp_weights", "rot_pos_ids"],
                    ["image_embeds", "deepstack"],
                    ({0: patches}, {0: patches}, {0: patches}, {0: patches}))
        else:
            # patches = merge_size**2 x merged tokens (whole merge cells)
            cells = torch.export.Dim("cells", min=1, max=16384)
            patches = pspec.merge_size ** 2 * cells
            _export(vision, (t(example.pixel_values), t(example.rot_pos_ids),
                             t(example.window_index), t(example.window_segments),
                             t(example.reverse_index)),
                    out / "vision.onnx",
                    ["pixel_values", "rot_pos_ids", "window_index", "window_segments",
                     "reverse_index"], ["image_embeds"],
                    ({0: patches}, {0: patches}, {0: cells}, {0: patches}, {0: cells}))
        seq = torch.export.Dim("seq", min=1, max=65536)
        _export(embed, (torch.tensor([[1, 2, 3]]),), out / "embed.onnx", ["input_ids"],
                ["inputs_embeds"], ({1: seq},))
        n_layers = int(tcfg.num_hidden_layers)
        kv_heads, head_dim = int(tcfg.num_key_value_heads), _head_dim(tcfg)
        hidden = int(tcfg.hidden_size)
        s, p = 5, 3
        past_len = torch.export.Dim("past", min=0, max=65536)
        past = []
        for _ in range(n_layers):
            past += [torch.randn(1, kv_heads, p, head_dim), torch.randn(1, kv_heads, p, head_dim)]
        names = [f"past_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        past_shapes = tuple({2: past_len} for _ in past)
        if qwen3:
            n_deep = len(vcfg.deepstack_visual_indexes)
            args = (torch.randn(1, s, hidden), torch.zeros(3, 1, s, dtype=torch.long),
                    torch.zeros(n_deep, 1, s, hidden), *past)
            inputs, shapes = ["inputs_embeds", "position_ids", "deepstack"], (
                {1: seq}, {2: seq}, {2: seq}, past_shapes)
        else:
            args = (torch.randn(1, s, hidden), torch.zeros(3, 1, s, dtype=torch.long), *past)
            inputs, shapes = ["inputs_embeds", "position_ids"], ({1: seq}, {2: seq}, past_shapes)
        _export(decoder, args, out / "decoder.onnx", [*inputs, *names],
                ["logits", *[n.replace("past", "present") for n in names]], shapes)
    if cfg.quantize == "int8":
        _quantize_int8(out)
    _write_text_side(model, processor, cfg, family, out, pspec, adapter_info)


def _quantize_int8(out: Path) -> None:
    """Each graph replaced by its onnxruntime dynamic int8 quantization (MatMul and Gather
    weights int8 per tensor; activations quantized at run time), which runs on
    onnxruntime's CPU provider without calibration data."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for name in ("vision.onnx", "embed.onnx", "decoder.onnx"):
        q = out / f"{name}.int8"
        quantize_dynamic(str(out / name), str(q), weight_type=QuantType.QInt8)
        q.replace(out / name)


def _head_dim(tcfg) -> int:
    """Qwen3-VL's text config names its head size; Qwen2.5-VL's derives it."""
    return int(getattr(tcfg, "head_dim", None)
               or tcfg.hidden_size // tcfg.num_attention_heads)


SENTINEL = "\x00INSTRUCTION\x00"


def _write_text_side(model, processor, cfg: ExportConfig, family, out: Path, pspec,
                     adapter_info: dict) -> None:
    """Tokenizer, chat prompt, grammar vocabulary and the manifest's body."""
    import onnx
    import torch
    import transformers
    import xgrammar as xgr

    import grounding.edge as edge
    from grounding.checkpoint import max_positions

    tok = processor.tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "processor_config.json", "preprocessor_config.json", "groundlabel.json",
                 "config.json", "generation_config.json"):
        if (Path(cfg.model) / name).is_file():
            shutil.copy(Path(cfg.model) / name, out / name)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SENTINEL}]}]
    chat = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    if chat.count(SENTINEL) != 1 or chat.count(processor.image_token) != 1:
        raise ValueError("the chat template does not place one image and one instruction")
    mcfg = model.config
    tcfg = mcfg.text_config
    vocab = int(tcfg.vocab_size)
    # The grammar's view of the vocabulary, from xgrammar itself (what the transformers engine
    # masks with): each token's bytes, the special tokens it never allows, the stop tokens it
    # allows once the answer is complete.
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    decoded = info.decoded_vocab
    (out / "grammar_vocab.json").write_text(json.dumps({
        "tokens": [bytes(t).hex() for t in decoded],
        "special_token_ids": sorted(int(i) for i in info.special_token_ids),
        "stop_token_ids": sorted(int(i) for i in info.stop_token_ids),
        "vocab_size": vocab,
    }))
    gen_eos = model.generation_config.eos_token_id
    eos = sorted({*([gen_eos] if isinstance(gen_eos, int) else gen_eos or []),
                  int(tok.eos_token_id)})
    manifest = {
        "format": edge.FORMAT,
        "groundlabel_version": edge.groundlabel_version(),
        "family": family.name,
        "prompt_version": _prompt_version(family),
        "source": {"model": str(Path(cfg.model).resolve()), **adapter_info,
                   "merged": bool(adapter_info)},
        "exporter": EXPORTER,
        "opset": OPSET,
        "quantization": None if cfg.quantize == "none" else "int8 dynamic (onnxruntime)",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnx": onnx.__version__},
        "chat": {"template": chat.replace(SENTINEL, "{instruction}"),
                 "image_token": processor.image_token},
        "tokens": {"image": int(mcfg.image_token_id), "eos": eos,
                   "pad": int(tok.pad_token_id) if tok.pad_token_id is not None else None},
        "text": {"layers": int(tcfg.num_hidden_layers), "kv_heads": int(tcfg.num_key_value_heads),
                 "head_dim": _head_dim(tcfg), "hidden": int(tcfg.hidden_size),
                 "vocab_size": vocab, "max_positions": max_positions(cfg.model)},
        "vision": {"deepstack": len(getattr(mcfg.vision_config, "deepstack_visual_indexes",
                                            None) or [])},
        "processor": pspec.model_dump(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _finish_manifest(out: Path) -> dict:
    """Add every file's size and sha256 to the manifest (the runner checks the graphs')."""
    manifest = json.loads((out / "manifest.json").read_text())
    files = {}
    for f in sorted(out.iterdir()):
        if f.name != "manifest.json" and f.is_file():
            files[f.name] = {"bytes": f.stat().st_size,
                             "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    manifest["files"] = files
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
