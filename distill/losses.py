"""Distillation losses: pure functions of student and teacher logits.

Shapes: ``logits`` are ``(..., vocab)``; ``mask`` (optional) is ``(...)`` with 1 where a
position counts. Every loss returns the mean over counted positions (0 when none count).
Logits are upcast to float32. No model, no state: each is unit-tested on small tensors.

- :func:`forward_kl`: ``KL(teacher || student)`` at a temperature, scaled by ``T**2``
  (Hinton et al.) so gradient magnitudes do not shrink as ``T`` grows.
- :func:`generalized_jsd`: GKD's generalized Jensen-Shannon divergence (Agarwal et al.,
  TRL's ``GKDTrainer.generalized_jsd_loss``): with ``M = beta*teacher + (1-beta)*student``,
  ``beta*KL(teacher||M) + (1-beta)*KL(student||M)``; ``beta=0`` is the forward KL
  ``KL(teacher||student)`` and ``beta=1`` the reverse KL ``KL(student||teacher)``.
- :func:`distill_loss`: ``alpha * kd + (1 - alpha) * ce``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["LossKind", "distill_loss", "forward_kl", "generalized_jsd", "masked_mean", "token_ce"]

LossKind = Literal["kl", "jsd"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set (all positions when ``mask`` is None)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``T**2 * KL(softmax(teacher/T) || softmax(student/T))`` per position, masked mean."""
    import torch.nn.functional as F  # noqa: N812

    if temperature <= 0:
        raise ValueError("temperature must be positive")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_pos = (t.exp() * (t - s)).sum(-1)
    return masked_mean(per_pos, mask) * temperature**2


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """GKD's generalized JSD(beta) per position, masked mean (see the module docstring)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    if not 0.0 <= beta <= 1.0:
        raise ValueError("beta must be in [0, 1]")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        per_pos = (t.exp() * (t - s)).sum(-1)
    elif beta == 1.0:
        per_pos = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        kl_t = (t.exp() * (t - m)).sum(-1)
        kl_s = (s.exp() * (s - m)).sum(-1)
        per_pos = beta * kl_t + (1 - beta) * kl_s
    return masked_mean(per_pos, mask)


def token_ce(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (..., V) against token ids ``targets`` (...), masked mean."""
    import torch.nn.functional as F  # noqa: N812

    per_pos = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).reshape(targets.shape)
    return masked_mean(per_pos, mask)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: LossKind = "kl",
    alpha: float = 0.5,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(alpha * kd + (1 - alpha) * ce, kd, ce)`` over the masked positions.

    ``targets`` are the teacher's completion tokens (the labels at each position), so the
    CE term is sequence-level KD and the KD term token-level KD on the teacher's logits.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    if kind == "kl":
        kd = forward_kl(student_logits, teacher_logits, mask, temperature=temperature)
    elif kind == "jsd":
        kd = generalized_jsd(
            student_logits, teacher_logits, mask, beta=beta, temperature=temperature
        )
    else:
        raise ValueError(f"unknown loss {kind!r}: use kl or jsd")
    ce = token_ce(student_logits, targets, mask)
    return alpha * kd + (1 - alpha) * ce, kd, ce
