"""Where bundled things live."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "models" / "tiny-qwen3-vl"
"""The tiny Qwen3-VL trained by `groundlabel tiny train`, committed so the demo needs no training."""
