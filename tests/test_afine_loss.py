"""AFINELoss: the scoring values, correct and finite gradients to the output only, a frozen model, state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from afine import AFINELoss, fidelity
from afine.afine_loss import GRADIENTS
from afine.errors import AfineError
from afine.fidelity import FidelityHead, similarity
from tests.test_model import pair
from tests.tiny import random_afine, tiny_clip, write_checkpoints

TERMS = ("afine_all", "afine_all_scale", "afine_fr", "afine_nr")


@pytest.fixture(scope="module")
def model():
    """The tiny random A-FINE, its NR mapping moved to where the tiny CLIP's raw N lies (about 8..20), so that
    afine_nr is not saturated and its gradient is not zero."""
    model = random_afine(tiny_clip(seed=0))
    with torch.no_grad():
        model.natural_scale.yita3.fill_(12.0)
        model.natural_scale.yita4.fill_(4.0)
    return model


def grad_of(criterion: AFINELoss, output: torch.Tensor, reference: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(loss, d loss / d output) for a copy of `output`."""
    output = output.detach().clone().requires_grad_(True)
    loss = criterion(output, reference)
    loss.sum().backward()
    return loss.detach(), output.grad


@pytest.mark.parametrize("size", [(64, 48), (32, 32)])
def test_values_are_the_scoring_values(model, size):
    dis, ref = pair(*size, b=2, seed=1)
    refs = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shared, own = model(dis, ref), model(dis, refs)
    for term in TERMS:
        for reference, scores in ((ref, shared), (refs, own)):
            values = AFINELoss(model, term, reduction="none")(dis, reference)
            assert values.shape == (2,)
            torch.testing.assert_close(values, scores[term], rtol=1e-5, atol=1e-5)
            for reduction, expected in (("mean", scores[term].mean()), ("sum", scores[term].sum())):
                value = AFINELoss(model, term, reduction=reduction)(dis, reference)
                torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shared["afine_nr"][0], shared["afine_nr"][1])  # the NR term is not saturated


def directional_derivatives(criterion: AFINELoss, dis: torch.Tensor, ref: torch.Tensor, seed: int, h: float = 1e-6):
    """[(analytic, central finite difference)] of the loss along two random directions (float64)."""
    g = torch.Generator().manual_seed(seed)
    _, grad = grad_of(criterion, dis, ref)
    pairs = []
    for _ in range(2):
        direction = torch.randn(dis.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            numeric = (criterion(dis + h * direction, ref) - criterion(dis - h * direction, ref)) / (2 * h)
        pairs.append(((grad * direction).sum(), numeric))
    return pairs


@pytest.mark.parametrize("term, gradient", [(term, "stable with GRAD_C = C") for term in TERMS] +
                         [(term, "exact") for term in TERMS if term != "afine_nr"])  # afine_nr has no S1, S2
def test_gradient_agrees_with_finite_differences(model, term, gradient, monkeypatch):
    """float64, 64x48 (resized to 64x64, so the bicubic resize is differentiated too). gradient="exact" is the
    gradient of the published formulas. With the gradient twin's c set to the published c, the twin is the same
    function as the published S1, S2 (the covariance centred before or after the product is the same number in
    exact arithmetic): its gradient is the exact one too."""
    if gradient != "exact":
        monkeypatch.setattr(fidelity, "GRAD_C", fidelity.C)
    criterion = AFINELoss(copy.deepcopy(model).double(), term, reduction="sum", gradient=gradient.split()[0])
    dis, ref = (t.double() for t in pair(64, 48, b=2, seed=4))
    for analytic, numeric in directional_derivatives(criterion, dis, ref, seed=3):
        assert abs(analytic) > 1e-3
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=0)


