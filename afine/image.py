"""Image decoding and A-FINE's preprocessing: RGB in [0, 1], CLIP normalisation, bicubic resize to multiples of 32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import AfineError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path: str | Path) -> torch.Tensor:
    """Decode an image file to a float32 tensor [3, H, W] in [0, 1].

    Grey and palette images become 3-channel RGB; alpha is dropped.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            array = np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise AfineError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise AfineError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file, read from its header without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise AfineError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise AfineError(f"{path}: cannot read image ({e})") from None
    return h, w


def normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP's per-channel normalisation of [B, 3, H, W] images in [0, 1]."""
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def padded_size(h: int, w: int, multiple: int = 32) -> tuple[int, int]:
    """The next multiples of `multiple` at or above (h, w)."""
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised, bicubic-resized to multiples of 32 if needed."""
    x = normalize(x)
    h, w = x.shape[-2:]
    size = padded_size(h, w)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x
