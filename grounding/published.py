"""Real checkpoints' published architecture numbers, as their ``config.json`` and image
processor settings give them: for sizing engines (context length, memory share) and for GPU
checks with random weights, without the hub and without their weights.

Sources: the ``config.json`` and ``preprocessor_config.json`` files of Qwen/Qwen2.5-VL-7B-Instruct,
Qwen/Qwen2.5-VL-3B-Instruct and Qwen/Qwen3-VL-8B-Instruct on the Hugging Face hub (numbers only;
nothing is downloaded). Throughput and memory depend on these shapes, not on weight values.

    python -c "from grounding.published import write_config; write_config('qwen2.5-vl-7b', '/tmp/q7')"
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

_QWEN25_VISION = {
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
    "num_heads": 16, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
    "spatial_patch_size": 14, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}
_QWEN25_IDS = {
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656,
}
# Qwen2-VL's image processor as Qwen2.5-VL ships it: 14-pixel patches merged 2x2, so one
# visual token covers 28x28 pixels; at most 12,845,056 pixels (16,384 tokens) an image.
_QWEN25_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136,
    "max_pixels": 12845056, "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def _qwen25(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int,
            tie: bool) -> dict:
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "max_position_embeddings": 128000, "max_window_layers": layers, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "sliding_window": 32768, "use_sliding_window": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": tie, "torch_dtype": "bfloat16", "vocab_size": vocab,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        **_QWEN25_IDS,
        "vision_config": {**_QWEN25_VISION, "out_hidden_size": hidden},
    }


CHECKPOINTS: dict[str, dict] = {
    "qwen2.5-vl-7b": {
        "config": _qwen25(3584, 18944, 28, 28, 4, 152064, tie=False),
        "processor": _QWEN25_PROCESSOR,
        "params_b": 8.29,  # text 7.62 B + vision 0.67 B (bf16 weights ~16.6 GB)
    },
    "qwen2.5-vl-3b": {
        "config": _qwen25(2048, 11008, 36, 16, 2, 151936, tie=True),
        "processor": _QWEN25_PROCESSOR,
        "params_b": 3.75,
    },
    "qwen3-vl-8b": {
        "config": {
            "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
            "image_token_id": 151655, "video_token_id": 151656,
            "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "text_config": {
                "model_type": "qwen3_vl_text", "hidden_act": "silu", "hidden_size": 4096,
                "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
                "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                 "rope_type": "default"},
                "vocab_size": 151936, "tie_word_embeddings": False, "bos_token_id": 151643,
                "eos_token_id": 151645, "attention_bias": False, "torch_dtype": "bfloat16",
            },
            "vision_config": {
                "model_type": "qwen3_vl", "depth": 27, "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "out_hidden_size": 4096,
                "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
            },
        },
        # 16-pixel patches merged 2x2: one visual token per 32x32 pixels.
        "processor": {
            "image_processor_type": "Qwen2VLImageProcessor", "patch_size": 16, "merge_size": 2,
            "temporal_patch_size": 2, "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        },
        "params_b": 8.77,
    },
}
"""Published checkpoints by short name: ``config`` (config.json), ``processor``
(preprocessor_config.json) and ``params_b`` (billions of parameters, as published)."""


def published(name: str) -> dict:
    """A copy of one checkpoint's published numbers; a clear error for an unknown name."""
    try:
        return copy.deepcopy(CHECKPOINTS[name])
    except KeyError:
        raise ValueError(f"unknown published checkpoint {name!r} "
                         f"(known: {', '.join(sorted(CHECKPOINTS))})") from None


def write_config(name: str, out: str | Path) -> Path:
    """A weightless checkpoint folder: ``config.json`` and ``preprocessor_config.json``, what
    family detection, resize settings and engine sizing read."""
    spec = published(name)
    p = Path(out)
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text(json.dumps(spec["config"], indent=2))
    (p / "preprocessor_config.json").write_text(json.dumps(spec["processor"], indent=2))
    return p
