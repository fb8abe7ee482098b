"""Synthetic IQA corpus: small look-alikes of A-FINE's five datasets in their official layouts (docs/datasets.md).

The real KADID-10k, PIPAL, TID2013, DiffIQA and SRIQA-Bench are large downloads. This module writes
stand-ins with the same folders, file names and label files, so training, fit_gamma and 2AFC evaluation
run end to end offline. Images are procedural "natural" scenes (1/f colour fields, hard and soft edged
shapes, gratings and 1/f textures at several scales). Everything is a pure function of the seed: each
image draws from its own random stream keyed by (seed, dataset, indices), so files are byte-identical
for a seed whatever the order of generation.

- KADID10K / PIPAL / TID2013: graded distortions (blur, noise, JPEG, colour, contrast, ...) of each
  reference. Quality q = 1 - weight(type) * sensitivity(ref, type) * level / levels, plus a jitter
  smaller than a third of one level step, so MOS falls strictly with level within a (ref, type) series.
  MOS = KADID 1 + 4q (with a var column), PIPAL 1000 + 700q, TID2013 9q. Split 7:1:2 by reference;
  triplets are afine.labels' "nlogn" lists.
- DiffIQA: a clean source is degraded (blur + noise + JPEG at severity s_ref) to make the reference;
  "generated" images are the source at a lower severity plus faint hallucinated texture (P, better than
  the reference), at about the same severity with a fresh realisation (S, similar), or worse (N): half
  of them the source at a higher severity with strong texture artefacts, half the reference itself
  blurred and overlaid with hallucinated texture. Those last stay so close to the reference pixel for
  pixel that fidelity alone ranks them above P and S images; only naturalness tells them apart, which
  is the situation A-FINE was made for (a reference worse than the images under test).
- SRIQA-Bench: per scene, an Original photo with flaws of its own (blur, noise and JPEG at a per-scene
  severity) and 10 simulated x4 super-resolution results from it: regression methods blend its bicubic
  upsampling towards the clean scene (blurry), generative ones recover more of the clean detail but add
  hallucinated texture. MOS = 100 * (1 - degradation) with a small jitter, so the better SR results
  outscore the Original, as in the real benchmark.
- gan_texture (PIPAL) costs less quality per level than blur or noise: people prefer invented texture
  to blur at equal fidelity, the finding PIPAL was built to show.

DiffIQA type letters (our reading): the first two letters are the classes of x1 and x2, the third is
the reference y. P = better than the reference, S = similar, N = worse, Y = the reference itself.
Classes rank P > S > N and P > Y ~ S > N, so PSY, PNY, SNY and PYY lists have g12 = 1 and NYY has
g12 = 0; in PYY and NYY, x2 is y. The Train list (6 columns) holds every cross-class pair and every
generated image against the reference, in random order, with g12, g1y, g2y from the same ranking.

    python -m afine.synth --out DIR [--seed S] [--scale small|demo|medium]
"""

from __future__ import annotations

if __name__ == "__main__":  # a command: a Ctrl-C while the imports below load is one line, exit code 130
    from .interrupts import exit_on_ctrl_c

    exit_on_ctrl_c()

import dataclasses
import io
import itertools
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from .errors import AfineError, ArgumentParser, command
from .labels import SPLITS, MOSRecord, Triplet, nlogn_triplets, write_mos, write_triplets

DATASETS = ("KADID10K", "PIPAL", "TID2013", "DiffIQA", "SRIQA-Bench")
DIFFIQA_TYPES = ("PSY", "PNY", "SNY", "PYY", "NYY")


# ---------------------------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    """How much to generate. Sizes are (H, W); every fourth reference gets the `odd` size."""

    references: int  # per traditional dataset
    kadid_types: tuple[str, ...]
    pipal_types: tuple[str, ...]
    tid_types: tuple[str, ...]
    size: dict  # dataset -> (regular (H, W), odd (H, W))
    diffiqa_references: int
    diffiqa_per_class: int  # generated images per class (P, S, N) per reference
    sriqa_scenes: int


