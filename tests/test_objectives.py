"""Vanilla, PoGDiff, CBDM and T2H objectives (pogdiff/objectives.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pogdiff.neighbors import sample_categorical
from pogdiff.objectives import (
    cbdm_loss,
    needs_neighbor_forward,
    pogdiff_loss,
    t2h_targets,
    vanilla_loss,
)


def tensors(seed: int, shape=(4, 3, 5, 5), n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def grad_of(loss_fn, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = a.clone().requires_grad_(True)
    loss = loss_fn(a)
    (grad,) = torch.autograd.grad(loss, a)
    return loss.detach(), grad


def test_vanilla_is_train_text_to_image_loss():
    a, eps, _ = tensors(0)
    loss, logs = vanilla_loss(a, eps)
    assert torch.equal(loss, F.mse_loss(a.float(), eps.float(), reduction="mean"))
    assert logs == {"loss_main": loss.item()}
    snr = torch.tensor([0.5, 1.0, 2.0, 0.25])
    loss, _ = vanilla_loss(a, eps, snr)
    expected = (((a - eps) ** 2).mean(dim=(1, 2, 3)) * snr).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("snr", [None, torch.tensor([0.5, 1.0, 2.0, 0.25])])
def test_pog_identity(snr):
    """For fixed c: grad of the PoGDiff loss == grad of mean_b[w (1+psi) mse_b(a, m)], m = (eps + psi c)/(1+psi),
    and the two losses differ by mean_b[w psi/(1+psi) mse_b(eps, c)], a constant independent of a."""
    a, eps, c = tensors(1)
    psi = torch.tensor([0.5, 0.0, 2.0, 1.25])
    w = torch.ones(4) if snr is None else snr
    p = psi[:, None, None, None]
    m = (eps + p * c) / (1 + p)

    def pog(a_):
        return pogdiff_loss(a_, eps, c, psi, snr)[0]

    def product_of_gaussians(a_):
        return (w * (1 + psi) * ((a_ - m) ** 2).mean(dim=(1, 2, 3))).mean()

    const = (w * psi / (1 + psi) * ((eps - c) ** 2).mean(dim=(1, 2, 3))).mean()
    for a_ in (a, 3 * a + 1):
        loss_pog, grad_pog = grad_of(pog, a_)
        loss_prod, grad_prod = grad_of(product_of_gaussians, a_)
        assert torch.allclose(grad_pog, grad_prod, rtol=1e-5, atol=1e-7)
        assert (loss_pog - loss_prod).item() == pytest.approx(const.item(), rel=1e-5)


def test_pogdiff_sends_no_gradient_to_the_neighbour():
    a, eps, c = tensors(2)
    a.requires_grad_(True)
    c.requires_grad_(True)
    loss, logs = pogdiff_loss(a, eps, c, torch.tensor([1.0, 0.5, 0.0, 2.0]))
    loss.backward()
    assert c.grad is None and a.grad is not None
    assert logs["psi_mean"] == pytest.approx(0.875) and logs["frac_skipped"] == 0.25
    assert logs["loss_main"] + logs["loss_consistency"] == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("neighbor_grad", [False, True])
def test_neighbor_grad_hand_computed(neighbor_grad):
    """B = 2, one element each: a = (1, 2), eps = (0, 0), c = (0.5, 2.5), psi = (2, 0.5).

    L = mean_b[(a - eps)^2 + psi (a - c)^2] = ((1 + 2 * 0.25) + (4 + 0.5 * 0.25)) / 2 = 2.8125
    dL/da = [2 (a - eps) + 2 psi (a - c)] / 2 = (2, 1.75)
    dL/dc = -2 psi (a - c) / 2 = (-1, 0.25) with --neighbor_grad (Algorithm 1), none without.
    All values are exact in binary floating point.
    """
    a = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1).requires_grad_(True)
    c = torch.tensor([0.5, 2.5]).reshape(2, 1, 1, 1).requires_grad_(True)
    eps = torch.zeros(2, 1, 1, 1)
    loss, logs = pogdiff_loss(a, eps, c, torch.tensor([2.0, 0.5]), neighbor_grad=neighbor_grad)
    assert loss.item() == 2.8125 and logs["loss_consistency"] == 0.3125
    grads = torch.autograd.grad(loss, [a, c], allow_unused=True)
    assert grads[0].flatten().tolist() == [2.0, 1.75]
    if neighbor_grad:
        assert grads[1].flatten().tolist() == [-1.0, 0.25]
    else:
        assert grads[1] is None


def test_neighbor_grad_matches_autograd_of_the_written_loss():
    """Random case: --neighbor_grad's gradients equal autograd of mean_b[mse_b(a, eps) + psi_b mse_b(a, c)]."""
    a, eps, c = tensors(5)
    psi = torch.tensor([1.0, 0.0, 0.25, 3.0])
    a1, c1 = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    loss, _ = pogdiff_loss(a1, eps, c1, psi, neighbor_grad=True)
    got = torch.autograd.grad(loss, [a1, c1])
    a2, c2 = a.clone().requires_grad_(True), c.clone().requires_grad_(True)
    per = lambda x, y: ((x - y) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    ref = (per(a2, eps) + psi * per(a2, c2)).mean()
    want = torch.autograd.grad(ref, [a2, c2])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert torch.all(got[1][1] == 0)  # psi = 0: no gradient into that neighbour row


def test_psi_zero_is_vanilla_bitwise():
    a, eps, c = tensors(3)
    snr = torch.tensor([0.5, 1.0, 2.0, 0.25])
    for weights in (None, snr):
        for neighbor in (None, c, torch.full_like(c, float("nan"))):
            loss, grad = grad_of(
                lambda a_, n=neighbor, w=weights: pogdiff_loss(a_, eps, n, torch.zeros(4), w)[0], a
            )
            ref_loss, ref_grad = grad_of(lambda a_, w=weights: vanilla_loss(a_, eps, w)[0], a)
            assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    _, logs = pogdiff_loss(a, eps, None, torch.zeros(4))
    assert logs["loss_consistency"] == 0.0 and logs["frac_skipped"] == 1.0


def test_rows_with_psi_zero_are_never_read():
    a, eps, c = tensors(4)
    psi = torch.tensor([0.7, 0.0, 1.3, 0.0])
    garbage = c.clone()
    garbage[1] = float("nan")
    garbage[3] = 1e30
    compact = c[[0, 2]]
    results = [grad_of(lambda a_, n=n: pogdiff_loss(a_, eps, n, psi)[0], a) for n in (c, garbage, compact)]
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    # ... and equal (to rounding) to the dense formula over every row.
    dense = F.mse_loss(a, eps) + (psi * ((a - c) ** 2).mean(dim=(1, 2, 3))).mean()
    assert results[0][0].item() == pytest.approx(dense.item(), rel=1e-6)
    with pytest.raises(ValueError, match="neighbor_pred must hold"):
        pogdiff_loss(a, eps, None, psi)
    with pytest.raises(ValueError, match="psi must be finite and >= 0"):
        pogdiff_loss(a, eps, c, torch.tensor([0.1, -0.1, 0.0, 0.0]))


def test_needs_neighbor_forward_and_same_text_skip_is_exact():
    psi = torch.tensor([0.0, 0.5, 0.5, 1.0])
    same_text = torch.tensor([False, False, True, False])
    assert needs_neighbor_forward(psi).tolist() == [False, True, True, True]
    assert needs_neighbor_forward(psi, same_text).tolist() == [False, True, False, True]
    # With the same prompt the neighbour prediction is the sample's own, c = sg(a): value 0 and zero
    # gradient, so dropping the row (psi -> 0) changes nothing.
    a, eps, c = tensors(5)
    c[2] = a[2]
    mask = needs_neighbor_forward(psi, same_text)
    full, full_grad = grad_of(lambda a_: pogdiff_loss(a_, eps, c, psi)[0], a)
    skipped, skipped_grad = grad_of(lambda a_: pogdiff_loss(a_, eps, c, torch.where(mask, psi, 0))[0], a)
    assert torch.allclose(full, skipped, rtol=1e-6) and torch.allclose(full_grad, skipped_grad, atol=1e-8)


def test_cbdm_hand_computed():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(2, 1, 1, 2).requires_grad_(True)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]]).view(2, 1, 1, 2)
    h = torch.tensor([[2.0, 2.0], [0.0, 2.0]]).view(2, 1, 1, 2).requires_grad_(True)
    t = torch.tensor([250, 500])
    loss, logs = cbdm_loss(a, target, h, t, 1000, tau=1.0, gamma=0.25)
    # main: (1 + 4 + 1 + 1) / 4; mse(a, h) per sample: (0.5, 2); t/T: (0.25, 0.5)
    assert logs["loss_main"] == 1.75
    assert logs["loss_reg"] == (0.25 * 0.5 + 0.5 * 2) / 2 == 0.5625
    assert logs["loss_commit"] == 0.25 * 0.5625
    assert loss.item() == 1.75 + 0.5625 + 0.140625
    loss.backward()
    # d/da: 2 (a - target) / 4 + (t/T) (a - h) / 2;  d/dh: gamma (t/T) (h - a) / 2  (ratio 1 : gamma).
    assert a.grad.flatten().tolist() == [0.375, 1.0, -0.5, -1.0]
    assert h.grad.flatten().tolist() == [0.03125, 0.0, 0.0, 0.125]

    loss, logs = cbdm_loss(a, target, h, t, 1000, snr_weights=torch.tensor([2.0, 1.0]))
    assert (logs["loss_main"], logs["loss_reg"], logs["loss_commit"]) == (3.0, 0.625, 0.15625)
    assert loss.item() == 3.78125