def near_flat_pair(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat reference and an output off it by noise of std 1e-4 (pixel variance 1e-8, between c = 1e-10 and
    the twin's 1e-6): there the exact and the stable gradients differ, and both are well-conditioned in float64."""
    ref = torch.full((1, 3, 64, 48), 0.37, dtype=dtype)
    noise = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(21), dtype=dtype)
    return ref + 1e-4 * noise, ref


@pytest.mark.parametrize("term", ["afine_fr", "afine_all"])
def test_exact_gradient_is_autograd_through_the_published_formulas(model, term):
    """gradient="exact": the gradient of scoring's own forward (model(dis, ref), the published S1, S2 of all
    levels at once), and the same values as gradient="stable", bit for bit; the stable one differs here."""
    model64 = copy.deepcopy(model).double()
    grads = {}
    for dis, ref in (near_flat_pair(), tuple(t.double() for t in pair(64, 48, b=2, seed=22))):
        published = dis.clone().requires_grad_(True)
        model64(published, ref)[term].sum().backward()
        values = {}
        for gradient in ("exact", "stable"):
            values[gradient], grads[gradient] = grad_of(AFINELoss(model64, term, "sum", gradient=gradient), dis, ref)
        assert torch.equal(values["exact"], values["stable"])
        torch.testing.assert_close(grads["exact"], published.grad, rtol=1e-7, atol=1e-9 * published.grad.abs().max())
    dis, ref = near_flat_pair()  # the option matters: there the twin's gradient is far from the exact one
    cosine = torch.nn.functional.cosine_similarity(*(grad_of(AFINELoss(model64, term, "sum", gradient=gradient),
                                                             dis, ref)[1].flatten() for gradient in GRADIENTS), dim=0)
    assert cosine < 0.99


def test_exact_gradient_agrees_with_finite_differences_near_flat(model):
    """Where exact and stable differ (near_flat_pair), the exact gradient is the finite difference's; the stable
    one is not (so that this test sees which one the loss returns). The variances there are 1e-8, computed from
    pixels of 0.37 to about 1e-9 relative even in float64: the finite difference is good to about 1e-4."""
    dis, ref = near_flat_pair()
    for gradient in GRADIENTS:
        criterion = AFINELoss(copy.deepcopy(model).double(), "afine_fr", reduction="sum", gradient=gradient)
        for analytic, numeric in directional_derivatives(criterion, dis, ref, seed=23, h=1e-7):
            if gradient == "exact":
                torch.testing.assert_close(analytic, numeric, rtol=1e-3, atol=0)
            else:
                assert abs(analytic) < abs(numeric) / 2


def test_gradient_twin_keeps_values_and_changes_only_near_constant_channels():
    """Values bit for bit; on channels of variance >> 1e-6 the gradient is the exact one; on near-constant
    channels it is bounded instead of growing to 1/sqrt(c) scale or with rounding noise / c."""
    g = torch.Generator().manual_seed(5)
    tokens = 64
    x, y = torch.randn(2, tokens, 6, generator=g, dtype=torch.float64).unbind(0)  # channels 0-1: ordinary
    y[:, 2], x[:, 2] = -1.0, -1.0  # channel 2: off (all zero after the ReLU) in y, one token barely on in x
    x[3, 2] = 3e-5
    y[:, 3], x[:, 3] = 1.3, 1.3  # channels 3-5: constant in y, x = the same constant + tiny noise (rounding in cov)
    x[:, 3] += 1e-6 * torch.randn(tokens, generator=g, dtype=torch.float64)
    y[:, 4], x[:, 4] = 33.3, 33.3 + 1e-6 * torch.randn(tokens, generator=g, dtype=torch.float64)
    y[:, 5], x[:, 5] = 0.37, 0.37 + 1e-5 * torch.randn(tokens, generator=g, dtype=torch.float64)
    x, y = x.float().relu().requires_grad_(True), y.float().relu()
    published = similarity(x, y)
    twin = similarity(x, y, stable_gradient=True)
    for p, t in zip(published, twin):
        assert torch.equal(p, t)
    exact = torch.autograd.grad(published[0].sum() + published[1].sum(), x)[0]
    stable = torch.autograd.grad(twin[0].sum() + twin[1].sum(), x)[0]
    ordinary = exact[:, :2].abs().max()
    torch.testing.assert_close(stable[:, :2], exact[:, :2], rtol=0, atol=1e-5 * ordinary)  # float32 rounding
    assert exact[:, 2:].abs().max() > 1e3 * ordinary  # what the twin is for
    bound = 2 / (tokens * fidelity.GRAD_C) ** 0.5  # |dS/dx| <= 2 / sqrt(T (vx + vy + c)) for |S| <= 1
    assert stable[:, 2:].abs().max() <= 2 * bound
    assert torch.isfinite(stable).all()


def test_gradient_twin_uses_its_own_c_where_a_channel_is_off_in_the_reference():
    """The twin's gradient against its formulas differentiated by hand, with c = GRAD_C, in float64: channel 0 is
    all zero in the reference (a ReLU'd channel that is off) and has one test token set so that mx = sqrt(C / 3),
    where dS1/dmx with the published c peaks (about 0.65 / sqrt(C), against 2 mx / GRAD_C with the twin's);
    channel 1 is ordinary."""
    tokens = 50
    g = torch.Generator().manual_seed(24)
    x, y = torch.rand(2, tokens, 2, generator=g, dtype=torch.float64).unbind(0)
    y[:, 0], x[:, 0] = 0.0, 0.0
    x[7, 0] = tokens * (fidelity.C / 3) ** 0.5
    x.requires_grad_(True)
    s1, s2 = similarity(x, y, stable_gradient=True)
    grad_s1, = torch.autograd.grad(s1.sum(), x, retain_graph=True)
    grad_s2, = torch.autograd.grad(s2.sum(), x)
    x = x.detach()
    c = fidelity.GRAD_C
    vx, mx = torch.var_mean(x, dim=0, correction=0)
    vy, my = torch.var_mean(y, dim=0, correction=0)
    cov = ((x - mx) * (y - my)).mean(dim=0)
    num1, den1 = 2 * mx * my + c, mx**2 + my**2 + c  # dmx/dx_i = 1/T for every token i
    expected_s1 = ((2 * my * den1 - num1 * 2 * mx) / den1**2 / tokens).expand(tokens, 2)
    num2, den2 = 2 * cov + c, vx + vy + c  # dcov/dx_i = (y_i - my) / T, dvx/dx_i = 2 (x_i - mx) / T
    expected_s2 = (2 * (y - my) * den2 - num2 * 2 * (x - mx)) / den2**2 / tokens
    assert mx[0].item() == pytest.approx((fidelity.C / 3) ** 0.5)
    torch.testing.assert_close(grad_s1, expected_s1, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad_s2, expected_s2, rtol=1e-9, atol=1e-12 * expected_s2.abs().max())


@pytest.mark.parametrize("stable_gradient", [True, False])
@pytest.mark.parametrize("ref_batch", [2, 1])
def test_level_by_level_similarities_are_the_published_values(ref_batch, stable_gradient):
    """The loss path computes S1, S2 one CLIP level at a time (less memory): the same numbers, bit for bit,
    and, for the exact gradient, the same gradient as all levels at once."""
    head = FidelityHead(width=8, layers=3)
    g = torch.Generator().manual_seed(17)
    x, fx = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 4, 8, generator=g).requires_grad_(True)
    y, fy = torch.randn(ref_batch, 3, 32, 32, generator=g), torch.randn(ref_batch, 3, 4, 8, generator=g)
    levels = head.similarities(x, fx, y, fy, stable_gradient=stable_gradient, by_level=True)
    published = head.similarities(x, fx, y, fy)
    for p, level in zip(published, levels):
        assert p.shape == (2, 3 + 3 * 8) and torch.equal(p, level)
    if not stable_gradient:
        grad_levels, = torch.autograd.grad(sum(s.sum() for s in levels), fx)
        grad_published, = torch.autograd.grad(sum(s.sum() for s in published), fx)
        torch.testing.assert_close(grad_levels, grad_published, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("flat", [0.37, 0.5, 1.0])
def test_near_flat_output_gets_gradients_of_the_usual_size(model, flat):
    """A flat reference and an output off it by 1e-5: before the gradient twin, rounding noise in the covariance
    divided by c gave gradients thousands of times those of an ordinary pair."""
    criterion = AFINELoss(model, "afine_fr")
    dis, ref = pair(64, 64, seed=6)
    _, ordinary = grad_of(criterion, dis, ref)
    ref = torch.full((1, 3, 64, 64), flat)
    dis = ref + 1e-5 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(7))
    _, near_flat = grad_of(criterion, dis, ref)
    assert near_flat.abs().max() < 10 * ordinary.abs().max()


