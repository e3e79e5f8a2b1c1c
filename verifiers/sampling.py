"""Sampling verifiers: lossless speculative sampling over token trees, and typical acceptance.

Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers
via Speculative Decoding"; Chen et al. 2023), extended to trees with several
children per node as in SpecInfer (Miao et al. 2024, multi-step speculative
sampling). Notation, used throughout:

* **p**: the target's distribution at a node, warped exactly as HF
  ``generate`` warps it (repetition penalty, temperature, top-k, top-p);
* **q**: the drafter's distribution that a child token was drawn from. A
  deterministic drafter (prompt lookup) proposes point masses, q = δ(x);
  a stochastic drafter supplies q rows in ``TokenTree.draft_probs``;
* **accepted**: a child x kept with probability min(1, p(x) / q(x));
* **residual**: after a rejection, p ← normalise(max(p − q, 0)), and the next
  child is tried against it;
* **recovered** token: drawn from the residual when every child is rejected;
* **bonus** token: drawn from p at a leaf reached by accepting a whole path.

Each emitted token is then distributed exactly as the target's own sample
(distinct point masses, or stochastic siblings drawn from q *without
replacement*, each child carrying q renormalised over the tokens its earlier
siblings did not take: recursive rejection sampling, Jeon et al. 2024. The
trie merges duplicate siblings, so i.i.d. draws with repeats are not exact).

Typical acceptance (Cai et al. 2024, Medusa) accepts x when
p(x) > min(ε, δ·exp(−H(p))): faster, but **lossy** (the output is not the
target's distribution); it is used only when asked for.

Worked example (point masses): p = [0.5, 0.3, 0.2] at the root, children
tokens 1 then 2. Child 1 is accepted with probability 0.3; if rejected the
residual is [0.5/0.7, 0, 0.2/0.7] and child 2 is accepted with probability
0.2/0.7; if that fails too, the recovered token is 0 (residual [1, 0, 0]).
Overall P(1) = 0.3, P(2) = 0.7·(0.2/0.7) = 0.2, P(0) = 0.5, exactly p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specdec.tree import TokenTree
from specdec.verifiers.base import Acceptance, deepest_accepted

__all__ = ["SamplingConfig", "Warper", "SpeculativeSampler", "KnowledgeTransferSampler", "TypicalVerifier"]


@dataclass
class SamplingConfig:
    """How p is formed from the target's logits (HF ``generate`` semantics)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")
        check_warping(self.top_k, self.top_p, self.repetition_penalty)


def check_warping(top_k: int | None, top_p: float | None, repetition_penalty: float | None) -> None:
    """The one check of the warping settings (GenerationConfig runs it too, before any model work)."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")


class Warper:
    """Turns [N, V] tree logits into [N, V] probabilities p with transformers' own logits processors."""

    def __init__(self, config: SamplingConfig) -> None:
        procs = []
        if config.repetition_penalty not in (None, 1.0):
            procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
        self.needs_context = bool(procs)
        if config.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None:
            procs.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            procs.append(TopPLogitsWarper(config.top_p))
        self.processors = LogitsProcessorList(procs)

    def __call__(self, tree: TokenTree, logits: Tensor, prefix_ids: Tensor | None) -> Tensor:
        """
        Args:
            tree: N nodes.
            logits: [N, V] target logits.
            prefix_ids: [T] committed tokens before the root (for the repetition penalty).
        Returns:
            [N, V] probabilities.
        """
        scores = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits.clone()
        if self.processors:
            context = self._context(tree, prefix_ids).to(scores.device)
            scores = self.processors(context, scores)
        return torch.softmax(scores, dim=-1)

    def _context(self, tree: TokenTree, prefix_ids: Tensor | None) -> Tensor:
        """[N, T + depth] ids each node has seen: prefix, then its root-to-node path
        (padded with the root token, which is already in every context and so changes no penalty)."""
        if not self.needs_context:
            return tree.tokens[:, None]
        prefix = prefix_ids if prefix_ids is not None else tree.tokens[:0]
        depth = int(tree.depths.max())
        path_tokens = torch.full((len(tree), depth + 1), int(tree.tokens[0]), dtype=torch.long)
        rows, cols = torch.nonzero(tree.ancestor_mask, as_tuple=True)
        path_tokens[rows, tree.depths[cols]] = tree.tokens[cols]
        return torch.cat([prefix[None].expand(len(tree), -1), path_tokens], dim=1)


def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs.to(torch.float64), 1, generator=generator))


