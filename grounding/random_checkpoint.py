"""A loadable checkpoint of a real architecture with RANDOM weights, without the hub: for GPU
throughput and memory checks (`bench/gpu_check.py`), where weight values do not matter.

The folder holds what vLLM, transformers and groundlabel read from a real checkpoint:

* ``config.json`` / ``preprocessor_config.json``: the published numbers (`grounding.published`),
  optionally shrunk (``layers``, or ``shrink`` for a small model of the same architecture that
  runs on a CPU), with the special-token ids set to the tokenizer's (below);
* ``model*.safetensors``: random bf16 weights, made on ``device`` (``cuda`` for the 7B:
  16.6 GB in seconds, never in host memory first) and written with ``save_pretrained``;
* a tokenizer: the bundled tiny model's (byte-level BPE, Qwen's special tokens, 1,412 ids)
  padded with filler tokens up to the config's ``vocab_size`` (152,064 for Qwen2.5-VL-7B), so
  that EVERY id a random model can emit decodes. The fillers are model-vocabulary entries that
  no merge produces (encoding never yields one) and decode to ``<fNNNN>``. The tokenizer keeps
  its own ids for the special tokens (``<|im_end|>`` is 2, ``<|image_pad|>`` 12 ...): the
  config's ``*_token_id`` fields are set to them instead (``groundlabel.json`` records each
  change). Throughput does not depend on which ids the special tokens have;
* the model family's chat template (Qwen2-VL / Qwen2.5-VL's, with its default system prompt)
  and ``generation_config.json``.

``device="meta"`` builds the model without memory (parameter count and config check only) and
writes no weights: what a CPU can check of the 7B in a second.

    python -c "from grounding.random_checkpoint import build; build('qwen2.5-vl-7b', '/tmp/q7', device='cuda')"
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from grounding.paths import DEFAULT_MODEL
from grounding.published import published

# Qwen2-VL / Qwen2.5-VL's chat template (as the Instruct checkpoints ship it).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen's special-token ids as the published configs name them.
QWEN_SPECIAL = {
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>",
    151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>",
}

FILLER = "<f{}>"
# Part of the reuse key: a change to what `build` writes makes older builds stale.
BUILDER_VERSION = 2


def shrink_config(config: dict, layers: int | None = None, shrink: bool = False,
                  vocab_size: int | None = None) -> dict:
    """The published ``config`` with fewer layers and, with ``shrink``, small widths (Qwen2.5-VL
    only: text 256 wide, 4 heads, 2 KV heads; vision 2 blocks of 128): a model of the same
    architecture, vocabulary and processor that a CPU runs in seconds. ``vocab_size`` shrinks
    the vocabulary too (at least the tokenizer's 1,412 ids): the ONNX export test's Qwen2.5-VL
    needs no 152k-row embedding. Returns a new dict."""
    cfg = json.loads(json.dumps(config))
    text = cfg.get("text_config", cfg)
    if vocab_size:
        text["vocab_size"] = vocab_size
        if text is not cfg and "vocab_size" in cfg:
            cfg["vocab_size"] = vocab_size
    if shrink:
        if cfg.get("model_type") != "qwen2_5_vl":
            raise ValueError("shrink is implemented for qwen2_5_vl configs only")
        text.update(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                    num_key_value_heads=2)
        # head_dim 64: mrope sections must add up to head_dim / 2
        text["rope_scaling"] = {**text["rope_scaling"], "mrope_section": [8, 12, 12]}
        layers = layers or 2
        v = cfg["vision_config"]
        v.update(depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                 fullatt_block_indexes=[1], out_hidden_size=256)
    if layers:
        text["num_hidden_layers"] = layers
        if "max_window_layers" in text:
            text["max_window_layers"] = layers
    return cfg


def padded_tokenizer(src: str | Path, vocab_size: int) -> dict:
    """``tokenizer.json`` of ``src`` with filler entries up to ``vocab_size`` ids in all."""
    tok = json.loads((Path(src) / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    # `tokenizers` does not keep an added token's id from the file: one the model vocabulary
    # lacks gets (model vocabulary size + its rank), so fillers in the model vocabulary would
    # move every such token (the tiny model's "10".."1000", ids 421-1411) past them. Each
    # added token goes into the model vocabulary at its own id first: no merge produces it,
    # so encoding is unchanged (added tokens are matched before the model anyway).
    by_id = {v: k for k, v in vocab.items()}
    for a in tok["added_tokens"]:
        if a["content"] not in vocab:
            if a["id"] in by_id:
                raise ValueError(f"added token {a['content']!r} has id {a['id']}, which the "
                                 f"model vocabulary gives to {by_id[a['id']]!r}")
            vocab[a["content"]] = a["id"]
    used = set(vocab.values())
    taken = set(vocab)
    if max(used) >= vocab_size:
        raise ValueError(f"the tokenizer already has id {max(used)} >= vocab_size {vocab_size}")
    for i in range(vocab_size):
        if i not in used:
            name = FILLER.format(i)
            assert name not in taken, name
            vocab[name] = i
    return tok


def _token_ids(tok: dict) -> dict[str, int]:
    ids = {k: v for k, v in tok["model"]["vocab"].items()}
    ids.update({a["content"]: a["id"] for a in tok["added_tokens"]})
    return ids


def remap_special_ids(config: dict, ids: dict[str, int]) -> dict[str, list[int]]:
    """Set every ``*_token_id`` of ``config`` (and its text config) that names a Qwen special
    token to that token's id in the tokenizer; returns ``{field: [published, new]}``."""
    changed: dict[str, list[int]] = {}
    for scope, d in (("", config), ("text_config.", config.get("text_config") or {})):
        for k, v in list(d.items()):
            if k.endswith("_token_id") and isinstance(v, int) and v in QWEN_SPECIAL:
                d[k] = ids[QWEN_SPECIAL[v]]
                changed[scope + k] = [v, d[k]]
    return changed


def _model_class(config: dict):
    import transformers

    return getattr(transformers, config["architectures"][0])


def build(name: str, out: str | Path, device: str = "cuda", layers: int | None = None,
          shrink: bool = False, seed: int = 0, tokenizer_from: str | Path = DEFAULT_MODEL,
          force: bool = False, vocab_size: int | None = None) -> dict:
    """Write a random-weight checkpoint of published ``name`` to ``out``; returns a report
    (parameters, seconds, bytes written). An ``out`` that already holds the same build
    (``groundlabel.json`` matches) is reused unless ``force``. ``device="meta"`` writes no
    weights (config, tokenizer and processor only) and only counts parameters."""
    import torch
    from transformers import AutoConfig

    t0 = time.perf_counter()
    spec = published(name)
    config = shrink_config(spec["config"], layers, shrink, vocab_size)
    text = config.get("text_config", config)
    tok = padded_tokenizer(tokenizer_from, text["vocab_size"])
    remapped = remap_special_ids(config, _token_ids(tok))
    key = {"builder": BUILDER_VERSION, "published": name, "layers": layers, "shrink": shrink, "seed": seed,
           "tokenizer": f"{Path(tokenizer_from).name}, padded to {text['vocab_size']} ids"}
    meta = {"family": None, "random_weights": True, **key, "special_token_ids": remapped}
    p = Path(out)
    stamp = p / "groundlabel.json"
    weights = device != "meta"
    if weights and not force and stamp.is_file() and any(p.glob("*.safetensors")):
        old = json.loads(stamp.read_text())
        if {k: old.get(k) for k in key} == key and old.get("build", {}).get("bytes"):
            return {**old["build"], "reused": True}
    if p.exists() and force:
        shutil.rmtree(p)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(config, indent=2))
    (p / "preprocessor_config.json").write_text(json.dumps(spec["processor"], indent=2))
    (p / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    tcfg = json.loads((Path(tokenizer_from) / "tokenizer_config.json").read_text())
    tcfg.update(model_max_length=32768, processor_class=None)
    tcfg.pop("processor_class")
    (p / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    (p / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    ids = _token_ids(tok)
    (p / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
         "pad_token_id": ids["<|endoftext|>"]}, indent=2))

    hf_config = AutoConfig.from_pretrained(p)
    cls = _model_class(config)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = cls._from_config(hf_config, dtype=torch.bfloat16)
    n_params = sum(x.numel() for x in model.parameters())
    report = {"params": n_params, "params_b": round(n_params / 1e9, 3), "device": device,
              "published_params_b": spec["params_b"], "path": str(p)}
    if weights:
        model.to_empty(device=device)
        with torch.no_grad():
            model.apply(model._init_weights)
            bad = [n for n, x in model.named_parameters() if not torch.isfinite(x).all()]
        if bad:
            raise RuntimeError(f"random init left non-finite weights in {bad[:3]}")
        t1 = time.perf_counter()
        model.save_pretrained(p, max_shard_size="5GB")
        report["save_s"] = round(time.perf_counter() - t1, 1)
        report["bytes"] = sum(f.stat().st_size for f in p.glob("*.safetensors"))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    from grounding.checkpoint import detect_family

    meta["family"] = detect_family(p)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    meta["build"] = report
    # save_pretrained rewrote config.json (same numbers; transformers' own layout)
    stamp.write_text(json.dumps(meta, indent=2))
    return report
