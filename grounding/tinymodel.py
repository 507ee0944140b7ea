"""Build a tiny Qwen3-VL checkpoint offline: tokenizer, image processor, config, random weights.

No model hub is reachable, so the tests and the demo run a *real architecture* at toy size:
``Qwen3VLForConditionalGeneration`` as transformers and vLLM both implement it. Everything a
checkpoint folder needs is written here, so the loading code stays the real one: point
``--model`` at ``Qwen/Qwen3-VL-2B-Instruct`` (or any Qwen2/2.5/3-VL folder) and nothing else
changes.

Why Qwen3-VL: its vision tower adds *learned absolute* position embeddings (``visual.pos_embed``)
on top of rotary ones. Rotary positions shape attention scores but put no position into the token
values the language model reads coordinates from, and tiny Qwen2-VL models learned the answer
format but not where things are. We initialise ``pos_embed`` to a 2-D sin-cos table with a large
enough scale that position is not drowned by patch features.

Tokenizer: a byte-level BPE trained on synthetic text, plus the Qwen special tokens, plus every
whole number 0..1000 as one token. Real Qwen tokenizers split digits; ours gives each 0-1000
coordinate its own token so a 2-core CPU can learn to emit a coordinate as one decision. The
model output format is still Qwen3-VL's ``[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]`` with
0-1000 coordinates, parsed by the same ``qwen3_vl`` family code as a real checkpoint.

Example::

    groundlabel tiny build --out /tmp/tiny-random     # random weights, ~2 s
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, Field

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen-style chat template, reduced to what grounding needs: user turns with images and text,
# assistant turns with text. Same template for training, transformers and vLLM, so the prompt
# is byte-identical in all three.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or item['type'] == 'image_url' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class TinyModelConfig(BaseModel):
    """Size of the tiny Qwen3-VL. Defaults give ~3.7M parameters (under 10 MB in bf16)."""

    hidden_size: int = Field(256, description="Language model hidden size.")
    intermediate_size: int = Field(512, description="Language model MLP size.")
    num_layers: int = Field(4, description="Language model decoder layers.")
    num_heads: int = Field(4, description="Attention heads (head_dim = hidden_size / heads).")
    num_kv_heads: int = Field(2, description="Key/value heads (grouped-query attention).")
    vision_depth: int = Field(2, description="Vision transformer blocks.")
    vision_hidden: int = Field(128, description="Vision transformer width.")
    vision_heads: int = Field(4, description="Vision attention heads.")
    pos_grid: int = Field(16, description="Side of the learned vision position grid "
                          "(num_position_embeddings = pos_grid**2).")
    pos_embed_std: float = Field(0.4, description="Scale of the sin-cos init of visual.pos_embed.")
    number_embed_std: float = Field(0.4, description="Scale of the sin-cos init of the embeddings "
                                    "of the number tokens 0..1000 (0 keeps the random init).")
    bpe_vocab: int = Field(640, description="Byte-level BPE vocabulary before special and "
                           "number tokens are added.")
    min_pixels: int = Field(64 * 64, description="Image processor min pixels (smart_resize).")
    max_pixels: int = Field(256 * 256, description="Image processor max pixels (smart_resize). "
                            "Bounds the visual tokens per image: 256x256 -> 64 tokens.")
    seed: int = Field(0, description="Seed for the random weights.")


def _corpus() -> list[str]:
    """Text the BPE is trained on: every word the synthetic domains and prompts use."""
    from grounding.families import get_family
    from grounding.synth import PALETTES, SHAPES

    fam = get_family("qwen3_vl")
    colors = [c for p in PALETTES.values() for c in p]
    lines = []
    for c in colors:
        for s in SHAPES:
            for size in ("", "small ", "large "):
                for rel in ("", " left of the red square", " right of the blue circle",
                            " above the green triangle", " below the yellow square"):
                    expr = f"the {size}{c} {s}{rel}"
                    lines.append(fam.prompt(expr))
                    lines.append(json.dumps([{"bbox_2d": [0, 0, 0, 0], "label": expr}]))
    lines += ["user", "assistant", "system", "You are a helpful assistant.", "```json", "```"]
    return lines


def build_tokenizer(cfg: TinyModelConfig):
    """Train the byte-level BPE and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.bpe_vocab,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # Whole numbers 0..1000 as single tokens (longest match wins, so "1000" is one token).
    tok.add_tokens([AddedToken(str(i), normalized=False, single_word=False) for i in range(1001)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        padding_side="left",  # right padding breaks batched generation and training labels
        model_max_length=1024,
        chat_template=CHAT_TEMPLATE,
    )
    return fast


def _sincos_2d(grid: int, dim: int, std: float):
    """2-D sin-cos position table (grid*grid, dim), rescaled to standard deviation ``std``."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                            torch.arange(grid, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        ang = coord[:, None] * omega[None, :] * math.pi / 2
        parts += [torch.sin(ang), torch.cos(ang)]
    table = torch.cat(parts, dim=1)
    if table.shape[1] < dim:
        table = torch.cat([table, torch.zeros(table.shape[0], dim - table.shape[1])], dim=1)
    return table / table.std() * std


def _number_table(dim: int, std: float):
    """Embeddings for the numbers 0..1000: sin-cos features of the value, rescaled to ``std``.

    The word embeddings are tied to the output head, so this gives coordinates an order in both
    directions: reading "480" tells the model it is close to "470", and emitting a coordinate
    becomes producing a vector near the features of the right value, which the softmax turns
    into a peak at the nearest number. Periods run geometrically from 2000 units (monotone over
    the range) down to 20 units (so neighbours 10 apart are told apart).
    """
    import torch

    v = torch.arange(1001, dtype=torch.float32)
    k = dim // 2
    periods = 2000.0 * (20.0 / 2000.0) ** (torch.arange(k, dtype=torch.float32) / max(1, k - 1))
    ang = 2 * math.pi * v[:, None] / periods[None, :]
    table = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1)  # (1001, 2k)
    return table / table.std() * std


def build_processor(tokenizer, cfg: TinyModelConfig):
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        patch_size=16, merge_size=2, temporal_patch_size=2,
        min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    # vLLM builds Qwen3VLProcessor itself and reads video settings even with video disabled,
    # so the folder needs a video processor config too.
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer, cfg: TinyModelConfig):
    from transformers import Qwen3VLConfig

    head_dim = cfg.hidden_size // cfg.num_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # sums to head_dim/2
    assert sum(mrope) == half, (mrope, half)
    ids = tokenizer.convert_tokens_to_ids
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": mrope, "mrope_interleaved": True},
            tie_word_embeddings=True,
            pad_token_id=ids("<|endoftext|>"),
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=dict(
            depth=cfg.vision_depth,
            hidden_size=cfg.vision_hidden,
            intermediate_size=cfg.vision_hidden * 2,
            num_heads=cfg.vision_heads,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=cfg.hidden_size,
            num_position_embeddings=cfg.pos_grid ** 2,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build(out_dir: str | Path, cfg: TinyModelConfig | None = None) -> Path:
    """Write a complete, randomly initialised tiny Qwen3-VL checkpoint folder and return it."""
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    cfg = cfg or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg)
    processor = build_processor(tokenizer, cfg)
    config = build_config(tokenizer, cfg)
    model = Qwen3VLForConditionalGeneration(config)
    with torch.no_grad():
        pe = model.model.visual.pos_embed.weight
        pe.copy_(_sincos_2d(cfg.pos_grid, pe.shape[1], cfg.pos_embed_std))
        if cfg.number_embed_std > 0:
            emb = model.get_input_embeddings().weight
            ids = tokenizer.convert_tokens_to_ids([str(i) for i in range(1001)])
            # value features in the first half; the second half keeps its random init so each
            # number stays distinguishable from words and from its neighbours
            table = _number_table(emb.shape[1] // 2, cfg.number_embed_std)
            emb[ids, : table.shape[1]] = table
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "groundlabel.json").write_text(json.dumps(
        {"family": "qwen3_vl", "tiny_model_config": cfg.model_dump()}, indent=2))
    return out