class SpeculativeSampler:
    """Lossless speculative sampling over a tree (see the module docstring for the words used).

    One node's children are judged together: the residual each child is tried
    against depends only on the children before it (not on chance), so all of
    them, and one uniform draw per child, are computed at once on the model's
    device; the first child whose draw passes is accepted. One device -> host
    transfer per tree level, none per child.

    Args:
        config: the sampling settings that define p.
        residual: keep True. False drops the residual step (after a rejection
            the next child is tried against p itself), which biases the output;
            it exists only so that the statistical test can show it detects that.
    """

    def __init__(self, config: SamplingConfig, residual: bool = True) -> None:
        self.config, self.warp, self.residual = config, Warper(config), residual

    def accept(self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, prefix_ids: Tensor | None = None) -> Acceptance:
        p_all = self.target_probs(tree, logits, prefix_ids)  # [N, V] on the model's device
        aux = tree.auxiliary
        node, path = 0, [0]
        while True:
            p = p_all[node].to(torch.float64)
            kids = [c for c in tree.children[node] if aux is None or not bool(aux[c])]
            if not kids:  # a leaf: the bonus token from p
                return Acceptance(path=torch.tensor(path), bonus=_draw(p, generator))
            tokens = tree.tokens[kids].to(p.device)  # [k]
            q = self._q(tree, kids, p)  # [k, V]
            tried, after = self._residuals(p, q)  # [k, V] what child j is tried against; [V] after all k rejected
            px = tried.gather(1, tokens[:, None]).squeeze(1)
            qx = q.gather(1, tokens[:, None]).squeeze(1)
            u = torch.rand(len(kids), generator=generator, dtype=torch.float64, device=p.device)
            passed = (u * qx < px).cpu()  # accepted: u < p(x) / q(x)
            if not bool(passed.any()):  # every child rejected: the recovered token from the residual
                return Acceptance(path=torch.tensor(path), bonus=_draw(after, generator))
            node = kids[int(torch.argmax(passed.to(torch.int8)))]
            path.append(node)

    def target_probs(self, tree: TokenTree, logits: Tensor, prefix_ids: Tensor | None) -> Tensor:
        """[N, V] the distribution each node's children are judged against: the target's own, warped."""
        return self.warp(tree, logits, prefix_ids)

    def _residuals(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """Child j is tried against r_j: r_0 = p, r_{j+1} = normalise(max(r_j - q_j, 0)) (r_j if that is empty)."""
        rows, r = [], p
        for qj in q:
            rows.append(r)
            if self.residual:
                res = torch.clamp(r - qj, min=0.0)
                total = res.sum()
                r = torch.where(total > 0, res / total.clamp(min=1e-300), r)
        return torch.stack(rows), r

    @staticmethod
    def _q(tree: TokenTree, kids: list[int], p: Tensor) -> Tensor:
        """[k, V] q for the children: their drafter's rows in ``draft_probs``, or point masses at their tokens."""
        if tree.draft_probs is not None:
            return tree.draft_probs[kids].to(p.device, torch.float64)
        q = torch.zeros(len(kids), p.shape[0], dtype=torch.float64, device=p.device)
        q[torch.arange(len(kids), device=p.device), tree.tokens[kids].to(p.device)] = 1.0
        return q


class KnowledgeTransferSampler(SpeculativeSampler):
    """RAPID's knowledge transfer (Chen et al., 2025), selected with ``acceptance="rapid"``: **lossy**.

    Speculative sampling against a target distribution tilted toward the drafter's: at a node whose children
    were drawn from q (the first child's ``draft_probs`` row; later siblings carry q without the earlier draws),
    the target's warped distribution p becomes softmax(log p - strength * (p - q) * m), where the mask m keeps
    the tokens the drafter finds plausible (q >= threshold * max q) and leaves the others alone. The shift is
    at most ``strength`` in logit space; where the retrieval drafter read the relevant part of a long input
    better than the target attended to it, the output leans toward it (RAPID reports better answers on long
    inputs as well as more accepted drafts). Nodes without a drafter distribution (point-mass drafters, leaves)
    keep p. Strength 0 is exactly :class:`SpeculativeSampler`.
    """

    def __init__(self, config: SamplingConfig, strength: float = 1.0, threshold: float = 0.1) -> None:
        if strength < 0 or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"knowledge transfer needs strength >= 0 and threshold in [0, 1], got {strength}, {threshold}")
        super().__init__(config)
        self.strength, self.threshold = strength, threshold

    def target_probs(self, tree: TokenTree, logits: Tensor, prefix_ids: Tensor | None) -> Tensor:
        p = self.warp(tree, logits, prefix_ids)
        if self.strength == 0 or tree.draft_probs is None:
            return p
        aux = tree.auxiliary
        first = [min((c for c in kids if aux is None or not bool(aux[c])), default=-1)  # children are numbered in draw order
                 for kids in tree.children]
        nodes = [n for n, c in enumerate(first) if c >= 0]
        if not nodes:
            return p
        q = tree.draft_probs[[first[n] for n in nodes]].to(p.device, p.dtype)  # [M, V]
        pn = p[nodes]
        mask = q >= self.threshold * q.max(-1, keepdim=True).values
        tilted = torch.log(pn.clamp_min(1e-30)) - self.strength * torch.where(mask, pn - q, torch.zeros_like(q))
        p = p.clone()
        p[nodes] = torch.softmax(tilted, -1)
        return p


class TypicalVerifier:
    """Medusa's typical acceptance: lossy, selected explicitly with ``acceptance="typical"``.

    A node x is plausible when p(x) > min(epsilon, delta * exp(-H(p))) under
    its parent's p; the deepest node whose whole path is plausible is kept,
    and the bonus token is sampled from p there.
    """

    def __init__(self, config: SamplingConfig, epsilon: float = 0.09, delta: float = 0.3) -> None:
        if not 0 < epsilon <= 1 or delta <= 0:
            raise ValueError(f"typical acceptance needs 0 < epsilon <= 1 and delta > 0, got {epsilon}, {delta}")
        self.config, self.warp, self.epsilon, self.delta = config, Warper(config), epsilon, delta

    def accept(self, tree: TokenTree, logits: Tensor, generator: torch.Generator | None = None, prefix_ids: Tensor | None = None) -> Acceptance:
        p = self.warp(tree, logits, prefix_ids)  # [N, V] on the model's device
        entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [N]
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)  # [N]
        par, toks = tree.parents[1:].to(p.device), tree.tokens[1:].to(p.device)
        ok = torch.ones(len(tree), dtype=torch.bool)
        ok[1:] = (p[par, toks] > threshold[par]).cpu()
        best = deepest_accepted(tree, ok)
        return Acceptance(path=tree.path_to(best), bonus=_draw(p[best], generator))
