"""Training the EAGLE-3-class drafter (:mod:`specdec.drafters.eagle`) with training-time test.

Data: the frozen target's features in a :class:`~specdec.training.features.FeatureStore` (extracted once,
shared with the other methods): the drafter's low/mid/high layers and the last layer (whose product with the
target's output rows gives the target's own distribution over the draft vocabulary, the KL teacher). With
``features: online`` (:class:`OnlineFeatures`) the target computes the same arrays inside every step instead,
on the training device: no store, no disk, the choice on a GPU.

Training-time test (EAGLE-3; HASS): the layer is unrolled for ``depth`` steps over every position t of a
sequence at once. Step 0 reads the fused target state g_t and token x_{t+1} at position t; step j reads the
layer's own step-(j-1) output at index t and token x_{t+1+j} at position t + j, and attends to step 0's
entries at positions <= t and to the entries of its own chain (steps 1..j at index t), exactly what drafting
depth j + 1 sees at inference. Step j at index t predicts x_{t+2+j}; its loss is KL to the target's
distribution at position t + 1 + j (or cross-entropy on the target's greedy token there), on positions inside
assistant answers, weighted ``loss_decay ** j``. Gradients flow through the unrolled steps.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.eagle import EagleConfig, EagleModel
from specdec.training.config import TrainConfig
from specdec.training.losses import DepthAccuracy, DraftVocab, Teacher, depth_loss

__all__ = ["EagleModule", "OnlineFeatures", "train_eagle", "eagle_heldout_accuracy", "collate_store"]

log = logging.getLogger(__name__)


def collate_store(items: list[dict], num_features: int) -> dict:
    """Pad store items: features [B, T, F·H] (the drafter's layers), last [B, T, H] (the last layer), ids [B, T],
    labels [B, T] (-100 past each end), answer [B, T] bool."""
    t = max(it["ids"].numel() for it in items)
    b, h = len(items), items[0]["hidden"].shape[-1]
    feats = torch.zeros(b, t, num_features * h)
    last = torch.zeros(b, t, h)
    ids = torch.zeros(b, t, dtype=torch.long)
    labels = torch.full((b, t), -100, dtype=torch.long)
    answer = torch.zeros(b, t, dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["ids"].numel()
        feats[i, :n] = it["hidden"][:, :num_features].reshape(n, -1)
        last[i, :n] = it["hidden"][:, num_features]
        ids[i, :n], labels[i, :n], answer[i, :n] = it["ids"], it["labels"], it["answer"]
    return {"features": feats, "last": last, "ids": ids, "labels": labels, "answer": answer}


def _shift(x: Tensor, j: int, length: int, fill) -> Tensor:
    """x[:, j : j + length], padded with ``fill`` past the end: [B, length, ...]."""
    part = x[:, j : j + length]
    if part.shape[1] == length:
        return part
    pad = x.new_full((x.shape[0], length - part.shape[1], *x.shape[2:]), fill)
    return torch.cat([part, pad], 1)


def ttt_attend(q: Tensor, k0: Tensor, v0: Tensor, ks: list[Tensor], vs: list[Tensor], visible: Tensor) -> Tensor:
    """Attention of step j's queries q [B, Hq, S, D] (S: every index, or a sample of them) over step 0's keys
    k0/v0 [B, Hkv, T, D] (where ``visible`` [B, S, T] allows) and, index by index, over the chain's own entries
    ks/vs (steps 1..j, each [B, Hkv, S, D]) -> [B, S, Hq·D]."""
    b, _, t, _ = q.shape
    n0 = k0.shape[2]  # step 0's entries (the queries may be a sample of the positions)
    if not ks:  # step 0: masked attention (SDPA's flash kernel on the CPU keeps nothing [T, T] for backward)
        out = F.scaled_dot_product_attention(q, k0, v0, attn_mask=visible[:, None], enable_gqa=True)
        return out.transpose(1, 2).reshape(b, t, -1)
    rep = q.shape[1] // k0.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1])
    k0, v0 = k0.repeat_interleave(rep, 1), v0.repeat_interleave(rep, 1)
    s0 = (q @ k0.transpose(-1, -2)).mul_(scale).masked_fill_(~visible[:, None], torch.finfo(q.dtype).min)
    kd = torch.stack([k.repeat_interleave(rep, 1) for k in ks], -2)  # [B, Hq, T, j, D]
    chain = (q[..., None, :] * kd).sum(-1) * scale  # [B, Hq, T, j]
    p = torch.softmax(torch.cat([s0, chain], -1), -1, dtype=torch.float32).to(q.dtype)
    vd = torch.stack([v.repeat_interleave(rep, 1) for v in vs], -2)
    out = p[..., :n0] @ v0 + (p[..., n0:, None] * vd).sum(-2)
    return out.transpose(1, 2).reshape(b, t, -1)



class EagleModule(nn.Module):
    """The drafter unrolled for training-time test; ``forward`` gives the loss and per-step accuracies."""

    accepts_loss_kwargs = True

    def __init__(self, model: EagleModel, target_rows: Tensor, vocab_size: int, steps: int, decay: float, distill: bool,
                 positions: int = 0) -> None:
        super().__init__()
        self.model, self.steps, self.decay, self.distill = model, steps, decay, distill
        self.positions = positions  # > 0: steps 1.. run at this many sampled answer positions per sequence
        self.vocab = DraftVocab(vocab_size, model.draft_vocab)
        self.register_buffer("target_rows", target_rows, persistent=False)  # [V', H] the target's head, draft vocabulary

    def unroll(self, features: Tensor, ids: Tensor, labels: Tensor, answer: Tensor | None = None, positions: int = 0):
        """Yield (j, h [B, S, H], at [B, S], sampled [B, S] bool) for each unrolled step: the layer's output at
        indices ``at``, whose logits (``model.logits(h)``) at index t predict x_{t+2+j}.

        Step 0 runs at every index (S = T - 1; its entries are what the later steps attend to). With
        ``positions`` > 0 (and ``answer``), steps 1.. run only at that many indices per sequence, drawn at random
        among those whose step-1 target lies in an answer (``sampled`` False: a filler index of a short
        sequence): the chains there compute exactly what they compute in the full unroll, for a fraction of
        the cost."""
        m = self.model
        tp = ids.shape[1] - 1
        real = labels[:, :tp] >= 0
        visible = torch.ones(tp, tp, dtype=torch.bool, device=ids.device).tril()[None] & real[:, None, :]
        visible = visible | torch.eye(tp, dtype=torch.bool, device=ids.device)[None]  # no empty row on padding
        state = m.fuse(features[:, :tp])
        at = torch.arange(tp, device=ids.device)[None].expand(ids.shape[0], -1)
        sampled = torch.ones_like(at, dtype=torch.bool)
        k0 = v0 = None
        ks: list[Tensor] = []
        vs: list[Tensor] = []
        for j in range(self.steps):
            if tp - j <= 0:
                break
            if j == 1 and 0 < positions < tp and answer is not None:
                want = (_shift(labels, 2, tp, -100) >= 0) & _shift(answer, 2, tp, False)
                score = torch.rand(want.shape, device=ids.device) + want  # wanted indices first, in random order
                at = score.topk(positions, -1).indices.sort(-1).values
                sampled = want.gather(1, at)
                state = state.gather(1, at[..., None].expand(-1, -1, state.shape[-1]))
                visible = visible.gather(1, at[..., None].expand(-1, -1, tp))
            tokens = _shift(ids, 1 + j, tp, 0).gather(1, at)
            q, k, v = m.project(state, tokens, at + j)
            if j == 0:
                k0, v0 = k, v
            else:
                ks.append(k)
                vs.append(v)
            state = m.finish(ttt_attend(q, k0, v0, ks, vs, visible), state)
            yield j, state, at, sampled

    def targets(self, labels: Tensor, answer: Tensor, j: int, at: Tensor, sampled: Tensor) -> tuple[Tensor, Tensor]:
        """Step j's labels at indices ``at`` [B, S] as draft indices [B, S] and where they count (inside answers,
        at sampled indices) [B, S] bool."""
        tp = labels.shape[1] - 1
        target = _shift(labels, 1 + j, tp, -100).gather(1, at)
        ok = (target >= 0) & _shift(answer, 1 + j, tp, False).gather(1, at) & sampled
        return self.vocab(torch.where(ok, target, torch.full_like(target, -100))), ok

    def forward(self, features: Tensor, last: Tensor, ids: Tensor, labels: Tensor, answer: Tensor, num_items_in_batch=None) -> dict:
        loss = features.new_zeros(())
        acc = DepthAccuracy(self.steps)
        teacher = where = None
        if self.distill:  # the target's distribution over the draft vocabulary, once, at the answer positions only
            where = torch.full(answer.shape, -1, dtype=torch.long, device=answer.device)
            where[answer] = torch.arange(int(answer.sum()), device=answer.device)
            with torch.no_grad():
                teacher = Teacher.from_logits(last[answer].float() @ self.target_rows.float().T)  # [answer positions, V']
        for j, h, at, sampled in self.unroll(features, ids, labels, answer, self.positions if self.training else 0):
            mapped, ok = self.targets(labels, answer, j, at, sampled)
            logits = self.model.logits(h[ok])  # only where a loss is taken: the head is most of the cost
            te = None
            if teacher is not None:  # step j at index t is taught by the target at position t + 1 + j (an answer position)
                b, s = ok.nonzero(as_tuple=True)
                te = teacher[where[b, at[b, s] + 1 + j]]
            valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
            loss = loss + self.decay**j * depth_loss(logits, mapped[ok], valid, te)
            acc.add(j, logits.detach(), mapped[ok], valid)
        return {"loss": loss, "metrics": acc.metrics()}


class OnlineFeatures(nn.Module):
    """:class:`EagleModule` fed by the frozen ``target`` run inside each step (``features: online``): the
    batch holds tokens only (:func:`~specdec.training.common.collate_tokens`), and the target computes what a
    feature store would hold for them (its layers, the last layer, its greedy labels). The target is kept
    outside the module's parameters (never trained, never saved in a checkpoint) and follows the batch's device."""

    accepts_loss_kwargs = True

    def __init__(self, inner: EagleModule, target: nn.Module, layers: list[int], label_source: str = "self") -> None:
        super().__init__()
        self.inner, self.layers, self.label_source = inner, list(layers), label_source
        self._target = (target,)

    @torch.no_grad()
    def features(self, ids: Tensor, answer: Tensor, real: Tensor) -> dict:
        """What :func:`collate_store` gives for these tokens: features [B, T, F·H] (the drafter's layers),
        last [B, T, H], ids, labels [B, T] (the target's greedy next token, or the data's; -100 past each
        end), answer."""
        from specdec.runner import tapped_forward

        target = self._target[0]
        if target.device != ids.device:
            target.to(ids.device)
        b, t = ids.shape
        out, hidden = tapped_forward(target, tuple(self.layers), input_ids=ids, use_cache=False)
        hidden = hidden.view(b, t, len(self.layers), -1).float()
        if self.label_source == "data":
            labels = torch.cat([ids[:, 1:], ids.new_full((b, 1), -100)], 1)
            labels = labels.masked_fill(~torch.cat([real[:, 1:], real.new_zeros(b, 1)], 1), -100)
        else:
            labels = out.logits.argmax(-1)
        labels = labels.masked_fill(~real, -100)
        return {"features": hidden[:, :, :-1].reshape(b, t, -1), "last": hidden[:, :, -1], "ids": ids, "labels": labels,
                "answer": answer & real}

    def forward(self, ids: Tensor, answer: Tensor, real: Tensor, num_items_in_batch=None) -> dict:
        return self.inner(**self.features(ids, answer, real), num_items_in_batch=num_items_in_batch)


@torch.inference_mode()
def eagle_heldout_accuracy(module: EagleModule, batches) -> list[list[float]]:
    """acc[j][r]: share of held-out answer positions where unrolled step j's r-th choice is the target's token.
    ``batches``: dicts as :func:`collate_store` makes them (moved to the module's device here)."""
    acc = DepthAccuracy(module.steps)
    device = module.target_rows.device
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        for j, h, at, sampled in module.unroll(b["features"], b["ids"], b["labels"]):
            mapped, ok = module.targets(b["labels"], b["answer"], j, at, sampled)
            acc.add(j, module.model.logits(h[ok]).float(), mapped[ok], torch.ones(int(ok.sum()), dtype=torch.bool, device=device))
    return acc.table()


def train_eagle(cfg: TrainConfig) -> Path:
    """Train the EAGLE drafter as ``cfg`` says; returns the directory of the final drafter."""
    from specdec.drafters.base import add_draft_counts
    from specdec.training.common import draft_vocabulary, fit, label_counts, run_record, start_run, target_features

    from specdec.training.common import collate_tokens, token_items, training_device

    out, model, tokenizer, heldout_convs, train_convs = start_run(cfg)
    start = _initial(cfg, model)
    ecfg = start.config if start is not None else EagleConfig.for_target(model, feature_layers=cfg.eagle.layers or None,
                                                                         ttt_steps=cfg.depth, target_model=str(cfg.model))
    ecfg.ttt_steps = cfg.depth
    layers = list(ecfg.feature_layers) + [-1]
    online = cfg.features == "online"
    if online:
        held, train = token_items(tokenizer, heldout_convs + train_convs, cfg, min_len=3)
    else:
        held, train = target_features(model, tokenizer, heldout_convs + train_convs, cfg, layers, min_len=3)
    head = model.get_output_embeddings().weight.detach().clone()
    counts = label_counts(train.label_sets(), head.shape[0])
    if start is not None:
        draft_vocab, eagle = start.draft_vocab.clone(), start
    else:
        draft_vocab = draft_vocabulary(counts, cfg.draft_vocab_size)
        ecfg.draft_vocab_size = None if cfg.draft_vocab_size is None else draft_vocab.numel()
        eagle = EagleModel(ecfg, draft_vocab, head[draft_vocab].float().clone())
    add_draft_counts(eagle, counts[draft_vocab])
    rows = head[draft_vocab].float().clone()
    eagle.train().attach(model.get_input_embeddings())
    module = EagleModule(eagle, rows, head.shape[0], cfg.depth, cfg.loss_decay, cfg.loss_type == "kl", cfg.eagle.ttt_positions)
    nf = len(ecfg.feature_layers)
    device = training_device()
    if online:  # the target runs inside the steps, on the training device, in the feature dtype
        model.to(device=device, dtype=_online_dtype(cfg, model, device))
        wrapped = OnlineFeatures(module, model, layers, cfg.label_source)
        trainer = fit(wrapped, train, collate_tokens, cfg, out, sampler=train.sampler(cfg))
        held_batches = (wrapped.features(**{k: v.to(device) for k, v in collate_tokens([it]).items()}) for it in held)
    else:
        model.get_input_embeddings().to(device)  # the drafter reads the target's embedding where it trains
        trainer = fit(module, train, lambda items: collate_store(items, nf), cfg, out, sampler=train.sampler(cfg))
        held_batches = (collate_store([it], nf) for it in held)
    final = out / "final"
    if trainer.is_world_process_zero():
        eagle.eval()
        if len(held):
            table = eagle_heldout_accuracy(module, held_batches)
            ecfg.extra["heldout_accuracy"] = [[round(a, 4) for a in row] for row in table]
        record = run_record(cfg, trainer, len(train))
        earlier = ecfg.extra.get("runs", [])
        if start is not None:  # a continued run: what came before is kept, and the totals add up
            earlier = earlier or [{k: ecfg.extra.get(k) for k in record}]
            record["init"] = cfg.eagle.init
        ecfg.extra["runs"] = earlier + [record]
        ecfg.extra.update({k: v for k, v in record.items() if k != "init"})
        for key in ("train_time_s", "run_time_s", "train_steps"):
            ecfg.extra[f"total_{key}"] = round(sum(r.get(key) or 0 for r in ecfg.extra["runs"]), 1)
        eagle.save_pretrained(final)
    return final


def _online_dtype(cfg: TrainConfig, model, device: torch.device) -> torch.dtype:
    """The target's dtype for ``features: online``: ``feature_dtype`` ("" keeps the loaded one; "auto": bfloat16 on
    a GPU, the faster of float32 and bfloat16 timed here on a CPU)."""
    from specdec.training.features import fastest_forward_dtype

    name = cfg.feature_dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else fastest_forward_dtype(model)
        log.warning("features computed online with the target in %s (feature_dtype=auto)", name or str(model.dtype))
    return getattr(torch, name) if name else model.dtype


def _initial(cfg: TrainConfig, model) -> EagleModel | None:
    """The drafter ``cfg.eagle.init`` names (None: start from scratch), checked against the target and the settings."""
    if not cfg.eagle.init:
        return None
    from specdec.drafters.base import drafter_path

    path = drafter_path([cfg.eagle.init] if cfg.eagle.init != "shipped" else [], "eagle-smollm2-135m", "eagle", {})
    start = EagleModel.from_pretrained(path)
    c = start.config
    if c.hidden_size != model.config.hidden_size or c.vocab_size != model.get_output_embeddings().weight.shape[0]:
        raise ValueError(f"eagle.init={cfg.eagle.init} was trained for another target (hidden {c.hidden_size}, vocabulary "
                         f"{c.vocab_size}); start without it or give a drafter of this model")
    if cfg.eagle.layers and list(cfg.eagle.layers) != list(c.feature_layers):
        raise ValueError(f"eagle.init={cfg.eagle.init} reads layers {c.feature_layers}, the settings ask for {cfg.eagle.layers}")
    log.warning("starting from the EAGLE drafter in %s (%s steps so far)", path, c.extra.get("total_train_steps", c.extra.get("train_steps")))
    return start
