"""PPD: parallel prompt decoding (Chen et al., 2024, "Hardware-Aware Parallel Prompt Decoding for
Memory-Efficient Acceleration of LLM Inference").

A few trained **prompt tokens** (input embeddings, ~0.0002% of the model) ride
along inside the verifying forward; their outputs guess the tokens 2, 3, …
positions ahead, and become the next step's drafts. Drafting costs no extra
pass, which matters most where every forward is expensive (a CPU).

How prompt tokens ride in the verify pass (specdec's drafter contract):

* below a tree node n at depth d hang ``m`` prompt tokens as a chain of
  **auxiliary** nodes (``TokenTree.auxiliary``) whose inputs are the prompt
  embeddings (``TokenTree.input_embeds``): prompt token i sits at position
  ``prefix + d + i`` and sees n, n's ancestors and the prompt tokens before it
  (causal). With ``v`` > 1 virtual tokens per prompt token (the ensemble
  variant), v such chains hang below n, and each prompt token's logits are the
  mean (or a learnt convex mix) of its v virtual tokens' logits;
* the verifiers never accept an auxiliary node and the commit never keeps its
  KV; the engine trims them away with the node they hang below;
* after the step the target's logits at the prompt tokens below the **last
  accepted node** come back (``result.aux_logits``): prompt token i's output
  guesses the token i + 1 places after that node, i.e. depth i of the next
  tree, whose root is the bonus token.

The next tree (the **dynamic sparse tree**): the candidate tokens at depth i
are the top-k of prompt token i's distribution; which (depth, rank) nodes to
keep comes from held-out per-depth top-k accuracies (measured when the tokens
were trained): Medusa-style greedy construction of the tree that maximises
the expected accepted length for each node budget; the engine then keeps the
budget that maximises expected tokens per unit of measured cost (the
hardware-aware part, :mod:`specdec.sizing`, with running acceptance estimates
per (depth, rank) learnt from the target's verdicts). Which nodes carry
prompt tokens, and how many, is chosen per step from the same cost
(:meth:`PPDDrafter.prompt_plan`): the nodes most likely to be the last
accepted one, as long as what their guesses are worth to the next step
repays the nodes they add to this one; when the last accepted node carried
none, the next step drafts nothing and re-attaches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from specdec.drafters.base import (DraftState, Drafter, StepResult, Target, config_from_options, drafter_path,
                                   read_drafter_config_versioned, read_drafter_weights, register_drafter, write_drafter)
from specdec.drafters.medusa import tree_from_accuracies
from specdec.sizing import AcceptanceRates, learn
from specdec.tree import TokenTree, parents_from_paths

__all__ = ["PPDConfig", "PromptTokens", "PPDDrafter", "attach_prompt_tokens"]

FORMAT_VERSION = 1


@dataclass
class PPDConfig:
    """What ``config.json`` holds."""

    hidden_size: int
    vocab_size: int
    num_prompt_tokens: int = 3  # m
    num_virtual: int = 1  # v: virtual tokens per prompt token (the ensemble variant when > 1)
    aggregation: str = "mean"  # "mean" or "learned" (ensemble only)
    target_model: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # heldout_accuracy [m][topk], init text, training time

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1 or self.num_virtual < 1:
            raise ValueError("num_prompt_tokens and num_virtual must be >= 1")
        if self.aggregation not in ("mean", "learned"):
            raise ValueError(f"aggregation must be 'mean' or 'learned', got {self.aggregation!r}")


class PromptTokens(nn.Module):
    """The trained parameters: embeddings [m, v, H] and, for learned aggregation, mixing logits [m, v]."""

    def __init__(self, config: PPDConfig, init: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        m, v, h = config.num_prompt_tokens, config.num_virtual, config.hidden_size
        self.embeds = nn.Parameter(init.reshape(m, v, h).clone() if init is not None else torch.randn(m, v, h) * 0.02)
        self.mix = nn.Parameter(torch.zeros(m, v)) if config.aggregation == "learned" else None

    def aggregate(self, logits: Tensor) -> Tensor:
        """[..., m, v, V] per-virtual-token logits → [..., m, V] per prompt token."""
        if self.config.num_virtual == 1:
            return logits[..., 0, :]
        if self.mix is None:
            return logits.mean(dim=-2)
        w = torch.softmax(self.mix, -1).to(logits.dtype)
        return (logits * w[..., None]).sum(dim=-2)

    def save_pretrained(self, path: str | Path) -> None:
        write_drafter(path, self.config, self)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "PromptTokens":
        path = Path(path)
        raw = read_drafter_config_versioned(path, FORMAT_VERSION, "PPD")
        config = PPDConfig(**{k: v for k, v in raw.items() if k in PPDConfig.__dataclass_fields__})
        tokens = cls(config)
        state = read_drafter_weights(path / "model.safetensors")
        try:
            tokens.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{path / 'model.safetensors'} does not match its config.json: {str(err).splitlines()[0]}") from None
        return tokens.eval()


def attach_prompt_tokens(tree: TokenTree, nodes: list[int], embeds: Tensor) -> TokenTree:
    """Hang a chain of prompt tokens below each of ``nodes``: v chains of m auxiliary nodes each.

    Args:
        tree: a tree without auxiliary nodes.
        nodes: where to attach (node indices of ``tree``).
        embeds: [m, v, H] the prompt embeddings.

    Returns:
        The tree with the chains appended after the original nodes (so the original indices stay), marked
        auxiliary, with their embeddings in ``input_embeds``; chain order: node by node, then virtual token
        j, then prompt token i.
    """
    m, v, h = embeds.shape
    n0 = len(tree)
    tokens, parents, rows = tree.tokens.tolist(), tree.parents.tolist(), []
    for node in nodes:
        for j in range(v):
            prev = node
            for i in range(m):
                tokens.append(0)  # a placeholder: the embedding, not the token, goes in
                parents.append(prev)
                prev = len(tokens) - 1
                rows.append(embeds[i, j])
    n = len(tokens)
    aux = torch.zeros(n, dtype=torch.bool)
    aux[n0:] = True
    inputs = torch.zeros(n, h, dtype=embeds.dtype)
    if rows:
        inputs[n0:] = torch.stack(rows)
    scores = None
    if tree.scores is not None:
        scores = torch.cat([tree.scores, torch.zeros(n - n0, dtype=tree.scores.dtype)])
    return TokenTree(torch.tensor(tokens), torch.tensor(parents), auxiliary=aux, input_embeds=inputs, scores=scores,
                     sources=None if tree.sources is None else torch.cat([tree.sources, torch.full((n - n0,), -1)]))


@dataclass
class PPDDrafterConfig:
    """Spec options: ``ppd:PATH,attach=1,topk=8,tree=64``."""

    attach: int = 1  # draft nodes (besides the root) that may carry prompt tokens
    topk: int = 8  # candidates per depth
    tree: int = 64  # size of the candidate sparse tree (the engine trims it to what pays)
    decay: float = 0.97  # the prompt tokens' hit rates are a property of the tokens: a long memory
    prompts: int = 0  # prompt tokens attached per carrier: 0 = chosen each step from the measured cost (all m without one)
    min_score: float = 0.05  # drafts below this acceptance estimate are expected to be trimmed (for the cost estimate)

    def __post_init__(self) -> None:
        if self.attach < 0 or self.topk < 1 or self.tree < 1 or self.prompts < 0:
            raise ValueError("ppd options need attach >= 0, topk >= 1, tree >= 1 and prompts >= 0")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


# per-depth top-k accuracies to build sparse trees from when a checkpoint has none measured
_FALLBACK_ACCURACY = [[0.35, 0.08, 0.04, 0.03, 0.02], [0.2, 0.06, 0.03, 0.02, 0.02], [0.12, 0.04, 0.03, 0.02, 0.01]]


def _shape(paths: list[tuple[int, ...]]) -> tuple[Tensor, list[int], list[int]]:
    """(parents, depth, choice) per node of the tree of ``paths`` (node 0: the root)."""
    parents, choices = parents_from_paths(paths)
    depths = TokenTree(torch.zeros_like(parents), parents).depths
    return parents, depths.tolist(), choices.tolist()


@register_drafter("ppd")
class PPDDrafter(Drafter):
    """Drafts from the outputs of prompt tokens that rode in the previous verify pass."""

    name = "ppd"

    def __init__(self, tokens: PromptTokens, options: PPDDrafterConfig | None = None) -> None:
        self.tokens = tokens.eval()
        self.options = options or PPDDrafterConfig()
        self.vocab_size = tokens.config.vocab_size
        m = tokens.config.num_prompt_tokens
        acc = tokens.config.extra.get("heldout_accuracy") or _FALLBACK_ACCURACY
        self.accuracy = [row[: self.options.topk] for row in (acc + [acc[-1]] * m)[:m]]
        # one sparse tree per number of prompt tokens that rode below the accepted node (k guesses: depth <= k)
        self.shapes = {k: _shape(tree_from_accuracies(self.accuracy[:k], self.options.tree)) for k in range(1, m + 1)}
        self.rates = AcceptanceRates(self._prior, self.options.decay)
        self._guesses: Tensor | None = None  # [k, topk] candidate ids from the last accepted node's prompt tokens
        self._keys: dict = {}

    @classmethod
    def from_spec(cls, args: list[str], kwargs: dict[str, str]) -> "PPDDrafter":
        path = drafter_path(args, "ppd-smollm2-135m", cls.name, kwargs)
        return cls(PromptTokens.from_pretrained(path), config_from_options(PPDDrafterConfig, kwargs, cls.name))

    def sparse_trees(self, budgets: tuple[int, ...] = (2, 4, 8, 16, 32)) -> dict[int, dict[int, list[tuple[int, ...]]]]:
        """The offline sparse trees: for k prompt tokens below the accepted node and each node budget, the draft
        paths as rank tuples (``(0, 1)``: top-1 at depth 1, then rank 2 at depth 2), best first."""
        return {k: {b: tree_from_accuracies(self.accuracy[:k], b) for b in budgets} for k in self.shapes}

    def _prior(self, key: tuple[int, int]) -> float:
        depth, choice = key
        acc = self.accuracy
        p = acc[depth - 1][choice] if depth - 1 < len(acc) and choice < len(acc[depth - 1]) else 0.01
        parent = acc[depth - 2][0] if depth >= 2 else 1.0
        return min(0.95, p / max(parent, 1e-3)) if depth >= 2 else p  # conditional on the parent being right

    def bind(self, target: Target) -> None:
        super().bind(target)
        if target.hidden_size != self.tokens.config.hidden_size:
            raise ValueError(f"PPD prompt tokens were trained for hidden size {self.tokens.config.hidden_size}, "
                             f"the target has {target.hidden_size}; use prompt tokens trained for this model")
        if target.input_embeddings is None:
            raise ValueError("PPD needs a target whose input embeddings it can feed (get_input_embeddings)")
        self.tokens.to(dtype=target.dtype)

    def reset(self, prompt_ids: Tensor) -> None:
        self._guesses, self._keys = None, {}
        self.rates = AcceptanceRates(self._prior, self.options.decay)

    def propose(self, state: DraftState) -> TokenTree:
        embeds = self.tokens.embeds.detach()
        self._keys = {}
        if self._guesses is None:  # nothing to draft yet: only the prompt tokens ride along
            tree = TokenTree.root_only(state.root)
        else:
            g = self._guesses
            parents, depth, choice = self.shapes[g.shape[0]]
            tokens = [state.root] + [int(g[d - 1, c]) for d, c in zip(depth[1:], choice[1:])]
            tree = TokenTree(torch.tensor(tokens), parents)
            keys = list(zip(depth, choice))
            tree.scores = torch.tensor(self.rates.path_scores(parents.tolist(), keys))
            paths = tree.token_paths
            self._keys = {paths[i]: keys[i] for i in range(1, len(tree))}
        carriers, count = self.prompt_plan(tree)
        return attach_prompt_tokens(tree, carriers, embeds[:count]) if count else tree

    def prompt_plan(self, tree: TokenTree) -> tuple[list[int], int]:
        """Which nodes carry prompt tokens this step, and how many each (the hardware-aware part for the prompts).

        The prompt tokens below a node pay off only if that node ends up the **last accepted** one (its chain
        then drafts the next step); a node is the last accepted with about its acceptance estimate minus its
        children's (the root: 1 minus its children's). The candidates are the ``attach`` + 1 nodes most likely
        to be last (the root among them); for the c most likely of them and i prompt tokens each, the value is

            P(one of the c is last) · Σ_{j<=i} (chain_j − (v(1 + j) − v(j)))  −  (v(base + c·i·v') − v(base))

        where chain_j is the running estimate that the top-1 guesses down to depth j are right, v(1 + j) −
        v(j) what the j-th guess will cost the next forward, ``base`` the nodes this tree is expected to
        keep (scores >= ``min_score``) and v' the virtual tokens per prompt token. The best (c, i) wins, and
        (none, 0), a step without prompt tokens, when nothing is positive: on a CPU where a third node costs
        far more than a second, steps with guesses then run without prompt tokens and the next one re-attaches.
        Without a measured cost (or with ``prompts=N``) the root and the ``attach`` most likely drafts carry
        all m (or N).
        """
        m, virtual = self.tokens.config.num_prompt_tokens, self.tokens.config.num_virtual
        scores = tree.scores.tolist() if tree.scores is not None else [1.0] * len(tree)
        scores[0] = 1.0
        kept = [0] + [i for i in range(1, len(tree)) if scores[i] >= self.options.min_score]
        cost = getattr(self, "target", None) and self.target.cost
        if self.options.prompts or cost is None:
            drafts = sorted(kept[1:], key=lambda i: (-scores[i], i))[: self.options.attach]
            return [0] + sorted(drafts), min(self.options.prompts or m, m)
        last = {i: scores[i] for i in kept}  # P(node is the last accepted) = its estimate - its kept children's
        for i in kept[1:]:
            last[int(tree.parents[i])] -= scores[i]
        candidates = sorted(kept, key=lambda i: (-last[i], i))[: self.options.attach + 1]
        base = len(kept)
        net, chain, nets = 0.0, 1.0, []
        for j in range(1, m + 1):
            chain *= self.rates[(j, 0)]
            net += chain - (cost(1 + j) - cost(j))
            nets.append(net)
        best, best_value, p = ([], 0), 0.0, 0.0
        for c in range(1, len(candidates) + 1):
            p += max(last[candidates[c - 1]], 0.0)
            for i in range(1, m + 1):
                value = p * nets[i - 1] - (cost(base + c * i * virtual) - cost(base))
                if value > best_value + 1e-12:
                    best, best_value = (sorted(candidates[:c]), i), value
        return best

    def observe(self, result: StepResult) -> None:
        if self._keys:
            learn(self.rates, self._keys, result.tree, result.path)
        else:  # a step without guesses judged nothing: let the estimates drift back toward the prior, or a bad
            for key in list(self.rates.counts):  # patch that stopped the prompt tokens would stop them for good
                self.rates.relax(key)
        self._guesses = self._read_guesses(result)

    def _read_guesses(self, result: StepResult) -> Tensor | None:
        """The top-k candidates per depth from the prompt tokens below the last accepted node (None if it has none)."""
        tree, last = result.tree, int(result.path[-1])
        if tree.auxiliary is None or result.aux_logits is None:
            return None
        m, v = self.tokens.config.num_prompt_tokens, self.tokens.config.num_virtual
        aux_index = torch.full((len(tree),), -1, dtype=torch.long)
        aux_index[tree.auxiliary] = torch.arange(int(tree.auxiliary.sum()))
        kids = [c for c in tree.children[last] if bool(tree.auxiliary[c])]
        if len(kids) != v:
            return None
        rows = []
        for first in kids:  # walk each virtual chain: prompt token 1, 2, ..., m
            chain, node = [], first
            while True:
                chain.append(int(aux_index[node]))
                nxt = [c for c in tree.children[node] if bool(tree.auxiliary[c])]
                if not nxt or len(chain) == m:
                    break
                node = nxt[0]
            if rows and len(chain) != len(rows[0]):
                return None
            rows.append(chain)
        k = len(rows[0])  # the prompt tokens that rode below it this step
        logits = result.aux_logits[torch.tensor(rows).T.reshape(-1)].reshape(k, v, -1)  # [k, v, V]
        with torch.no_grad():
            agg = self.tokens.aggregate(logits.float())
        return agg.topk(self.options.topk, dim=-1).indices.cpu()
