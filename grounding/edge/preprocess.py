"""Qwen3-VL's and Qwen2.5-VL's image and position inputs, in numpy: what the ONNX graphs take.

Each function mirrors one piece of transformers 5.19 (named in its docstring) with the same
float32 arithmetic, so the ONNX runner feeds the graphs what the transformers engine feeds the
model. One difference is known: transformers resizes with torchvision's antialiased bicubic on
uint8 tensors; here Pillow's bicubic does it. The two differ by one grey level on a few pixels
(more where bicubic overshoot is clipped on noisy images); docs/edge.md counts the effect.

Coordinates: images are (height, width, 3) uint8 RGB arrays; the grid is (t, h, w) in patches
(``patch_size`` pixels each); positions are patch rows/columns of the resized image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field

from grounding.resize import smart_resize


class ProcessorSettings(BaseModel):
    """The image processor and vision-tower settings the runner needs (from the checkpoint's
    processor and config at export time)."""

    patch_size: int = Field(description="Pixels per patch side.")
    temporal_patch_size: int = Field(description="Frames per patch (an image is repeated).")
    merge_size: int = Field(description="Patches per visual token side (spatial merge).")
    in_channels: int = Field(3, description="Colour channels.")
    num_grid_per_side: int | None = Field(None, description="Side of the learned "
                                          "position-embedding grid (Qwen3-VL; None: none).")
    window_size: int | None = Field(None, description="Window side in pixels of the windowed "
                                    "vision blocks (Qwen2.5-VL; None: no windows).")
    min_pixels: int = Field(description="Fewest pixels of a resized image.")
    max_pixels: int = Field(description="Most pixels of a resized image.")
    image_mean: list[float] = Field(description="Per-channel mean, 0-1 scale.")
    image_std: list[float] = Field(description="Per-channel std, 0-1 scale.")
    rescale_factor: float = Field(description="uint8 -> 0-1 scale (1/255).")
    resample: int = Field(3, description="PIL resampling filter (3: bicubic).")

    @property
    def factor(self) -> int:
        """Pixels per visual token side: sides are resized to multiples of this."""
        return self.patch_size * self.merge_size


@dataclass
class VisionInputs:
    """The vision graph's inputs for one image, and its grid (t, h, w) in patches. The graph of
    each family takes the fields it needs (the runner feeds them by input name)."""

    pixel_values: np.ndarray   # (t*h*w, C*T*P*P) float32
    rot_pos_ids: np.ndarray    # (t*h*w, 2) int64: patch row, column
    grid: tuple[int, int, int]
    interp_indices: np.ndarray | None = None  # (t*h*w, 4) int64 (Qwen3-VL)
    interp_weights: np.ndarray | None = None  # (t*h*w, 4) float32 (Qwen3-VL)
    window_index: np.ndarray | None = None    # (merged tokens,) int64 (Qwen2.5-VL)
    window_segments: np.ndarray | None = None  # (t*h*w,) int64, window order (Qwen2.5-VL)
    reverse_index: np.ndarray | None = None   # (merged tokens,) int64 (Qwen2.5-VL)


def resize(image, spec: ProcessorSettings):
    """A PIL RGB image resized as the processor resizes it (`smart_resize`), as a uint8
    (height, width, 3) array."""
    from PIL import Image

    h, w = smart_resize(image.height, image.width, spec.factor, spec.min_pixels, spec.max_pixels)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), Image.Resampling(spec.resample))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def pixel_values(arr: np.ndarray, spec: ProcessorSettings) -> tuple[np.ndarray, tuple]:
    """Normalise and patchify a resized image: ``Qwen2VLImageProcessor`` (fused
    rescale+normalise in float32: ``(x - mean/r) / (std/r)``; ``patchify``)."""
    r = np.float32(1.0 / spec.rescale_factor)
    mean = np.asarray(spec.image_mean, np.float32) * r
    std = np.asarray(spec.image_std, np.float32) * r
    x = (arr.astype(np.float32) - mean) / std            # (H, W, C)
    x = x.transpose(2, 0, 1)                              # (C, H, W)
    c, hh, ww = x.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = hh // p, ww // p
    x = x.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], tp, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * tp * p * p)), (1, gh, gw)


def _block_rows_cols(gh: int, gw: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Patch row and column of each patch in spatial-merge-block order."""
    idx = np.arange(gh * gw)
    in_col, in_row = idx % m, (idx // m) % m
    block_col, block_row = (idx // (m * m)) % (gw // m), idx // (m * m * (gw // m))
    return block_row * m + in_row, block_col * m + in_col


def interpolation(grid: tuple[int, int, int], spec: ProcessorSettings):
    """Bilinear (align_corners) taps and weights resampling the learned position grid to this
    image: ``transformers.vision_utils.get_vision_interpolation_indices_and_weights`` for one
    image, mode bilinear, align_corners=True, in spatial-merge-block order."""
    t, gh, gw = grid
    side = spec.num_grid_per_side
    rows, cols = _block_rows_cols(gh, gw, spec.merge_size)

    def axis(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        dist = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
        return taps, np.clip(np.float32(1) - dist, 0, None).astype(np.float32)

    ht, hw_ = axis(rows, gh)
    wt, ww_ = axis(cols, gw)
    idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    wts = (hw_[:, :, None] * ww_[:, None, :]).reshape(-1, 4)
    return np.tile(idx, (t, 1)), np.tile(wts, (t, 1)).astype(np.float32)


def rotary_positions(grid: tuple[int, int, int], merge: int) -> np.ndarray:
    """(patches, 2) patch row and column per patch, block order:
    ``transformers.vision_utils.get_vision_position_ids``."""
    t, gh, gw = grid
    rows, cols = _block_rows_cols(gh, gw, merge)
    return np.tile(np.stack([rows, cols], axis=-1), (t, 1)).astype(np.int64)


def windows(grid: tuple[int, int, int], merge: int, window_size: int,
            patch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window layout for one image: ``window_index`` (the merged tokens in window
    order), ``window_segments`` (each patch's window id, patches in that order: the windowed
    blocks attend within one id, which is what ``cu_window_seqlens`` splits) and
    ``reverse_index`` (argsort of ``window_index``: back to raster order).
    ``transformers.vision_utils.get_vision_window_index`` for one image."""
    t, gh, gw = grid
    lh, lw = gh // merge, gw // merge
    win = window_size // merge // patch_size
    pad_h, pad_w = win - lh % win, win - lw % win   # a whole empty row when divisible, as HF
    nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
    padded = np.full((t, lh + pad_h, lw + pad_w), -100, np.int64)
    padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
    per_window = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(
        t * nh * nw, win * win)
    valid = per_window != -100
    index = per_window[valid]
    segments = np.nonzero(valid)[0]        # window id of each merged token, window order
    return (index.astype(np.int64), np.repeat(segments, merge * merge).astype(np.int64),
            np.argsort(index, kind="stable").astype(np.int64))


def vision_inputs(arr: np.ndarray, spec: ProcessorSettings) -> VisionInputs:
    """All vision-graph inputs for one resized (height, width, 3) uint8 image."""
    pv, grid = pixel_values(arr, spec)
    vi = VisionInputs(pv, rotary_positions(grid, spec.merge_size), grid)
    if spec.num_grid_per_side:
        vi.interp_indices, vi.interp_weights = interpolation(grid, spec)
    if spec.window_size:
        vi.window_index, vi.window_segments, vi.reverse_index = windows(
            grid, spec.merge_size, spec.window_size, spec.patch_size)
    return vi


def mrope_positions(input_ids: np.ndarray, image_token_id: int, grid: tuple[int, int, int],
                    merge: int) -> tuple[np.ndarray, int]:
    """(3, 1, S) M-RoPE t/h/w positions of one prompt with one image, and the delta that
    later (generated) positions add to their index: ``Qwen3VLModel.get_rope_index`` for one
    row without padding. Text advances all three by one per token; the image's tokens sit at
    ``start + (0, row, column)`` of the merged grid, and the text after it starts at
    ``start + max(h, w) / merge``."""
    ids = np.asarray(input_ids).reshape(-1)
    is_img = ids == image_token_id
    out = np.zeros((3, ids.size), np.int64)
    pos, i = 0, 0
    _, gh, gw = grid
    lh, lw = gh // merge, gw // merge
    while i < ids.size:
        if is_img[i]:
            n = lh * lw
            if not is_img[i:i + n].all() or (i + n < ids.size and is_img[i + n]):
                raise ValueError(f"image tokens at {i} are not one run of {n} ({lh}x{lw})")
            hh, ww = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
            out[0, i:i + n] = pos
            out[1, i:i + n] = hh.reshape(-1) + pos
            out[2, i:i + n] = ww.reshape(-1) + pos
            pos += max(gh, gw) // merge
            i += n
        else:
            j = i
            while j < ids.size and not is_img[j]:
                j += 1
            out[:, i:j] = np.arange(j - i) + pos
            pos += j - i
            i = j
    return out[:, None, :], int(out.max() + 1 - ids.size)
