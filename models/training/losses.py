"""Losses for distillation and the CTR head.

Conventions (Hugging Face style): ``logits`` are (B, L, V) over input positions and ``labels``
(B, L) are the input ids with ``ignore_index`` where nothing is learned; with ``shift=True`` the
logits at position t are scored against the label at t + 1.

``kd_loss = CE(student, labels) + lam * T^2 * KL(softmax(teacher/T) || softmax(student/T))``,
both terms averaged over the labelled positions; the ``T^2`` keeps the gradient scale of the
soft term independent of the temperature (Hinton et al., 2015).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class KDLoss(NamedTuple):
    loss: torch.Tensor  # ce + lam * T^2 * kl
    ce: torch.Tensor
    kl: torch.Tensor  # mean KL per labelled position (before lam * T^2)


def _align(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if shift:
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 2.0,
    lam: float = 0.5,
    ignore_index: int = -100,
    shift: bool = True,
) -> KDLoss:
    """CE on ``labels`` + ``lam * T^2 * KL(teacher_T || student_T)`` on the same positions.
    Teacher and student logits must share the vocabulary (same last dimension)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    s, y = _align(student_logits.float(), labels, shift)
    t, _ = _align(teacher_logits.float(), labels, shift)
    valid = y != ignore_index
    n = valid.sum().clamp_min(1)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=ignore_index, reduction="sum") / n
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl_pos = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl = (kl_pos * valid).sum() / n
    return KDLoss(ce + lam * temperature**2 * kl, ce, kl)


def sparse_kd_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    valid: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Mean KL(teacher_T || student_T) with the teacher given by its top-k logits per position.

    ``student_logits`` (N, V), ``topk_ids``/``topk_logits`` (N, K) (already aligned: row n of
    both describes the same prediction), ``valid`` (N,) bool. The teacher distribution is the
    softmax of its top-k logits at ``T`` (the tail is dropped); the student's log-probabilities
    are over its full vocabulary, so the term is >= 0 and is 0 only when the student puts the
    teacher's mass on exactly those tokens. Entries with id < 0 are padding.
    """
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    pad = topk_ids < 0
    tl = topk_logits.float().masked_fill(pad, float("-inf")) / temperature
    log_p = F.log_softmax(tl, dim=-1)
    p = log_p.exp()
    lq = log_q.gather(1, topk_ids.clamp_min(0))
    kl_pos = (p * (log_p.masked_fill(pad, 0.0) - lq)).masked_fill(pad, 0.0).sum(-1)
    n = valid.sum().clamp_min(1)
    return (kl_pos * valid).sum() / n


def lm_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, shift: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions."""
    s, y = _align(logits.float(), labels, shift)
    return F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=ignore_index)


def ctr_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy of CTR logits against click labels or click probabilities."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), weight=weight)
