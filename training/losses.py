"""The per-depth loss and accuracies every drafter's training shares.

A drafter predicts, at depth d (head d, slot d, prompt token d, the d-th
unrolled EAGLE step), the token d + 1 places past the one the target is
about to predict itself. Per depth:

* **loss**: cross-entropy on the labels mapped into the draft vocabulary
  (``"ce"``), or the KL divergence from the target's own distribution over
  the draft vocabulary (``"kl"``); summed over the valid positions and
  divided by their count (labels outside the draft vocabulary add no
  cross-entropy but still count: they are misses the drafter cannot avoid);
* **accuracy**: at how many valid positions the drafter's r-th choice is the
  label, for r < 5 (top-1 = rank 0; top-5 = ranks 0-4 together); an
  out-of-vocabulary label is a miss.

:class:`DepthAccuracy` accumulates both for training logs (per batch) and
for the held-out table every trained drafter ships in its config.

The KL loss is computed by one fused autograd function (:func:`kl_from_logits`): per position
KL = sum p log p - sum p z + logsumexp(z), with gradient softmax(z) - p. It makes two passes over the
[positions, V'] logits forward and one backward, where the composed ``log_softmax`` + ``kl_div`` made about
a dozen, and keeps one [positions, V'] tensor for backward. A method whose teacher serves several depths
(EAGLE's unrolled steps all read the same target distribution, shifted) builds a :class:`Teacher` once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TOPK", "DraftVocab", "Teacher", "kl_from_logits", "depth_loss", "DepthAccuracy"]

TOPK = 5


class DraftVocab(nn.Module):
    """Maps token ids to draft-vocabulary indices (-100: padding or outside the draft vocabulary)."""

    def __init__(self, vocab_size: int, draft_vocab: Tensor) -> None:
        super().__init__()
        lookup = torch.full((vocab_size,), -100, dtype=torch.long)
        lookup[draft_vocab] = torch.arange(draft_vocab.numel())
        self.register_buffer("lookup", lookup, persistent=False)

    def forward(self, labels: Tensor) -> Tensor:
        """labels [...] token ids (< 0: no label) -> [...] draft indices (-100: no label or out of the draft vocabulary)."""
        return torch.where(labels >= 0, self.lookup[labels.clamp(min=0)], torch.full_like(labels, -100))


class Teacher:
    """The target's distribution over the draft vocabulary at some positions: ``probs`` [..., V'] and its
    negative entropy ``negent`` [...] (sum p log p), computed once from its log-probabilities."""

    def __init__(self, probs: Tensor, negent: Tensor) -> None:
        self.probs, self.negent = probs, negent

    @classmethod
    @torch.no_grad()
    def from_logits(cls, logits: Tensor) -> "Teacher":
        """From the target's logits [..., V'] (normalised over the draft vocabulary)."""
        logp = torch.log_softmax(logits.float(), -1)
        probs = logp.exp()
        negent = torch.bmm(probs.reshape(-1, 1, probs.shape[-1]), logp.reshape(-1, probs.shape[-1], 1)).reshape(probs.shape[:-1])
        return cls(probs, negent)

    def __getitem__(self, index) -> "Teacher":
        return Teacher(self.probs[index], self.negent[index])


class _KLFromLogits(torch.autograd.Function):
    """KL(teacher || softmax(logits)) per row, fused (see the module docstring)."""

    @staticmethod
    def forward(ctx, logits: Tensor, probs: Tensor, negent: Tensor) -> Tensor:
        n, v = logits.shape
        z = logits.to(torch.float32, copy=True)
        cross = torch.bmm(z.view(n, 1, v), probs.view(n, v, 1)).view(n)
        top = z.amax(-1, keepdim=True)
        q = z.sub_(top).exp_()  # in place: z becomes the softmax
        total = q.sum(-1, keepdim=True)
        q.div_(total)
        ctx.save_for_backward(q, probs)
        ctx.logits_dtype = logits.dtype
        return negent - cross + top.view(n) + total.log().view(n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        q, probs = ctx.saved_tensors
        return (q - probs).mul_(grad[:, None]).to(ctx.logits_dtype), None, None


def kl_from_logits(logits: Tensor, teacher: Teacher) -> Tensor:
    """[N] KL(teacher || softmax(logits)) of logits [N, V'] against ``teacher`` (probs [N, V'], negent [N])."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32) + logits.sum() * 0
    return _KLFromLogits.apply(logits, teacher.probs.float().contiguous(), teacher.negent.float())


def depth_loss(logits: Tensor, mapped: Tensor, valid: Tensor, teacher_logp: "Tensor | Teacher | None" = None) -> Tensor:
    """One depth's loss, averaged over its valid positions.

    Args:
        logits: [..., V'] the drafter's logits over the draft vocabulary.
        mapped: [...] the labels as draft indices (-100: none, or out of the draft vocabulary).
        valid: [...] bool, the positions that have a label.
        teacher_logp: [..., V'] the target's log-probabilities there, or a :class:`Teacher` of them; given,
            the loss is KL(target || drafter) instead of cross-entropy on ``mapped``.
    """
    n = valid.sum().clamp(min=1)
    if teacher_logp is None:
        logits = logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), mapped.reshape(-1), ignore_index=-100, reduction="sum")
        return ce / n
    teacher = teacher_logp if isinstance(teacher_logp, Teacher) else Teacher.from_logits(teacher_logp)
    v = logits.shape[-1]
    rows = valid.reshape(-1)
    flat = Teacher(teacher.probs.reshape(-1, v), teacher.negent.reshape(-1))
    return kl_from_logits(logits.reshape(-1, v)[rows], flat[rows]).sum() / n


class DepthAccuracy:
    """Per depth, how often the drafter's r-th choice is the label (r < ``TOPK``), over everything added."""

    def __init__(self, depths: int) -> None:
        self.hits = torch.zeros(depths, TOPK)
        self.total = torch.zeros(depths)

    @torch.no_grad()
    def add(self, d: int, logits: Tensor, mapped: Tensor, valid: Tensor) -> None:
        """logits [..., V'], mapped [...] draft indices (-100: miss), valid [...] bool."""
        k = min(TOPK, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hit = (top == mapped[..., None]) & (mapped[..., None] >= 0) & valid[..., None]
        self.hits[d, :k] += hit.reshape(-1, k).sum(0).float().cpu()
        self.total[d] += float(valid.sum())

    def table(self) -> list[list[float]]:
        """acc[d][r]: the share of depth d's valid positions where its r-th choice is the label."""
        return (self.hits / self.total.clamp(min=1)[:, None]).tolist()

    def metrics(self) -> dict[str, Tensor]:
        """``head{d}_top1`` and ``head{d}_top5`` for the depths that saw a position (the names training logs use)."""
        out = {}
        for d in range(self.hits.shape[0]):
            if self.total[d] > 0:
                out[f"head{d}_top1"] = self.hits[d, 0] / self.total[d]
                out[f"head{d}_top5"] = self.hits[d].sum() / self.total[d]
        return out
