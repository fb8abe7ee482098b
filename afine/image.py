"""Image decoding and A-FINE's preprocessing (docs/scoring.md, "What A-FINE computes").

Decoding follows the official loader (OpenCV's colour mode) without depending on OpenCV: 8-bit RGB with the
EXIF orientation applied, 16-bit samples reduced to their high byte, grey replicated, alpha dropped.
"""

from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import AfineError, warn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Sizes worth a warning: below MIN_SIDE a few CLIP patches hold the whole image; above MAX_SIDE / MAX_PIXELS
# one image needs gigabytes of activations. Pillow's own decompression-bomb limit is an error (see open_image).
MIN_SIDE = 32
MAX_SIDE = 8000
MAX_PIXELS = 64_000_000

# EXIF orientation -> the transposition that displays the image upright (the EXIF 2.3 convention).
ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")

# Large images get our one-line warning (check_size); Pillow's multi-line one would repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_warned: set[str] = set()
_warned_lock = threading.Lock()


@contextmanager
def open_image(path: str | Path):
    """Image.open with every failure (missing, not an image, too large, corrupt) as a one-line AfineError."""
    try:
        with Image.open(path) as im:
            yield im
    except FileNotFoundError:
        link = f" (a broken symbolic link to {os.readlink(path)})" if os.path.islink(path) else ""
        raise AfineError(f"{path}: image file not found{link}") from None
    except Image.DecompressionBombError as e:
        raise AfineError(f"{path}: image refused, too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise AfineError(f"{path}: cannot read image ({e})") from None


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 = upright), read from the header only.

    A PNG whose EXIF chunk follows the pixel data counts as upright, so header sizes and decoded sizes agree.
    """
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    value = im.getexif().get(0x0112, 1)
    return value if value in ORIENTATION else 1


def check_size(path: str | Path, h: int, w: int) -> None:
    """Warn (once per path per process) about images too small or too large for meaningful, affordable scores."""
    small = min(h, w) < MIN_SIDE
    if not small and max(h, w) <= MAX_SIDE and h * w <= MAX_PIXELS:
        return
    with _warned_lock:
        if str(path) in _warned:
            return
        _warned.add(str(path))
    if small:
        warn(f"{path}: tiny image ({w}x{h}); below {MIN_SIDE}x{MIN_SIDE} its A-FINE score means little")
        return
    why = [f"a side over {MAX_SIDE} pixels"] if max(h, w) > MAX_SIDE else []
    why += [f"{h * w / 1e6:.1f} MP, over {MAX_PIXELS / 1e6:.0f} MP"] if h * w > MAX_PIXELS else []
    warn(f"{path}: very large image ({w}x{h}: {' and '.join(why)}); scoring it needs a lot of memory")


def load_image(path: str | Path, warn_size: bool = True) -> torch.Tensor:
    """Decode an image file to a float32 tensor [3, H, W] in [0, 1], as the official loader does.

    EXIF orientation applied; grey and palette images become 3-channel RGB; alpha is dropped; 16-bit samples
    keep their high byte (v >> 8). `warn_size=False` skips the size warning (callers that checked headers).
    """
    with open_image(path) as im:
        turn = ORIENTATION.get(orientation(im))
        if im.mode in SIXTEEN_BIT_GREY:  # decoding errors here become AfineErrors in open_image
            grey = np.asarray(im).astype(np.int64)
            array = np.repeat((np.clip(grey, 0, 65535) >> 8).astype(np.uint8)[..., None], 3, axis=2)
        else:  # Pillow already reduces 16-bit RGB(A) and grey-alpha PNGs to their high byte
            array = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if turn is not None:
        array = np.asarray(Image.fromarray(array).transpose(turn))
    if warn_size:
        check_size(path, array.shape[0], array.shape[1])
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file as load_image will return it (EXIF orientation applied), read from its header.

    Warns once per path about tiny or very large images.
    """
    with open_image(path) as im:
        w, h = im.size
        if orientation(im) in (5, 6, 7, 8):  # a quarter turn or a transposition swaps the sides
            h, w = w, h
    check_size(path, h, w)
    return h, w


def normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP's per-channel normalisation of [B, 3, H, W] images in [0, 1]."""
    mean = x.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = x.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def padded_size(h: int, w: int, multiple: int = 32) -> tuple[int, int]:
    """The next multiples of `multiple` at or above (h, w). Floor division of non-negative numbers only: an ONNX
    export turns `//` into a division that truncates, which differs from Python's floor for negative ones."""
    return (h + multiple - 1) // multiple * multiple, (w + multiple - 1) // multiple * multiple


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> normalised, bicubic-resized to multiples of 32 if needed."""
    x = normalize(x)
    h, w = x.shape[-2:]
    size = padded_size(h, w)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x
