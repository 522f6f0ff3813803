"""kd_loss against a NumPy hand computation (issue: foundation)."""

import numpy as np
import pytest
import torch

from kdrun.losses import kd_loss


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def np_kd(s, t, y, T, alpha):
    """alpha * T^2 * mean_b sum_c p_t (log p_t - log p_s) + (1 - alpha) * mean_b -log softmax(s)_y."""
    log_ps, log_pt = np_log_softmax(s / T), np_log_softmax(t / T)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1).mean()
    ce = -np_log_softmax(s)[np.arange(len(y)), y].mean()
    return alpha * T * T * kl + (1 - alpha) * ce


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_kd_loss_matches_numpy(T, alpha):
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 3, (16, 10)), rng.normal(0, 3, (16, 10))
    y = rng.integers(0, 10, 16)
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, alpha)
    assert got.dim() == 0
    assert got.item() == pytest.approx(np_kd(s, t, y, T, alpha), rel=1e-5, abs=1e-6)


def test_kd_loss_large_logits_are_finite():
    rng = np.random.default_rng(1)
    s, t = rng.normal(0, 1e4, (8, 100)), rng.normal(0, 1e4, (8, 100))
    y = rng.integers(0, 100, 8)
    for T in (1.0, 20.0):
        got = kd_loss(
            torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), torch.tensor(y), T, 0.5
        )
        assert torch.isfinite(got)
        assert got.item() == pytest.approx(np_kd(s, t, y, T, 0.5), rel=1e-4)


@pytest.mark.parametrize("T", [1.0, 4.0, 20.0])
def test_kd_gradient_at_alpha_1(T):
    """d loss / d s = T * (softmax(s/T) - softmax(t/T)) / batch when alpha = 1."""
    rng = np.random.default_rng(2)
    B = 6
    s = torch.tensor(rng.normal(0, 2, (B, 5)), requires_grad=True)
    t = torch.tensor(rng.normal(0, 2, (B, 5)))
    kd_loss(s, t, torch.zeros(B, dtype=torch.long), T, 1.0).backward()
    ps, pt = np.exp(np_log_softmax(s.detach().numpy() / T)), np.exp(np_log_softmax(t.numpy() / T))
    np.testing.assert_allclose(s.grad.numpy(), T * (ps - pt) / B, rtol=1e-4, atol=1e-7)  # float32 inside


def test_kd_direction_is_teacher_to_student():
    s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    y = torch.tensor([0])
    forward_kl = np_kd(s.numpy(), t.numpy(), y.numpy(), 2.0, 1.0)
    reverse_kl = np_kd(t.numpy(), s.numpy(), y.numpy(), 2.0, 1.0)
    assert abs(forward_kl - reverse_kl) > 1e-3
    assert kd_loss(s, t, y, 2.0, 1.0).item() == pytest.approx(forward_kl, rel=1e-6)


def test_kd_identical_logits_give_zero_soft_loss():
    z = torch.randn(4, 7)
    assert kd_loss(z, z.clone(), torch.zeros(4, dtype=torch.long), 4.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)