def extreme_d_model(model, dis: torch.Tensor, ref: torch.Tensor, small: bool):
    """A copy of `model` whose D for (dis, ref) is about -1e13 (small) or 1e5 (large): a steep NR mapping with
    N(ref) near 2, N(dis) near -2 or a little above 0, and a large adapter k."""
    extreme = copy.deepcopy(model)
    with torch.no_grad():
        n_dis, n_ref = extreme.natural(*extreme.encode(torch.cat([dis, ref])))
        assert n_ref > n_dis
        spread = (n_ref - n_dis) / 8
        extreme.natural_scale.yita3.fill_((n_dis + n_ref) / 2 if small else n_dis - spread / 5)
        extreme.natural_scale.yita4.fill_(spread)
        extreme.adapter.k.fill_(8.0)
        d = extreme(dis, ref)["afine_all"]
    assert (d < -1e12) if small else (d > 1e4), d
    return extreme


def finite_gradient_cases(model):
    dis, ref = pair(64, 48, seed=8)
    flat = torch.full((1, 3, 64, 48), 0.37)
    blurred = torch.nn.functional.avg_pool2d(ref, 9, stride=1, padding=4, count_include_pad=False)
    cases = {
        "flat output and reference": (model, flat, flat),
        "flat, different levels": (model, flat, flat + 0.2),
        "output equal to reference": (model, ref, ref),
        "black output": (model, torch.zeros_like(ref), ref),
        "white output": (model, torch.ones_like(ref), ref),
        "saturated pixels": (model, (3 * dis - 1).clamp(0, 1), ref),
        "black and white reference": (model, dis, (ref > 0.5).float()),
    }
    with torch.no_grad():  # whichever of the two images is less natural (higher raw N) is the reference
        a, b = model.natural(*model.encode(torch.cat([blurred, ref])))
    dis_d, ref_d = (blurred, ref) if a < b else (ref, blurred)
    for small in (True, False):
        cases[f"very {'small' if small else 'large'} D"] = (extreme_d_model(model, dis_d, ref_d, small), dis_d, ref_d)
    return cases


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_gradients_are_finite_where_training_goes(model, amp):
    for name, (net, dis, ref) in finite_gradient_cases(model).items():
        for term in TERMS:
            loss, grad = grad_of(AFINELoss(net, term, amp=amp), dis, ref)
            assert torch.isfinite(loss), (name, term)
            assert torch.isfinite(grad).all(), (name, term)