SCALES = {
    "small": Scale(
        references=30,
        kadid_types=("blur", "motion_blur", "noise", "jpeg", "saturation", "contrast"),
        pipal_types=("sr_bicubic", "gan_texture", "blur", "noise", "jpeg"),
        tid_types=("noise", "impulse", "blur", "jpeg", "quantise", "contrast"),
        # the training sets have one size each, like the published ones (KADID-10k and TID2013 384x512, PIPAL
        # 288x288, DiffIQA 512x512), so a training batch holds about as many shapes as a real one
        size={"KADID10K": ((64, 96), (64, 96)), "PIPAL": ((48, 48), (48, 48)), "TID2013": ((64, 96), (64, 96)),
              "DiffIQA": ((64, 64), (64, 64)), "SRIQA-Bench": ((96, 96), (80, 112))},
        diffiqa_references=60, diffiqa_per_class=4, sriqa_scenes=8),
    "medium": Scale(
        references=20,
        kadid_types=("blur", "motion_blur", "noise", "jpeg", "saturation", "contrast", "colour_cast",
                     "brightness", "pixelate", "impulse", "quantise", "oversharpen"),
        pipal_types=("sr_bicubic", "gan_texture", "blur", "noise", "jpeg", "mixed", "oversharpen", "pixelate"),
        tid_types=("noise", "impulse", "blur", "jpeg", "quantise", "contrast", "colour_cast", "chromatic",
                   "pixelate", "saturation", "brightness", "motion_blur"),
        size={"KADID10K": ((192, 256), (200, 256)), "PIPAL": ((192, 192), (200, 176)),
              "TID2013": ((192, 256), (192, 248)), "DiffIQA": ((128, 128), (136, 120)),
              "SRIQA-Bench": ((192, 192), (176, 208))},
        diffiqa_references=60, diffiqa_per_class=3, sriqa_scenes=10),
}
# demo.py's corpus: "small" with three times the references. A tiny CLIP trained from scratch learns from 21
# training references per dataset a naturalness that ranks the held-out references' images far worse
# (docs/training.md and docs/measurements.md, "The demo"); with 63 it carries over, and stage 3, which learns how
# much to trust it, gains on validation.
SCALES["demo"] = dataclasses.replace(SCALES["small"], references=90, diffiqa_references=180)


def _size(scale: Scale, dataset: str, i: int) -> tuple[int, int]:
    regular, odd = scale.size[dataset]
    return odd if i % 4 == 3 else regular


def _rng(seed: int, dataset: str, *key: int) -> np.random.Generator:
    """An independent random stream per (seed, dataset, key...): output never depends on generation order."""
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), *key])


# ---------------------------------------------------------------------------------------------- images


def pink_noise(rng: np.random.Generator, n: int, h: int, w: int, beta) -> np.ndarray:
    """n fields [n, h, w] with power spectrum ~ 1/f^beta (beta scalar or per field), zero mean, unit std."""
    white = rng.standard_normal((n, h, w), dtype=np.float32)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    beta = np.broadcast_to(np.asarray(beta, dtype=np.float64), (n,))
    spectrum = np.fft.rfft2(white) * f[None] ** (-beta[:, None, None] / 2)
    spectrum[:, 0, 0] = 0.0
    out = np.fft.irfft2(spectrum, s=(h, w))
    out /= out.std(axis=(1, 2), keepdims=True) + 1e-8
    return out.astype(np.float32)


