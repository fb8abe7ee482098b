"""A-FINE terms against an independent, direct implementation of the SPEC formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from afine.checkpoint import build_clip, read_afine_parts, read_clip_file, save_afine
from afine.clip import resize_positional_embedding
from afine.image import load_image, preprocess
from afine.mapping import final_scale, logistic
from afine.model import TERMS, load_afine
from tests.tiny import random_afine, tiny_clip, write_checkpoints

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


# ---------------------------------------------------------------- reference implementation (SPEC, from raw tensors)
def ref_layer_norm(x, sd, prefix):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def ref_block(x, sd, p, heads):
    h = ref_layer_norm(x, sd, p + "ln_1")
    w, b = sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"]
    width = x.shape[-1]
    q, k, v = (h @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
    d = width // heads
    outs = []
    for j in range(heads):
        qj, kj, vj = (t[..., j * d:(j + 1) * d] for t in (q, k, v))
        att = torch.softmax(qj @ kj.transpose(-1, -2) / math.sqrt(d), dim=-1)
        outs.append(att @ vj)
    x = x + torch.cat(outs, -1) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = ref_layer_norm(x, sd, p + "ln_2")
    h = h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def ref_clip_features(img01, sd):
    """SPEC 2-3: normalise, resize to multiples of 32, ViT with A-FINE's positional rule, 12 patch-token outputs."""
    x = (img01 - MEAN) / STD
    h, w = x.shape[-2:]
    th, tw = math.ceil(h / 32) * 32, math.ceil(w / 32) * 32
    if (th, tw) != (h, w):
        x = F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False)
    conv = sd["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    tokens = F.conv2d(x, conv, stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].view(1, 1, -1).expand(x.shape[0], 1, width)
    tokens = torch.cat([cls, tokens], 1)
    pos = sd["visual.positional_embedding"]
    pos = F.interpolate(pos[None, None], size=(tokens.shape[1], width), mode="bicubic", align_corners=False)[0, 0]
    tokens = ref_layer_norm(tokens + pos, sd, "visual.ln_pre")
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    feats = []
    for i in range(layers):
        tokens = ref_block(tokens, sd, f"visual.transformer.resblocks.{i}.", width // 64)
        feats.append(tokens[:, 1:])
    return x, feats


def ref_levels(x, feats, mean, std):
    pixels = (x * std + mean).flatten(2).transpose(1, 2)
    return [pixels] + [torch.relu(f) for f in feats]


def ref_natural(x, feats, sd):
    levels = ref_levels(x, feats, sd["mean"], sd["std"])
    pooled = []
    for i, t in enumerate(levels):
        m = t.mean(1)
        v = ((t - m[:, None]) ** 2).mean(1)
        s = torch.cat([m, v], 1)
        pooled.append(s if i == 0 else s @ sd["proj_feat.weight"].T + sd["proj_feat.bias"])
    h = torch.cat(pooled, 1) @ sd["proj_head.0.weight"].T + sd["proj_head.0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return (h @ sd["proj_head.2.weight"].T + sd["proj_head.2.bias"])[:, 0]


def ref_fidelity(x, fx, y, fy, sd):
    lx, ly = ref_levels(x, fx, sd["mean"], sd["std"]), ref_levels(y, fy, sd["mean"], sd["std"])
    a, b = torch.log1p(torch.exp(sd["alpha"])), torch.log1p(torch.exp(sd["beta"]))
    total = a.sum() + b.sum() + 1e-10
    a, b = (a / total).flatten(), (b / total).flatten()
    score, start = 1.0, 0
    c = 1e-10
    for tx, ty in zip(lx, ly):
        n = tx.shape[-1]
        mx, my = tx.mean(1), ty.mean(1)
        vx, vy = ((tx - mx[:, None]) ** 2).mean(1), ((ty - my[:, None]) ** 2).mean(1)
        cov = (tx * ty).mean(1) - mx * my
        s1 = (2 * mx * my + c) / (mx**2 + my**2 + c)
        s2 = (2 * cov + c) / (vx + vy + c)
        score = score - (s1 * a[start:start + n] + s2 * b[start:start + n]).sum(1)
        start += n
    return score


def ref_logistic(x, e1, e2, e3, e4):
    return (e1 - e2) / (1 + torch.exp(-(x - e3) / (abs(e4) + 1e-10))) + e2


def ref_afine(dis, ref, parts):
    """SPEC 1: all five terms from the released parts' raw state dicts."""
    clip = {k: v.float() for k, v in parts["finetuned_clip"].items()}
    xd, fd = ref_clip_features(dis, clip)
    xr, fr = ref_clip_features(ref, clip)
    nd, nr = ref_natural(xd, fd, parts["natural"]), ref_natural(xr, fr, parts["natural"])
    f = ref_fidelity(xd, fd, xr, fr, parts["fidelity"])
    ns, fs, ad = parts["natural_scale"], parts["fidelity_scale"], parts["adapter"]
    nd_m = ref_logistic(nd, 2, -2, ns["yita3"], ns["yita4"])
    nr_m = ref_logistic(nr, 2, -2, ns["yita3"], ns["yita4"])
    f_m = ref_logistic(f, 2, -2, fs["yita3"].clamp(0.05, 0.95), fs["yita4"].clamp(0.01, 0.70))
    k = torch.log1p(torch.exp(ad["k"]))
    d = f_m + torch.exp(k * (nr_m - nd_m)) * nd_m
    scaled = 100 / (1 + torch.exp(-(d - (-1.9710)) / 2.3734))
    return {"afine_all_scale": scaled, "afine_all": d, "afine_fr": f_m, "afine_nr": nd_m, "afine_nr_ref": nr_m}


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return write_checkpoints(folder, random_afine(tiny_clip(seed=0)))


def pair(h, w, b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(1, 3, h, w, generator=g)
    dis = (ref + 0.15 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return dis, ref


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("size", [(64, 96), (70, 50), (32, 224)])
def test_terms_match_spec_formulas(checkpoints, size):
    model = load_afine(checkpoints["afine"])
    parts, _ = read_afine_parts(checkpoints["afine"])
    dis, ref = pair(*size, b=2)
    with torch.no_grad():
        ours = model(dis, ref)
        expected = ref_afine(dis, ref.expand(2, -1, -1, -1), parts)
    for term in TERMS:
        assert ours[term].shape == (2,)
        torch.testing.assert_close(ours[term], expected[term], rtol=1e-4, atol=1e-4 if term == TERMS[0] else 1e-5)
    assert not torch.allclose(ours["afine_all"][0], ours["afine_all"][1])


def test_torchscript_clip_with_folder_of_files(checkpoints, tmp_path):
    """OpenAI's float16 TorchScript archive as CLIP, heads from BasicSR files, no fine-tuned CLIP in the folder."""
    import shutil

    folder = tmp_path / "heads"
    shutil.copytree(checkpoints["folder"], folder)
    (folder / "clip_model.pth").unlink()
    model = load_afine(folder, clip=checkpoints["clip_ts"])
    parts, _ = read_afine_parts(checkpoints["afine"])
    parts["finetuned_clip"] = {k: v.half().float() for k, v in parts["finetuned_clip"].items()}
    dis, ref = pair(64, 64, b=3, seed=1)
    with torch.no_grad():
        ours = model(dis, ref)
    expected = ref_afine(dis, ref.expand(3, -1, -1, -1), parts)
    for term in TERMS:
        torch.testing.assert_close(ours[term], expected[term], rtol=1e-4, atol=1e-4 if term == TERMS[0] else 1e-5)


def test_clip_file_formats_load_same_weights(checkpoints):
    plain, archive = (build_clip(read_clip_file(checkpoints[k]), k) for k in ("clip_plain", "clip_ts"))
    sp, sa = plain.state_dict(), archive.state_dict()
    assert set(sp) == set(sa)
    assert "token_embedding.weight" in sp and "logit_scale" in sp and "input_resolution" not in sa
    for k in sp:
        assert sa[k].dtype == torch.float32
        torch.testing.assert_close(sa[k], sp[k].half().float(), rtol=0, atol=0)


def test_folder_of_files_equals_merged(checkpoints):
    a, b = load_afine(checkpoints["afine"]), load_afine(checkpoints["folder"])
    dis, ref = pair(64, 64, b=2)
    with torch.no_grad():
        ta, tb = a(dis, ref), b(dis, ref)
    for term in TERMS:
        assert torch.equal(ta[term], tb[term])


def test_afine_pth_round_trip(checkpoints, tmp_path):
    parts, _ = read_afine_parts(checkpoints["afine"])
    model = load_afine(checkpoints["afine"], text_tower=True)
    save_afine(tmp_path / "again.pth", model.parts())
    raw_a = torch.load(checkpoints["afine"], weights_only=True)
    raw_b = torch.load(tmp_path / "again.pth", weights_only=True)
    assert list(raw_a) == list(raw_b) == ["finetuned_clip", "natural", "fidelity", "fidelity_scale",
                                          "natural_scale", "adapter"]
    for part in raw_a:
        assert set(raw_a[part]) == set(raw_b[part])
        for key in raw_a[part]:
            assert torch.equal(raw_a[part][key], raw_b[part][key]), (part, key)
    for key in ("yita3", "yita4"):
        assert raw_a["natural_scale"][key].shape == () and raw_a["natural_scale"][key].dtype == torch.float32
    assert set(raw_a["natural"]) == {"mean", "std", "proj_feat.weight", "proj_feat.bias", "proj_head.0.weight",
                                     "proj_head.0.bias", "proj_head.2.weight", "proj_head.2.bias"}
    assert set(raw_a["fidelity"]) == {"alpha", "beta", "mean", "std"}
    assert set(raw_a["adapter"]) == {"k"}


def test_batch_invariance(checkpoints):
    model = load_afine(checkpoints["afine"])
    dis, ref = pair(64, 96, b=8, seed=3)
    refs = torch.rand(8, 3, 64, 96)
    with torch.no_grad():
        shared = model(dis, ref)
        own = model(dis, refs)
        for i in (0, 5):
            alone = model(dis[i:i + 1], ref)
            alone_own = model(dis[i:i + 1], refs[i:i + 1])
            for term in TERMS:
                torch.testing.assert_close(alone[term][0], shared[term][i], rtol=0, atol=1e-5)
                torch.testing.assert_close(alone_own[term][0], own[term][i], rtol=0, atol=1e-5)


def test_asymmetric_and_identity(checkpoints):
    model = load_afine(checkpoints["afine"])
    dis, ref = pair(64, 64, b=1, seed=4)
    with torch.no_grad():
        forward, backward, same = model(dis, ref), model(ref, dis), model(ref, ref)
    assert not torch.allclose(forward["afine_all"], backward["afine_all"])
    # F_raw is about 0 when dis == ref; the mapped value is then the FR mapping at 0.
    f_raw0 = torch.zeros(1)
    torch.testing.assert_close(same["afine_fr"], model.fidelity_scale(f_raw0), rtol=0, atol=1e-5)
    torch.testing.assert_close(same["afine_nr"], same["afine_nr_ref"])


def test_multiple_of_32_not_resized_and_others_resized():
    x = torch.rand(1, 3, 64, 96)
    assert torch.equal(preprocess(x), (x - MEAN) / STD)
    assert preprocess(torch.rand(2, 3, 70, 33)).shape == (2, 3, 96, 64)


def test_positional_table_rule():
    table = torch.randn(50, 768)
    assert torch.equal(resize_positional_embedding(table, 50), table)
    resized = resize_positional_embedding(table, 13)
    assert resized.shape == (13, 768)
    # Columns are independent: resampling happens along the token axis only.
    col = F.interpolate(table[None, None, :, 7:8], size=(13, 1), mode="bicubic", align_corners=False)[0, 0, :, 0]
    torch.testing.assert_close(resized[:, 7], col)


def test_logistic_stable_for_any_batch_and_magnitude():
    x = torch.tensor([-1e30, -50.0, 0.0, 3.0, 1e30])
    y = logistic(x, 2.0, -2.0, 0.5, 0.15)
    assert torch.isfinite(y).all()
    assert y[0] == -2 and y[-1] == 2
    torch.testing.assert_close(y[2:4], ref_logistic(x[2:4], 2, -2, 0.5, 0.15))
    one = logistic(x[3:4], 2.0, -2.0, 0.5, 0.15)
    assert one.item() == y[3].item()
    torch.testing.assert_close(final_scale(torch.tensor([-1.9710])), torch.tensor([50.0]))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA"])
def test_grey_palette_rgba_images_decode_to_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = Image.fromarray(rgb)
    if mode == "L":
        img = img.convert("L")
        expected = np.repeat(np.asarray(img)[..., None], 3, axis=2)
    elif mode == "P":
        img = img.convert("P")
        expected = np.asarray(img.convert("RGB"))
    elif mode == "RGBA":
        alpha = rng.integers(0, 256, (20, 30, 1), dtype=np.uint8)
        img = Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA")
        expected = rgb
    else:
        img = img.convert("LA")
        expected = np.repeat(np.asarray(img)[..., :1], 3, axis=2)
    img.save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png")
    assert x.shape == (3, 20, 30) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().byte().permute(1, 2, 0), torch.from_numpy(np.array(expected)))
