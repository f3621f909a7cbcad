"""Text-density VAE, ELBO and inverse-density weights (pogdiff/density.py)."""

import math

import pytest
import torch

from pogdiff.density import (
    TextDensityVAE,
    _column_mean_std,
    elbo,
    fit_text_density,
    inverse_density_log_weights,
    log_weight_summary,
)


def imbalanced_embeddings(seed: int = 0, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """4 majority prompts x 30 noisy copies, 8 minority prompts x 2 noisy copies; returns (y, is_minority)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(12, dim, generator=g)
    copies = [30] * 4 + [2] * 8
    y = torch.cat([c + 0.05 * torch.randn(n, dim, generator=g) for c, n in zip(centres, copies)])
    is_minority = torch.tensor([n == 2 for c, n in zip(centres, copies) for _ in range(n)])
    return y, is_minority


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These VAEs are tiny: one thread is fastest, and immune to the 100x slow-down OpenMP suffers when
    another process competes for the 2 cores (every small op waits on a descheduled sibling thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fitted(single_thread):
    y, is_minority = imbalanced_embeddings()
    state = torch.get_rng_state()
    model = fit_text_density(y, seed=0, show_progress=False)
    assert torch.equal(torch.get_rng_state(), state), "fit_text_density must not touch the global RNG"
    return y, is_minority, model, elbo(model, y)


def test_rare_prompts_get_larger_weights(fitted):
    y, is_minority, _, elbos = fitted
    assert elbos.dtype == torch.float64 and elbos.shape == (len(y),)
    for bounds in [(0.1, 10.0), (None, None)]:
        log_w = inverse_density_log_weights(elbos, 1.0, *bounds)
        assert log_w.dtype == torch.float32
        assert log_w[is_minority].min() > log_w[~is_minority].max(), bounds
        assert log_w.double().exp().mean().item() == pytest.approx(1.0, abs=1e-6)
    w = inverse_density_log_weights(elbos).double().exp()
    assert w.min() >= 0.1 * (1 - 1e-6) and w.max() <= 10.0 * (1 + 1e-6)


def test_fit_and_elbo_are_deterministic(fitted):
    y, _, model, elbos = fitted
    again = fit_text_density(y, seed=0, show_progress=False)
    assert torch.equal(elbo(again, y), elbos)
    assert torch.equal(elbo(model, y, seed=0), elbos)
    other = fit_text_density(y, seed=1, show_progress=False)
    assert not torch.equal(elbo(other, y), elbos)
    # Identical captions get identical ELBOs (computed once per distinct row), whatever the batching.
    twice = elbo(model, torch.cat([y[:5], y[:5]]), batch_size=2)
    assert torch.equal(twice[:5], twice[5:])
    assert torch.allclose(twice[:5], elbos[:5], rtol=1e-6)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        elbo(model, y, num_samples=0)


def test_elbo_hand_computed():
    model = TextDensityVAE(input_dim=3, latent_dim=2, hidden_dim=4)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        # Encoder output is its last bias: mu = (1, -1), logvar = (log 4, 0); decoder mean 0, scale 1.
        model.encoder[2].bias.copy_(torch.tensor([1.0, -1.0, math.log(4.0), 0.0]))
        model.mean.fill_(1.0)
        model.std.fill_(2.0)
    y = torch.tensor([[1.0, 3.0, -1.0], [1.0, 1.0, 1.0]])
    x_sq = torch.tensor([0.0 + 1.0 + 1.0, 0.0])  # ((y - 1) / 2)^2 summed
    log_lik = -0.5 * x_sq - 1.5 * math.log(2 * math.pi)
    kl = 0.5 * ((1 + 4 - math.log(4) - 1) + (1 + 1 - 0 - 1))
    expected = log_lik - kl - 3 * math.log(2.0)  # standardisation log-Jacobian: -sum(log std)
    for num_samples in (1, 16):
        assert elbo(model, y, num_samples=num_samples).tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_log_weights_of_large_elbos_are_finite_and_exact():
    elbos = torch.tensor([-1e4, -1.2e4, -9e3, -2e4], dtype=torch.float64)
    raw = inverse_density_log_weights(elbos, 1.0, None, None)
    log4 = math.log(4.0)
    assert raw.tolist() == pytest.approx([-1e4 + log4, -8e3 + log4, -1.1e4 + log4, log4], rel=1e-6)
    # Clipped: three weights at 0.1, the last makes the mean 1: (0.3 + w) / 4 = 1.
    clipped = inverse_density_log_weights(elbos)
    assert bool(torch.isfinite(clipped).all())
    assert clipped.exp().tolist() == pytest.approx([0.1, 0.1, 0.1, 3.7], rel=1e-6)
    # Temperature divides the ELBO.
    tempered = inverse_density_log_weights(elbos, 1e4, None, None)
    x = [1.0, 1.2, 0.9, 2.0]
    lme = math.log(sum(math.exp(v) for v in x) / 4)
    assert tempered.tolist() == pytest.approx([v - lme for v in x], rel=1e-6)


def test_clip_and_renormalise_reaches_the_fixed_point():
    # Densities 1 (x9) and 1/1000: unclipped weights (mean 1) are 0.0099 (x9) and 9.91. Clipping to
    # [0.1, 10] then dividing by the mean would give 0.0925 < w_min; the fixed point keeps the bounds:
    # nine at 0.1 and one at 9.1, mean exactly 1.
    elbos = torch.tensor([0.0] * 9 + [-math.log(1000.0)])
    w = inverse_density_log_weights(elbos).double().exp()
    assert w.tolist() == pytest.approx([0.1] * 9 + [9.1], rel=1e-6)
    unclipped = inverse_density_log_weights(elbos, 1.0, None, None).double().exp()
    assert unclipped.tolist() == pytest.approx([1 / 100.9] * 9 + [1000 / 100.9], rel=1e-6)
    # Upper bound only: two dense-weight samples at 10, the other 98 share the rest: 98 w + 20 = 100.
    elbos = torch.tensor([0.0] * 98 + [-math.log(1e6)] * 2)
    w = inverse_density_log_weights(elbos, 1.0, None, 10.0).double().exp()
    assert w.tolist() == pytest.approx([80 / 98] * 98 + [10.0] * 2, rel=1e-6)
    # Weights already inside the bounds are not changed.
    elbos = torch.tensor([0.0, 0.5, -0.5])
    assert torch.allclose(
        inverse_density_log_weights(elbos), inverse_density_log_weights(elbos, 1, None, None)
    )


def test_log_weight_errors_and_summary():
    elbos = torch.tensor([0.0, 1.0])
    for kwargs in ({"w_min": 1.5}, {"w_max": 0.5}, {"w_min": 0.0}, {"temperature": 0.0}):
        with pytest.raises(ValueError):
            inverse_density_log_weights(elbos, **kwargs)
    with pytest.raises(ValueError, match="NaN or inf"):
        inverse_density_log_weights(torch.tensor([0.0, float("nan")]))

    summary = log_weight_summary(torch.tensor([0.5, 1.0, 4.0]).log())
    assert summary == pytest.approx(
        {"min": 0.5, "median": 1.0, "max": 4.0, "spread": 8.0, "log_spread": math.log(8.0)}, rel=1e-6
    )
    wide = log_weight_summary(torch.tensor([0.0, 1000.0]))
    assert wide["spread"] == math.inf and wide["log_spread"] == 1000.0


def test_column_mean_std_chunked_equals_float64():
    """The standardisation's statistics, accumulated over row chunks (no float64 copy of the embeddings)."""
    x = torch.randn((1001, 16), generator=torch.Generator().manual_seed(0)) * 5 + 3
    x[:, 3] = 7.0  # a constant column: std exactly 0
    mean, std = _column_mean_std(x, rows_per_chunk=100)
    torch.testing.assert_close(mean, x.double().mean(dim=0), rtol=0, atol=1e-12)
    torch.testing.assert_close(std, x.double().std(dim=0), rtol=0, atol=1e-12)
    assert std[3].item() == 0.0
