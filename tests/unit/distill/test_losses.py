from __future__ import annotations

import math

import pytest
import torch

from distill.losses import distill_loss, forward_kl, generalized_jsd, token_ce


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_identical_inputs_give_zero() -> None:
    logits = torch.randn(2, 3, 7)
    assert forward_kl(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    for beta in (0.0, 0.3, 0.5, 1.0):
        assert generalized_jsd(logits, logits, beta=beta).item() == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_known_value() -> None:
    p, q = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    teacher = torch.tensor([p]).log()
    student = torch.tensor([q]).log()
    assert forward_kl(student, teacher).item() == pytest.approx(_kl(p, q), rel=1e-5)


def test_forward_kl_temperature_scales_by_t_squared() -> None:
    teacher = torch.tensor([[2.0, 0.0, -1.0]])
    student = torch.tensor([[0.0, 1.0, 0.0]])
    t = 2.0
    p = torch.softmax(teacher / t, -1)[0].tolist()
    q = torch.softmax(student / t, -1)[0].tolist()
    got = forward_kl(student, teacher, temperature=t).item()
    assert got == pytest.approx(t * t * _kl(p, q), rel=1e-5)


def test_jsd_known_value_and_edges() -> None:
    p, q = [0.7, 0.2, 0.1], [0.2, 0.5, 0.3]
    teacher, student = torch.tensor([p]).log(), torch.tensor([q]).log()
    beta = 0.5
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q, strict=True)]
    want = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    assert generalized_jsd(student, teacher, beta=beta).item() == pytest.approx(want, rel=1e-5)
    # beta=0: forward KL(teacher||student); beta=1: reverse KL(student||teacher).
    assert generalized_jsd(student, teacher, beta=0.0).item() == pytest.approx(_kl(p, q), rel=1e-5)
    assert generalized_jsd(student, teacher, beta=1.0).item() == pytest.approx(_kl(q, p), rel=1e-5)
    # beta=0.5 is symmetric and bounded by log 2.
    swapped = generalized_jsd(teacher, student, beta=0.5).item()
    assert swapped == pytest.approx(want, rel=1e-5)
    assert want <= math.log(2)


def test_jsd_beta_bounds() -> None:
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(x, x, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(x, x, temperature=0.0)


def test_mask_ignores_positions() -> None:
    torch.manual_seed(0)
    teacher = torch.randn(1, 4, 5)
    student = teacher.clone()
    student[0, 2] = torch.randn(5) * 5  # differs only at a masked-out position
    mask = torch.tensor([[1, 1, 0, 1]])
    assert forward_kl(student, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert generalized_jsd(student, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(student, teacher, torch.zeros(1, 4)).item() == 0.0


def test_gradients_flow_to_student_only() -> None:
    torch.manual_seed(0)
    student = torch.randn(2, 3, 6, requires_grad=True)
    teacher = torch.randn(2, 3, 6)
    for fn in (forward_kl, generalized_jsd):
        student.grad = None
        fn(student, teacher).backward()
        assert student.grad is not None
        assert torch.isfinite(student.grad).all()
        assert student.grad.abs().sum() > 0
    # At the optimum the gradient vanishes.
    at_teacher = teacher.clone().requires_grad_(True)
    forward_kl(at_teacher, teacher).backward()
    assert at_teacher.grad is not None
    assert at_teacher.grad.abs().max() < 1e-6


def test_distill_loss_mixes_kd_and_ce() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3)
    total, kd, ce = distill_loss(student, teacher, targets, mask, alpha=0.25)
    assert kd.item() == pytest.approx(forward_kl(student, teacher, mask).item())
    assert ce.item() == pytest.approx(token_ce(student, targets, mask).item())
    assert total.item() == pytest.approx(0.25 * kd.item() + 0.75 * ce.item())
    total_jsd, kd_jsd, _ = distill_loss(student, teacher, targets, mask, kind="jsd", alpha=1.0)
    assert total_jsd.item() == pytest.approx(kd_jsd.item())
    with pytest.raises(ValueError, match="unknown loss"):
        distill_loss(student, teacher, targets, mask, kind="nope")  # type: ignore[arg-type]
