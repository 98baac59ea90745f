from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.training.losses import ctr_loss, kd_loss, lm_ce, sparse_kd_kl


def _toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # one row, 3 positions, vocab 3; with shift, positions 0 and 1 predict labels 1 and 2
    student = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])
    teacher = torch.tensor([[[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    return student, teacher, labels


def test_kd_loss_matches_a_hand_computation() -> None:
    s, t, y = _toy()
    temp, lam = 2.0, 0.3

    def softmax(v: list[float]) -> list[float]:
        z = sum(math.exp(x) for x in v)
        return [math.exp(x) / z for x in v]

    ce = (-math.log(softmax([1.0, 0.0, -1.0])[1]) - math.log(softmax([0.5, 0.5, 0.0])[2])) / 2
    kls = []
    for sv, tv in (([1.0, 0.0, -1.0], [0.0, 1.0, 0.0]), ([0.5, 0.5, 0.0], [2.0, 0.0, 0.0])):
        p = softmax([x / temp for x in tv])
        q = softmax([x / temp for x in sv])
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)))
    kl = sum(kls) / 2
    out = kd_loss(s, t, y, temperature=temp, lam=lam)
    assert out.ce.item() == pytest.approx(ce, rel=1e-5)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(ce + lam * temp**2 * kl, rel=1e-5)


def test_kd_loss_ignores_masked_positions_and_equals_ce_for_identical_logits() -> None:
    s, _, y = _toy()
    out = kd_loss(s, s.clone(), y, temperature=3.0, lam=1.0)
    assert out.kl.item() == pytest.approx(0.0, abs=1e-7)
    assert out.loss.item() == pytest.approx(out.ce.item())
    # the last position (all 9s) is never scored: changing it changes nothing
    s2 = s.clone()
    s2[0, 2] = torch.tensor([-5.0, 3.0, 1.0])
    assert kd_loss(s2, s2.clone(), y).loss.item() == pytest.approx(out.ce.item())
    assert lm_ce(s, y).item() == pytest.approx(out.ce.item())


def test_kd_loss_gradient_pulls_student_towards_teacher() -> None:
    _, t, _ = _toy()
    y = torch.tensor([[-100, 1, 0]])  # the teacher's argmax: CE and KL agree on the direction
    s = torch.zeros_like(t, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.2)
    first: float | None = None
    for _ in range(200):
        out = kd_loss(s, t, y, temperature=1.0, lam=5.0)
        first = first if first is not None else out.kl.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert first is not None and out.kl.item() < first / 2


def test_kd_loss_rejects_mismatched_vocabularies() -> None:
    s, t, y = _toy()
    with pytest.raises(ValueError):
        kd_loss(s, t[..., :2], y)


def test_sparse_kl_with_full_support_equals_dense_kl() -> None:
    torch.manual_seed(0)
    s = torch.randn(5, 7)
    t = torch.randn(5, 7)
    temp = 2.0
    vals, ids = t.topk(7, dim=-1)
    dense = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), log_target=True,
                     reduction="none").sum(-1).mean()
    sparse = sparse_kd_kl(s, ids, vals, torch.ones(5, dtype=torch.bool), temp)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-5)


def test_sparse_kl_is_non_negative_with_truncated_teacher_and_padding() -> None:
    torch.manual_seed(1)
    s = torch.randn(4, 9)
    vals, ids = torch.randn(4, 9).topk(3, dim=-1)
    ids[0, 2] = -1  # padding entry
    valid = torch.tensor([True, True, False, True])
    v = sparse_kd_kl(s, ids, vals, valid)
    assert v.item() >= 0
    # equal to the mean over valid rows only
    each = [sparse_kd_kl(s[i : i + 1], ids[i : i + 1], vals[i : i + 1], torch.tensor([True])).item()
            for i in (0, 1, 3)]
    assert v.item() == pytest.approx(sum(each) / 3, rel=1e-5)


def test_ctr_loss_soft_targets() -> None:
    logits = torch.tensor([0.0, 2.0])
    target = torch.tensor([0.5, 0.88])
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target)
    assert ctr_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
