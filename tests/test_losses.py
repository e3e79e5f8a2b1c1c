"""The shared per-depth loss: the fused KL equals the composed one, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from specdec.training.losses import Teacher, depth_loss, kl_from_logits


def composed_kl(logits, teacher_logp):
    return F.kl_div(F.log_softmax(logits.float(), -1), teacher_logp, log_target=True, reduction="none").sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kl_equals_log_softmax_and_kl_div(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 300, generator=g) * 3).to(dtype).requires_grad_()
    teacher_logp = torch.log_softmax(torch.randn(37, 300, generator=g) * 2, -1)
    weights = torch.rand(37, generator=g)
    fused = kl_from_logits(logits, Teacher.from_logits(teacher_logp))
    (fused * weights).sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    ref = composed_kl(logits, teacher_logp)
    (ref * weights).sum().backward()
    assert grad.dtype == dtype
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(grad.float(), logits.grad.float(), **tol)
    assert (fused >= -1e-5).all() and fused.max() > 0.1  # a divergence, and not a trivial one here


def test_depth_loss_averages_the_kl_over_valid_positions_only():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 40, generator=g)
    teacher_logp = torch.log_softmax(torch.randn(2, 5, 40, generator=g), -1)
    valid = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    loss = depth_loss(logits, torch.zeros(2, 5, dtype=torch.long), valid, teacher_logp)
    assert loss.item() == pytest.approx(composed_kl(logits, teacher_logp)[valid].mean().item(), rel=1e-5)
    # a Teacher built once serves the same loss; an empty selection gives zero with a graph
    assert depth_loss(logits, None, valid, Teacher.from_logits(teacher_logp)).item() == pytest.approx(loss.item(), rel=1e-6)
    z = logits.requires_grad_()
    empty = depth_loss(z, None, torch.zeros(2, 5, dtype=torch.bool), teacher_logp)
    empty.backward()
    assert empty.item() == 0.0 and z.grad.abs().sum() == 0


def test_teacher_indexing_keeps_probs_and_entropy_together():
    logp = torch.log_softmax(torch.randn(6, 9), -1)
    t = Teacher.from_logits(logp)
    torch.testing.assert_close(t.probs.sum(-1), torch.ones(6))
    torch.testing.assert_close(t.negent, (logp.exp() * logp).sum(-1))
    part = t[torch.tensor([4, 1])]
    torch.testing.assert_close(part.probs, t.probs[[4, 1]])
    torch.testing.assert_close(part.negent, t.negent[[4, 1]])