def test_only_the_output_gets_gradients_and_inputs_are_unchanged(model):
    criterion = AFINELoss(model)
    dis, ref = pair(64, 48, b=2, seed=9)
    dis, ref = dis.requires_grad_(True), ref.clone().requires_grad_(True)
    before, versions = (dis.detach().clone(), ref.detach().clone()), (dis._version, ref._version)
    criterion(dis, ref).backward()
    assert all(not p.requires_grad and p.grad is None for p in criterion.parameters())
    assert len(list(criterion.parameters())) == len(list(model.parameters())) > 0
    assert dis.grad is not None and dis.grad.abs().sum() > 0
    assert ref.grad is None  # the reference branch runs without autograd
    assert torch.equal(dis.detach(), before[0]) and torch.equal(ref.detach(), before[1])
    assert (dis._version, ref._version) == versions  # no in-place operation touched them


def test_batch_of_two_equals_two_batches_of_one(model):
    dis, _ = pair(64, 48, b=2, seed=10)
    refs = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(11))
    for term in TERMS:
        values, grad = grad_of(AFINELoss(model, term, reduction="none"), dis, refs)
        total, grad_sum = grad_of(AFINELoss(model, term, reduction="sum"), dis, refs)
        for i in range(2):
            alone, grad_alone = grad_of(AFINELoss(model, term, reduction="none"), dis[i:i + 1], refs[i:i + 1])
            torch.testing.assert_close(values[i:i + 1], alone, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad[i:i + 1], grad_alone, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(grad_sum[i:i + 1], grad_alone, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(total, values.sum())
        shared, grad_shared = grad_of(AFINELoss(model, term, reduction="none"), dis, refs[:1])
        expanded, grad_expanded = grad_of(AFINELoss(model, term, reduction="none"), dis, refs[:1].expand(2, -1, -1, -1))
        torch.testing.assert_close(shared, expanded, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_shared, grad_expanded, rtol=1e-4, atol=1e-7)


def test_checkpointing_gives_the_same_gradients(model):
    dis, ref = pair(64, 48, b=2, seed=12)
    plain = grad_of(AFINELoss(model), dis, ref)
    recomputed = grad_of(AFINELoss(model, checkpoint_blocks=True), dis, ref)
    torch.testing.assert_close(plain, recomputed, rtol=1e-6, atol=1e-9)


def test_bf16_autocast_stays_close_to_float32(model):
    dis, ref = pair(64, 64, b=2, seed=13)
    loss32, grad32 = grad_of(AFINELoss(model, reduction="none"), dis, ref)
    loss16, grad16 = grad_of(AFINELoss(model, reduction="none", amp="bf16"), dis, ref)
    assert loss16.dtype == torch.float32 and grad16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=0, atol=0.05)
    assert torch.nn.functional.cosine_similarity(grad16.flatten(), grad32.flatten(), dim=0) > 0.95


class Restorer(nn.Module):
    """A user's network that keeps its loss as a submodule."""

    def __init__(self, criterion: AFINELoss):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.criterion = criterion


def test_stays_in_eval_mode_and_frozen_under_train(model):
    net = Restorer(AFINELoss(model))
    net.train()
    assert net.training and net.criterion.training
    assert not any(m.training for m in net.criterion.afine.modules())
    assert not any(p.requires_grad for p in net.criterion.parameters())


def test_state_dict_leaves_out_the_frozen_weights_unless_asked(model):
    net = Restorer(AFINELoss(copy.deepcopy(model)))
    state = net.state_dict()
    assert set(state) == {"conv.weight", "conv.bias"}
    fresh = Restorer(AFINELoss(copy.deepcopy(model)))
    fresh.load_state_dict(state)  # strict
    assert torch.equal(fresh.conv.weight, net.conv.weight)
    assert torch.equal(fresh.criterion.afine.fidelity.alpha, model.fidelity.alpha)  # kept, not emptied

    with_weights = Restorer(AFINELoss(copy.deepcopy(model), save_weights=True))
    with torch.no_grad():
        with_weights.criterion.afine.adapter.k.fill_(3.0)
    state = with_weights.state_dict()
    assert "criterion.afine.adapter.k" in state and "criterion.afine.clip.visual.conv1.weight" in state
    assert len(state) == 2 + len(model.state_dict())
    fresh.load_state_dict(state)  # a checkpoint holding the weights loads them
    assert fresh.criterion.afine.adapter.k.item() == 3.0


@pytest.mark.parametrize("convert", ["half", "bfloat16", "to float16"])
def test_half_network_keeps_the_loss_model_in_float32(model, convert):
    """`.half()` on a network holding the loss made its heads float16 (c = 1e-10 is 0 there) and the loss NaN:
    the frozen model stays float32, the loss of float16 images is the float32 loss of the same (rounded) values,
    and the output's gradient is finite, in the output's dtype."""
    net = Restorer(AFINELoss(copy.deepcopy(model)))
    net = net.to(torch.float16) if convert == "to float16" else getattr(net, convert)()
    low = net.conv.weight.dtype
    assert low == (torch.bfloat16 if convert == "bfloat16" else torch.float16)
    assert all(t.dtype == torch.float32 for t in net.criterion.state_dict(keep_vars=True).values())
    assert all(t.dtype == torch.float32 for t in net.criterion.afine.state_dict().values())
    dis, ref = pair(64, 48, b=2, seed=25)
    dis, ref = dis.to(low), ref.to(low)
    loss, grad = grad_of(net.criterion, dis, ref)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grad.dtype == low and torch.isfinite(grad).all() and grad.abs().sum() > 0
    expected, _ = grad_of(AFINELoss(model), dis.float(), ref.float())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    net.float()  # and back: the heads were never rounded to float16
    kept = net.criterion.afine.state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(kept, model.state_dict().values()))