def t2h_batch():
    """Three well-separated clean latents; x_t of each sample is built from a chosen x0 so that the
    posterior over the batch is one-hot (logit gaps of ~100 nats at abar = 0.5)."""
    x0 = torch.stack([torch.full((1, 2, 2), v) for v in (5.0, -5.0, 0.0)])
    n = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 2, 2)
    s = math.sqrt(0.5)
    source = [1, 2, 2]  # sample 0's x_t comes from x0_1, sample 1's from x0_2, sample 2's from its own
    noisy = torch.stack([s * x0[j] + s * n for j in source])
    noise = (noisy - s * x0) / s  # the noise that made noisy from each sample's own x0
    alphas_cumprod = torch.tensor([0.9, 0.5, 0.1])
    timesteps = torch.tensor([1, 1, 1])
    # Sample 1 is the densest, sample 0 the rarest.
    log_density = torch.tensor([-10.0, 0.0, -5.0])
    return x0, noisy, noise, n, alphas_cumprod, timesteps, log_density


def test_t2h_targets_gate_and_formula():
    x0, noisy, noise, n, alphas_cumprod, timesteps, log_density = t2h_batch()
    targets, replaced = t2h_targets(
        x0, noisy, timesteps, alphas_cumprod, log_density, torch.Generator().manual_seed(0), noise=noise
    )
    # 0 draws 1 (denser): accepted, target (x_t - sqrt(abar) x0_1) / sqrt(1 - abar) = n.
    # 1 draws 2 (rarer): refused, original noise. 2 draws itself: unchanged.
    assert replaced.tolist() == [True, False, False]
    assert torch.allclose(targets[0], n, atol=1e-6)
    assert torch.equal(targets[1], noise[1]) and torch.equal(targets[2], noise[2])

    v_targets, v_replaced = t2h_targets(
        x0,
        noisy,
        timesteps,
        alphas_cumprod,
        log_density,
        torch.Generator().manual_seed(0),
        "v_prediction",
        noise=noise,
    )
    s = math.sqrt(0.5)
    assert v_replaced.tolist() == [True, False, False]
    assert torch.allclose(v_targets[0], s * n - s * x0[1], atol=1e-6)
    assert torch.allclose(v_targets[1:], s * noise[1:] - s * x0[1:], atol=1e-6)
    with pytest.raises(ValueError, match="epsilon' or 'v_prediction'"):
        t2h_targets(
            x0, noisy, timesteps, alphas_cumprod, log_density, torch.Generator(), "sample", noise=noise
        )


def test_t2h_draws_come_from_the_generator():
    x0, noisy, _, _, _, timesteps, _ = t2h_batch()
    # abar = 0: x_t = noise says nothing about x0, the posterior is uniform over the batch.
    alphas_cumprod = torch.tensor([0.9, 0.0, 0.1])
    noise = noisy.clone()
    log_density = torch.tensor([0.0, 0.0, 0.0])  # every draw passes the gate
    targets, replaced = t2h_targets(
        x0, noisy, timesteps, alphas_cumprod, log_density, torch.Generator().manual_seed(7), noise=noise
    )
    j = sample_categorical(torch.ones(3, 3), torch.Generator().manual_seed(7))
    assert j.tolist() == [0, 0, 2] and replaced.tolist() == [False, True, False]
    # At abar = 0 the epsilon target of any draw is x_t itself.
    assert torch.equal(targets, noisy)
    again, _ = t2h_targets(
        x0, noisy, timesteps, alphas_cumprod, log_density, torch.Generator().manual_seed(7), noise=noise
    )
    assert torch.equal(targets, again)
