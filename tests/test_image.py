"""Decoding as the official loader does (EXIF orientation, 16-bit samples), and size checks on images."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from afine import image
from afine.errors import AfineError
from afine.image import image_size, load_image


def as_uint8(x) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8."""
    return (x * 255).round().byte().permute(1, 2, 0).numpy()


def write_png16(path, samples: np.ndarray) -> None:
    """A 16-bit PNG written byte by byte (grey [H, W] or RGB [H, W, 3]), independent of Pillow's encoder."""
    h, w = samples.shape[:2]
    color_type = 0 if samples.ndim == 2 else 2
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("orientation, quarter_turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, orientation, quarter_turns):
    """Orientation 6 means 'rotate 90 degrees clockwise to display', 8 counter-clockwise, 3 half a turn."""
    rng = np.random.default_rng(orientation)
    pixels = np.kron(rng.integers(0, 256, (4, 6, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 32 x 48, blocky
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as im:  # the stored pixels, as written
        stored = np.asarray(im.convert("RGB"))
    x = load_image(path)
    expected = np.rot90(stored, k=quarter_turns)
    assert x.shape == (3, *expected.shape[:2])
    assert np.array_equal(as_uint8(x), expected)
    assert image_size(path) == expected.shape[:2]
    # Independent of the decoder: the top-left block of the upright image is the right corner block of `pixels`.
    corner = {6: pixels[-8:, :8], 8: pixels[:8, -8:], 3: pixels[-8:, -8:]}[orientation]
    assert np.abs(as_uint8(x)[:8, :8].astype(int).mean((0, 1)) - corner.astype(int).mean((0, 1))).max() < 8


def test_sixteen_bit_grey_png_keeps_the_high_byte(tmp_path):
    values = np.array([[0, 255, 256, 65535], [4660, 43981, 511, 32768]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    write_png16(path, values)
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)  # 0 0 1 255 / 18 171 1 128
    assert np.array_equal(as_uint8(load_image(path, warn_size=False)), expected)


def test_sixteen_bit_rgb_png_keeps_the_high_byte(tmp_path):
    values = np.array([[[0, 255, 256], [65535, 4660, 43981]]], dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    write_png16(path, values)
    assert np.array_equal(as_uint8(load_image(path, warn_size=False)), (values >> 8).astype(np.uint8))


def test_decompression_bomb_is_a_one_line_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x limit: Pillow refuses
    for read in (load_image, image_size):
        with pytest.raises(AfineError) as info:
            read(path)
        assert str(info.value).startswith(f"{path}: ") and "too large" in str(info.value)
        assert "\n" not in str(info.value)


def test_tiny_and_huge_images_warn_once_per_path(tmp_path, capsys):
    tiny, huge = tmp_path / "tiny.png", tmp_path / "huge.png"
    Image.new("RGB", (12, 10)).save(tiny)
    Image.new("L", (9000, 40)).save(huge)  # wide but small in bytes
    for _ in range(3):
        load_image(tiny)
        image_size(tiny)
        assert image_size(huge) == (40, 9000)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith(f"warning: {tiny}: ") and "12x10" in err[0]
    assert err[1] == f"warning: {huge}: very large image (9000x40: a side over 8000 pixels); scoring it needs a " \
                     f"lot of memory"  # not '0 MP', which would not say why
    normal = tmp_path / "normal.png"
    Image.new("RGB", (64, 32)).save(normal)
    load_image(normal)
    assert capsys.readouterr().err == ""


def test_a_very_large_image_warning_says_which_limit_it_passes(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(image, "MAX_PIXELS", 2_000_000)
    many, both = tmp_path / "many.png", tmp_path / "both.png"
    Image.new("L", (2000, 1500)).save(many)
    Image.new("L", (8100, 400)).save(both)
    image_size(many)
    image_size(both)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"warning: {many}: very large image (2000x1500: 3.0 MP, over 2 MP); scoring it needs a lot " \
                     f"of memory"
    assert err[1].startswith(f"warning: {both}: very large image (8100x400: a side over 8000 pixels and 3.2 MP, "
                             f"over 2 MP)")