def test_to_moves_the_model(model):
    criterion = AFINELoss(copy.deepcopy(model)).to(torch.float64)
    assert all(t.dtype == torch.float64 for t in criterion.state_dict(keep_vars=True).values())
    assert all(t.dtype == torch.float64 for t in criterion.afine.state_dict().values())
    dis, ref = pair(32, 32, seed=14)
    assert criterion(dis, ref).dtype == torch.float64  # float32 inputs follow the model


def test_built_from_weights_files(model, tmp_path):
    paths = write_checkpoints(tmp_path, model)
    dis, ref = pair(64, 48, b=2, seed=15)
    with torch.no_grad():
        scores = model(dis, ref)
    for weights in (paths["afine"], paths["folder"]):
        torch.testing.assert_close(AFINELoss(weights, reduction="none")(dis, ref), scores["afine_all"])
    heads_only = tmp_path / "heads"
    heads_only.mkdir()
    for name in ("net_qhead.pth", "net_scale_nr.pth"):
        (heads_only / name).write_bytes((paths["folder"] / name).read_bytes())
    nr = AFINELoss(heads_only, "afine_nr", clip=paths["clip_plain"], reduction="none")
    torch.testing.assert_close(nr(dis), scores["afine_nr"])
    with pytest.raises(AfineError, match="fidelity"):
        AFINELoss(heads_only, "afine_fr", clip=paths["clip_plain"])


