"""The distillation objective: alpha*T^2*KL(p_T || p_S) + (1 - alpha)*CE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memstore_gpt2.trainer import kd_loss


def test_kd_loss_matches_the_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    loss, kl, ce = kd_loss(s, t, ids, alpha=0.3, temperature=2.0)
    p_t = F.softmax(t[:, :-1] / 2, -1)
    manual_kl = (p_t * (p_t.log() - F.log_softmax(s[:, :-1] / 2, -1))).sum(-1).mean()
    manual_ce = F.cross_entropy(s[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(kl, manual_kl)
    torch.testing.assert_close(ce, manual_ce)
    torch.testing.assert_close(loss, 0.3 * 4 * manual_kl + 0.7 * manual_ce)


def test_kl_vanishes_when_student_equals_teacher():
    logits = torch.randn(1, 4, 9)
    _, kl, _ = kd_loss(logits, logits.clone(), torch.zeros(1, 4, dtype=torch.long), 0.5, 2.0)
    assert abs(float(kl)) < 1e-6