def natural_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A procedural natural-looking scene [h, w, 3] float32 in [0, 1].

    A smooth 1/f^3 colour field with a lighting gradient, overlaid with 5-12 ellipses, rectangles and
    half-planes (hard and soft edges), each carrying a grating or 1/f texture of its own scale;
    then smooth shading and fine grain. Shapes are composited back to front, vectorised.
    """
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    side = min(h, w)
    mix = rng.normal(0.0, 0.1, (3, 3)) + 0.06
    background = rng.uniform(0.2, 0.8, 3)[:, None, None] + np.einsum("ij,jhw->ihw", mix, pink_noise(rng, 3, h, w, 3.0))
    background += rng.normal(0.0, 0.25) * (yy / h - 0.5) + rng.normal(0.0, 0.15) * (xx / w - 0.5)

    k = int(rng.integers(5, 13))
    kind = rng.choice(3, (k, 1, 1), p=[0.45, 0.35, 0.2])  # 0 ellipse, 1 rectangle, 2 half-plane
    cy, cx = rng.uniform(0, h, (k, 1, 1)), rng.uniform(0, w, (k, 1, 1))
    theta = rng.uniform(0, np.pi, (k, 1, 1))
    a = rng.uniform(0.06, 0.35, (k, 1, 1)) * side
    b = a * rng.uniform(0.3, 1.0, (k, 1, 1))
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)
    ellipse = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * b  # about the signed distance in pixels
    rectangle = (np.maximum(np.abs(u) / a, np.abs(v) / b) - 1.0) * b
    distance = np.where(kind == 0, ellipse, np.where(kind == 1, rectangle, u))
    softness = rng.choice(np.array([0.6, 1.0, 2.0, 4.0]), (k, 1, 1))
    alpha = np.clip(0.5 - distance / softness, 0.0, 1.0).astype(np.float32)  # [k, h, w]

    freq = np.exp(rng.uniform(np.log(0.04), np.log(0.35), (k, 1, 1)))  # cycles per pixel: several scales
    ori = rng.uniform(0, np.pi, (k, 1, 1))
    grating = np.sin(2 * np.pi * freq * (xx * np.cos(ori) + yy * np.sin(ori)) + rng.uniform(0, 2 * np.pi, (k, 1, 1)))
    noise = pink_noise(rng, k, h, w, rng.uniform(1.2, 2.4, k))
    texture = np.where(rng.random((k, 1, 1)) < 0.35, grating, noise) * rng.uniform(0.02, 0.1, (k, 1, 1))
    colour = rng.uniform(0.05, 0.95, (k, 3, 1, 1))
    tint = rng.uniform(0.5, 1.0, (k, 3, 1, 1))
    layers = colour + tint * texture[:, None]  # [k, 3, h, w]

    # painter's algorithm: layer j shows through every later layer i > j
    clear = np.cumprod((1.0 - alpha)[::-1], axis=0)[::-1]  # clear[j] = prod_{i >= j} (1 - alpha_i)
    above = np.concatenate([clear[1:], np.ones((1, h, w), np.float32)])
    image = background * clear[0] + ((alpha * above)[:, None] * layers).sum(0)
    image = image * (1.0 + 0.12 * pink_noise(rng, 1, h, w, 2.5)) + 0.012 * pink_noise(rng, 1, h, w, 1.0)
    return np.clip(image, 0.0, 1.0).transpose(1, 2, 0).astype(np.float32)


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def save_image(path: Path, x: np.ndarray) -> None:
    """Write [h, w, 3] in [0, 1] as 8-bit RGB; PNG or BMP by suffix (no metadata, so bytes are reproducible)."""
    Image.fromarray(to_uint8(x)).save(path, format="BMP" if path.suffix == ".bmp" else "PNG")


# ---------------------------------------------------------------------------------------------- distortions
# Each takes an image [h, w, 3] in [0, 1], a strength t in (0, 1] and a random stream; stronger = worse.


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")


def _luma(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(x)).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def _resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bicubic resize of [H, W, 3] float (PIL 'F' mode per channel, no uint8 rounding)."""
    channels = [np.asarray(Image.fromarray(x[..., c]).resize((w, h), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels, -1)


def _hallucination(x: np.ndarray, rng: np.random.Generator, amount: float) -> np.ndarray:
    """Band-pass texture strongest at edges, like the invented detail of GAN / diffusion outputs."""
    h, w, _ = x.shape
    luma = _luma(x)
    edges = np.hypot(ndimage.sobel(luma, 0), ndimage.sobel(luma, 1))
    edges = edges / (edges.max() + 1e-6)
    band = pink_noise(rng, 3, h, w, 0.5).transpose(1, 2, 0)
    band = band - _blur(band, 1.5)
    return x + amount * band * (0.3 + edges)[..., None]


def blur(x, t, rng):
    return _blur(x, 0.5 + 3.0 * t)


def motion_blur(x, t, rng):
    return ndimage.uniform_filter1d(x, size=1 + 2 * round(5 * t), axis=1, mode="reflect")


def noise(x, t, rng):
    return x + rng.normal(0.0, 0.01 + 0.12 * t, x.shape).astype(np.float32)


def impulse(x, t, rng):
    hit = rng.random(x.shape[:2]) < 0.01 + 0.12 * t
    salt = rng.random(x.shape[:2]) < 0.5
    return np.where(hit[..., None], salt[..., None].astype(np.float32), x)


def jpeg(x, t, rng):
    return _jpeg(x, round(70 - 65 * t))


def saturation(x, t, rng):
    grey = _luma(x)[..., None]
    return grey + (1.0 - 0.95 * t) * (x - grey)


def contrast(x, t, rng):
    mean = x.mean(axis=(0, 1), keepdims=True)
    return mean + (1.0 - 0.75 * t) * (x - mean)


def colour_cast(x, t, rng):
    direction = rng.normal(0.0, 1.0, 3).astype(np.float32)
    return x + 0.3 * t * direction / np.linalg.norm(direction)


def brightness(x, t, rng):
    return np.clip(x, 0.0, 1.0) ** (1.0 + 2.0 * t)


def pixelate(x, t, rng):
    h, w, _ = x.shape
    f = 1.0 + 7.0 * t
    small = Image.fromarray(to_uint8(x)).resize((max(1, round(w / f)), max(1, round(h / f))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST), dtype=np.float32) / 255.0


def quantise(x, t, rng):
    levels = round(2 + 30 * (1.0 - t) ** 1.5)
    return np.round(np.clip(x, 0.0, 1.0) * (levels - 1)) / (levels - 1)


def oversharpen(x, t, rng):
    return x + (1.0 + 6.0 * t) * (x - _blur(x, 1.0))


def chromatic(x, t, rng):
    k = 0.5 + 3.0 * t
    red = ndimage.shift(x[..., 0], (0, k), order=1, mode="nearest")
    blue = ndimage.shift(x[..., 2], (0, -k), order=1, mode="nearest")
    return np.stack([red, x[..., 1], blue], -1)


def sr_bicubic(x, t, rng):
    h, w, _ = x.shape
    f = 1.5 + 2.5 * t
    return _resize(_resize(x, max(2, round(h / f)), max(2, round(w / f))), h, w)


def gan_texture(x, t, rng):
    return _hallucination(x, rng, 0.05 + 0.35 * t)


def mixed(x, t, rng):
    return _jpeg(noise(_blur(x, 0.3 + 1.5 * t), 0.3 * t, rng), round(85 - 60 * t))


# name -> (function, weight); weight = how much the strongest level lowers quality (0..1)
DISTORTIONS = {
    "blur": (blur, 0.80), "motion_blur": (motion_blur, 0.75), "noise": (noise, 0.85), "impulse": (impulse, 0.80),
    "jpeg": (jpeg, 0.80), "saturation": (saturation, 0.50), "contrast": (contrast, 0.60),
    "colour_cast": (colour_cast, 0.60), "brightness": (brightness, 0.55), "pixelate": (pixelate, 0.85),
    "quantise": (quantise, 0.70), "oversharpen": (oversharpen, 0.55), "chromatic": (chromatic, 0.55),
    "sr_bicubic": (sr_bicubic, 0.75), "gan_texture": (gan_texture, 0.35), "mixed": (mixed, 0.90),
}


def quality(weight: float, sensitivity: float, level: int, levels: int, jitter: float) -> float:
    """Quality in [0, 1] of `level` (1..levels): falls linearly with level; |jitter| < a third of one step."""
    return 1.0 - weight * sensitivity * level / levels + jitter


# ---------------------------------------------------------------------------------------------- layout helpers


def split_references(n: int, rng: np.random.Generator) -> dict[str, list[int]]:
    """Reference indices per split, 7:1:2, at least one reference in each split."""
    if n < 3:
        raise AfineError(f"need at least 3 references to split 7:1:2, got {n}")
    test = max(1, round(0.2 * n))
    val = max(1, round(0.1 * n))
    order = rng.permutation(n)
    return {"Train": sorted(order[val + test:].tolist()), "Validation": sorted(order[:val].tolist()),
            "Test": sorted(order[val:val + test].tolist())}


@dataclass(frozen=True)
class Traditional:
    """Naming and MOS scale of one traditional dataset (file names as in the real sets)."""

    name: str
    ref_format: str  # reference stem from r (1-based)
    dis_format: str  # distorted stem from r, t (type number), l (level number)
    suffix: str
    type_base: int  # number of the first type (PIPAL counts from 00)
    level_base: int
    levels: int
    mos_low: float
    mos_high: float
    digits: int  # MOS decimals
    with_var: bool


TRADITIONAL = {
    "KADID10K": Traditional("KADID10K", "I{r:02d}", "I{r:02d}_{t:02d}_{l:02d}", ".png", 1, 1, 5, 1.0, 5.0, 2, True),
    "PIPAL": Traditional("PIPAL", "A{r:04d}", "A{r:04d}_{t:02d}_{l:02d}", ".bmp", 0, 0, 4, 1000.0, 1700.0, 4, False),
    "TID2013": Traditional("TID2013", "i{r:02d}", "i{r:02d}_{t:02d}_{l}", ".bmp", 1, 1, 5, 0.0, 9.0, 5, False),
}


def _types(scale: Scale, name: str) -> tuple[str, ...]:
    return {"KADID10K": scale.kadid_types, "PIPAL": scale.pipal_types, "TID2013": scale.tid_types}[name]


def _trad_count(scale: Scale, name: str) -> int:
    return scale.references * (1 + len(_types(scale, name)) * TRADITIONAL[name].levels)


def _diffiqa_count(scale: Scale) -> int:
    return scale.diffiqa_references * (1 + 3 * scale.diffiqa_per_class)


def _sizes_text(sizes: set[tuple[int, int]]) -> str:
    return "/".join(f"{h}x{w}" for h, w in sorted(sizes))


# ---------------------------------------------------------------------------------------------- traditional


def build_traditional(root: Path, spec: Traditional, scale: Scale, seed: int, bar: tqdm) -> str:
    """images/ with references and graded distortions; per split MOS/<ref>.txt and Triplet/Triplet.txt."""
    images = root / "images"
    images.mkdir(parents=True)
    types = _types(scale, spec.name)
    records: dict[int, list[MOSRecord]] = {}
    for i in range(scale.references):
        r = i + 1
        h, w = _size(scale, spec.name, i)
        reference = natural_image(_rng(seed, spec.name, 0, i), h, w)
        ref_file = spec.ref_format.format(r=r) + spec.suffix
        save_image(images / ref_file, reference)
        bar.update()
        records[i] = []
        for j, kind in enumerate(types):
            distort, weight = DISTORTIONS[kind]
            labels = _rng(seed, spec.name, 1, i, j)
            sensitivity = labels.uniform(0.9, 1.1)  # how visible this distortion is on this content
            step = weight * sensitivity / spec.levels
            for level in range(1, spec.levels + 1):
                x = distort(reference, level / spec.levels, _rng(seed, spec.name, 2, i, j, level))
                dis_file = spec.dis_format.format(r=r, t=j + spec.type_base, l=level - 1 + spec.level_base)
                save_image(images / (dis_file + spec.suffix), np.clip(x, 0.0, 1.0))
                bar.update()
                q = quality(weight, sensitivity, level, spec.levels, labels.uniform(-step, step) / 3)
                mos = round(spec.mos_low + (spec.mos_high - spec.mos_low) * float(np.clip(q, 0.0, 1.0)), spec.digits)
                var = round(0.15 + 3.6 * q * (1 - q) * labels.uniform(0.5, 1.0), 3) if spec.with_var else None
                records[i].append(MOSRecord(dis_file + spec.suffix, ref_file, mos, var))
    splits = split_references(scale.references, _rng(seed, spec.name, 3))
    counts = []
    for s, split in enumerate(SPLITS):
        for i in splits[split]:
            write_mos(root / split / "MOS" / f"{spec.ref_format.format(r=i + 1)}.txt", records[i])
        split_records = [rec for i in splits[split] for rec in records[i]]
        triplets = nlogn_triplets(split_records, seed=int(_rng(seed, spec.name, 4, s).integers(2**31)))
        write_triplets(root / split / "Triplet" / "Triplet.txt", triplets)
        counts.append(len(triplets))
    sizes = {_size(scale, spec.name, i) for i in range(scale.references)}
    return (f"{spec.name}: {scale.references} references + {scale.references * len(types) * spec.levels} distorted "
            f"({len(types)} types x {spec.levels} levels), {_sizes_text(sizes)}, refs "
            f"{'/'.join(str(len(splits[s])) for s in SPLITS)}, triplets {'/'.join(map(str, counts))} "
            f"(Train/Validation/Test)")


# ---------------------------------------------------------------------------------------------- DiffIQA

CLASS_RANK = {"P": 2, "S": 1, "Y": 1, "N": 0}  # P better than the reference, S similar, N worse


def _label(a: str, b: str) -> float:
    """g for 'a better than b' from the class ranking (1, 0, or 0.5 when equal)."""
    return 1.0 if CLASS_RANK[a] > CLASS_RANK[b] else 0.0 if CLASS_RANK[a] < CLASS_RANK[b] else 0.5


def _degrade(x: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """The restoration-input degradation: blur, then noise, then JPEG, all growing with severity in [0, 1]."""
    x = _blur(x, 0.2 + 1.8 * severity)
    x = x + rng.normal(0.0, 0.06 * severity, x.shape).astype(np.float32)
    return _jpeg(x, round(92 - 70 * severity))


def generated_image(source: np.ndarray, reference: np.ndarray, cls: str, severity: float,
                    rng: np.random.Generator) -> np.ndarray:
    """A 'diffusion output' of class P (better than the reference at `severity`), S (similar) or N (worse).

    Half the N images are the reference itself, blurred further and overlaid with hallucinated texture:
    they stay close to the reference pixel for pixel, so fidelity alone ranks them above P and S images,
    which differ from the reference everywhere (new noise, restored detail). Only naturalness tells.
    """
    if cls == "P":
        x = _degrade(source, max(0.0, severity - rng.uniform(0.3, 0.4)), rng)
        return _hallucination(x, rng, 0.02)
    if cls == "S":
        return _hallucination(_degrade(source, severity + rng.uniform(-0.03, 0.03), rng), rng, 0.03)
    if rng.random() < 0.5:
        return _hallucination(_blur(reference, rng.uniform(1.0, 1.5)), rng, rng.uniform(0.05, 0.08))
    x = _degrade(source, min(1.0, severity + rng.uniform(0.25, 0.35)), rng)
    return _hallucination(x, rng, 0.15)


def diffiqa_triplets(ref: str, members: list[tuple[str, str]], rng: np.random.Generator | None
                     ) -> dict[str, list[Triplet]]:
    """Labelled pairs of one reference's generated images (name, class): the five type lists (4 columns)
    and, for `rng` given, the Train list (6 columns: cross-class pairs and each image vs the reference,
    order randomised)."""
    by_class = {c: [n for n, k in members if k == c] for c in "PSN"}
    lists = {t: [Triplet(a, b, ref, _label(t[0], t[1])) for a in by_class[t[0]] for b in by_class[t[1]]]
             for t in ("PSY", "PNY", "SNY")}
    lists["PYY"] = [Triplet(a, ref, ref, _label("P", "Y")) for a in by_class["P"]]
    lists["NYY"] = [Triplet(a, ref, ref, _label("N", "Y")) for a in by_class["N"]]
    if rng is not None:
        cls = dict(members) | {ref: "Y"}
        pairs = [(a, b) for (a, ka), (b, kb) in itertools.combinations(members, 2) if ka != kb]
        pairs += [(a, ref) for a, _ in members]
        train = []
        for a, b in pairs:
            if rng.random() < 0.5:
                a, b = b, a
            train.append(Triplet(a, b, ref, _label(cls[a], cls[b]), _label(cls[a], "Y"), _label(cls[b], "Y")))
        lists["Train"] = train
    return lists


def build_diffiqa(root: Path, scale: Scale, seed: int, bar: tqdm) -> str:
    """Train/Validation/Test, each with images/Original/<stem>.png and images/<NN>/<stem>_<NN>.png."""
    name = "DiffIQA"
    splits = split_references(scale.diffiqa_references, _rng(seed, name, 3))
    n_generated = 3 * scale.diffiqa_per_class
    counts = {}
    for split in SPLITS:
        images = root / split / "images"
        (images / "Original").mkdir(parents=True)
        for nn in range(1, n_generated + 1):
            (images / f"{nn:02d}").mkdir()
        lists: dict[str, list[Triplet]] = {t: [] for t in (*DIFFIQA_TYPES, "Train")}
        for i in splits[split]:
            stem = f"{i + 1:05d}"
            h, w = _size(scale, name, i)
            source = natural_image(_rng(seed, name, 0, i), h, w)
            rng = _rng(seed, name, 1, i)
            severity = rng.uniform(0.4, 0.6)
            reference = _degrade(source, severity, rng)
            save_image(images / "Original" / f"{stem}.png", reference)
            bar.update()
            classes = rng.permutation(np.repeat(np.array(list("PSN")), scale.diffiqa_per_class))
            members = []
            for nn, cls in enumerate(classes.tolist(), 1):
                x = generated_image(source, reference, cls, severity, _rng(seed, name, 2, i, nn))
                save_image(images / f"{nn:02d}" / f"{stem}_{nn:02d}.png", np.clip(x, 0.0, 1.0))
                bar.update()
                members.append((f"{stem}_{nn:02d}.png", cls))
            for t, triplets in diffiqa_triplets(f"{stem}.png", members, rng if split == "Train" else None).items():
                lists[t] += triplets
        labels = root / split / "trainlabel" if split == "Train" else root / split
        for t in DIFFIQA_TYPES:
            write_triplets(labels / "TripletEachType" / f"{t}.txt", lists[t])
        if split == "Train":
            write_triplets(labels / "Triplet" / "Triplet.txt", lists["Train"])
            counts["Train"] = len(lists["Train"])
        counts[split + " types"] = sum(len(lists[t]) for t in DIFFIQA_TYPES)
    sizes = {_size(scale, name, i) for i in range(scale.diffiqa_references)}
    return (f"{name}: {scale.diffiqa_references} references + {scale.diffiqa_references * n_generated} generated "
            f"({scale.diffiqa_per_class} each P/S/N per reference), {_sizes_text(sizes)}, refs "
            f"{'/'.join(str(len(splits[s])) for s in SPLITS)}, Train triplets {counts['Train']}, per-type pairs "
            f"{counts['Validation types']}/{counts['Test types']} (Validation/Test)")


# ---------------------------------------------------------------------------------------------- SRIQA-Bench

# (method, folder, generative, detail recovered r, artefact level a); degradation = 0.6 (1 - r) + 0.5 a
SR_METHODS = (
    ("Bicubic", "Bicubic", False, 0.0, 0.0), ("SRCNN", "SRCNN", False, 0.2, 0.0), ("EDSR", "EDSR", False, 0.45, 0.0),
    ("RCAN", "RCAN", False, 0.5, 0.0), ("SwinIR", "SwinIR", False, 0.6, 0.0),
    ("ESRGAN", "ESRGAN", True, 0.85, 0.35), ("RealESRGAN", "Real-ESRGAN", True, 0.75, 0.2),
    ("BSRGAN", "BSRGAN", True, 0.7, 0.25), ("LDL", "LDL", True, 0.85, 0.15), ("StableSR", "StableSR", True, 0.9, 0.3),
)


def super_resolve(original: np.ndarray, clean: np.ndarray, detail: float, artefacts: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Simulated x4 SR of the photo `original`: bicubic upsampling of its 4x4-mean downsampling, blended by
    `detail` towards the `clean` scene (restored detail, free of the photo's flaws), plus hallucinated
    texture scaled by `artefacts`."""
    h, w, _ = original.shape
    low = original.reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3))
    x = (1.0 - detail) * _resize(low, h, w) + detail * clean
    if artefacts > 0:
        x = _hallucination(x, rng, 0.4 * artefacts)
    return np.clip(x, 0.0, 1.0)


def build_sriqa(root: Path, scale: Scale, seed: int, bar: tqdm) -> str:
    """images/<folder>/<scene>_<Method>x4.png, images/Original/<scene>_Original.png, MOS, MOS_Reg, MOS_Gen.

    As in the real benchmark, the Original is a photo with flaws of its own (blur, noise, JPEG at a
    per-scene severity), so the better SR results outscore it: MOS = 100 (1 - degradation) with the
    Original's degradation 0.7 x severity, each SR result's 0.6 (1 - r) + 0.5 a, plus a small jitter.
    """
    name = "SRIQA-Bench"
    for folder in ["Original"] + [m[1] for m in SR_METHODS]:
        (root / "images" / folder).mkdir(parents=True)
    for sub in ("MOS", "MOS_Reg", "MOS_Gen"):
        (root / sub).mkdir()
    for i in range(scale.sriqa_scenes):
        scene = f"{i + 1:04d}"
        h, w = _size(scale, name, i)
        clean = natural_image(_rng(seed, name, 0, i), h, w)
        rng = _rng(seed, name, 1, i)
        severity = rng.uniform(0.15, 0.45)
        original = _degrade(clean, severity, rng)  # decoded JPEG: already in [0, 1]
        save_image(root / "images" / "Original" / f"{scene}_Original.png", original)
        bar.update()
        mos = 100.0 * (1.0 - 0.7 * severity) + rng.normal(0.0, 1.5)
        scores = [(f"{scene}_Original.png", round(float(np.clip(mos, 0.0, 100.0)), 2), None)]
        for m, (method, folder, generative, detail, artefacts) in enumerate(SR_METHODS):
            detail = float(np.clip(detail + rng.uniform(-0.06, 0.06), 0.0, 1.0))
            artefacts = float(np.clip(artefacts + rng.uniform(-0.05, 0.05), 0.0, 1.0)) if generative else 0.0
            x = super_resolve(original, clean, detail, artefacts, _rng(seed, name, 2, i, m))
            file = f"{scene}_{method}x4.png"
            save_image(root / "images" / folder / file, x)
            bar.update()
            mos = 100.0 * (1.0 - 0.6 * (1.0 - detail) - 0.5 * artefacts) + rng.normal(0.0, 1.5)
            scores.append((file, round(float(np.clip(mos, 0.0, 100.0)), 2), generative))
        order = rng.permutation(len(scores))
        scores = [scores[k] for k in order]
        # MOS/ uses 'name,score' lines, MOS_Reg/ and MOS_Gen/ 'name score' lines (both forms occur in releases)
        (root / "MOS" / f"{scene}.txt").write_text("".join(f"{f},{v}\n" for f, v, _ in scores))
        for sub, keep in (("MOS_Reg", False), ("MOS_Gen", True)):
            lines = "".join(f"{f} {v}\n" for f, v, g in scores if g is None or g == keep)
            (root / sub / f"{scene}.txt").write_text(lines)
    sizes = {_size(scale, name, i) for i in range(scale.sriqa_scenes)}
    return (f"{name}: {scale.sriqa_scenes} scenes x 11 images (5 regression + 5 generative x4 SR methods + "
            f"original), {_sizes_text(sizes)}")


# ---------------------------------------------------------------------------------------------- driver


def build(out: str | Path, seed: int = 0, scale: str = "small", progress: bool = True) -> list[str]:
    """Write the five datasets under `out`; returns one summary line per dataset.

    Each dataset is built in a hidden `.<name>.partial` folder and renamed into place when complete,
    so an interrupted run never leaves a half-written dataset under its real name.
    """
    if scale not in SCALES:
        raise AfineError(f"--scale: unknown scale {scale!r}; expected one of {', '.join(SCALES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise AfineError(f"--seed: must be a non-negative integer, got {seed!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AfineError(f"{out}: exists and is not a folder")
    for name in DATASETS:
        if (out / name).exists():
            raise AfineError(f"{out / name}: already exists; choose a new --out folder or remove it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AfineError(f"{out}: cannot create folder ({e.strerror})") from None
    cfg = SCALES[scale]
    total = sum(_trad_count(cfg, n) for n in TRADITIONAL) + _diffiqa_count(cfg) + 11 * cfg.sriqa_scenes
    summaries = []
    with tqdm(total=total, unit="img", desc="synth", file=sys.stderr, disable=not progress, leave=False) as bar:
        for name in DATASETS:
            bar.set_description(name)
            start = time.perf_counter()
            partial = out / f".{name}.partial"
            if partial.exists():
                shutil.rmtree(partial)  # left by an interrupted run of ours
            if name in TRADITIONAL:
                line = build_traditional(partial, TRADITIONAL[name], cfg, seed, bar)
            elif name == "DiffIQA":
                line = build_diffiqa(partial, cfg, seed, bar)
            else:
                line = build_sriqa(partial, cfg, seed, bar)
            os.replace(partial, out / name)
            summaries.append(f"{line}; {time.perf_counter() - start:.1f} s")
    return summaries


def generate(out: Path, seed: int = 0, scale: str = "small", progress: bool = True) -> None:
    """Write the synthetic corpus (all five datasets) under `out`; same seed -> byte-identical files."""
    build(out, seed, scale, progress)


@command
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m afine.synth",
                            description="Write a synthetic IQA corpus (KADID10K, PIPAL, TID2013, DiffIQA, "
                                        "SRIQA-Bench) in the official layouts.")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the five datasets into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    parser.add_argument("--scale", default="small", help="small (seconds, ~64-96 px), demo (small with three times "
                        "the references) or medium (larger, more)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summaries = build(args.out, args.seed, args.scale)
    print(f"wrote synthetic corpus (scale {args.scale}, seed {args.seed}) to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    for line in summaries:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