@pytest.mark.parametrize("output, reference, message", [
    (torch.rand(3, 64, 64), torch.rand(1, 3, 64, 64), r"output: expected RGB images \[B, 3, H, W\], got shape \(3, 64"),
    (torch.rand(1, 4, 64, 64), torch.rand(1, 4, 64, 64), r"output: .*got shape \(1, 4, 64, 64\)"),
    (torch.rand(1, 3, 64, 31), torch.rand(1, 3, 64, 31), r"output: images must be at least 32x32 px"),
    (torch.rand(1, 3, 64, 64), torch.rand(1, 1, 64, 64), r"reference: .*got shape \(1, 1, 64, 64\)"),
    (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 96), r"sizes differ: \(1, 3, 64, 64\) vs \(1, 3, 64, 96\)"),
    (torch.rand(2, 3, 64, 64), torch.rand(3, 3, 64, 64), r"reference batch must be 1 or 2"),
    (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64) * 255, r"reference: expected RGB in \[0, 1\], got values in"),
    (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64) * 2 - 1, r"reference: expected RGB in \[0, 1\]"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.rand(1, 3, 64, 64), r"output: expected floating-point"),
    (torch.rand(1, 3, 64, 64), None, r"needs a reference"),
    (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64).index_put_((torch.tensor(0),) * 4, torch.tensor(torch.nan)),
     r"reference: expected RGB in \[0, 1\], got NaN values"),
    (torch.rand(2, 3, 64, 64), torch.full((2, 3, 64, 64), torch.nan), r"reference: .*got NaN values"),
    (torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64).index_put_((torch.tensor(0),) * 4, torch.tensor(torch.inf)),
     r"reference: expected RGB in \[0, 1\], got infinite values"),
])
def test_bad_inputs_are_value_errors_naming_the_shape(model, output, reference, message):
    with pytest.raises(ValueError, match=message):
        AFINELoss(model)(output, reference)


def test_output_outside_0_1_is_scored_as_it_is(model):
    """A network in training overshoots [0, 1]: no error, no clamp (the gradient keeps flowing there)."""
    dis, ref = pair(64, 64, seed=16)
    overshoot = dis * 1.6 - 0.3
    values, grad = grad_of(AFINELoss(model, reduction="none"), overshoot, ref)
    with torch.no_grad():
        torch.testing.assert_close(values, model(overshoot, ref)["afine_all"], rtol=1e-5, atol=1e-5)
    assert grad[overshoot > 1].abs().sum() > 0


def test_bad_settings(model):
    for kwargs, message in (({"term": "afine_nr_ref"}, "does not depend on the output"),
                            ({"reduction": "avg"}, "reduction must be one of"), ({"amp": "fp8"}, "amp must be"),
                            ({"gradient": "twin"}, "gradient must be one of stable, exact")):
        with pytest.raises(ValueError, match=message):
            AFINELoss(model, **kwargs)
    assert AFINELoss(model, "afine_nr")(torch.rand(1, 3, 32, 32)).shape == ()  # no reference needed
