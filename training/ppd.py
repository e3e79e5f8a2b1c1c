"""Fitting PPD prompt tokens (method ``ppd``) with the target frozen.

Only the prompt embeddings (m × v × H numbers; 1,728 for the default model's
3 tokens) are trained. Each training sequence (a conversation with the
target's own distilled answer) gets ``ppd.groups`` insertion points drawn at
random inside the answer; at each point t a group of prompt tokens is
appended in the same forward, seeing the sequence up to t and its own earlier
prompt tokens (a 4-D mask; positions t + 1, ..., t + m), exactly as they ride
in a verify pass at inference. Prompt token i must give the target's own
distribution at position t + i, the one that predicts the token i + 1 places
after t:

* ``loss_type: kl`` (default, the paper's distillation): KL(target ‖ prompt token),
  weighted ``loss_decay ** (i - 1)`` (0.8 per depth);
* ``loss_type: ce``: cross-entropy on the target's own greedy token there (the hard-label variant).

The target's distribution comes from one plain forward of the same sequence
(no gradient). peft's prompt tuning does not fit: it prepends virtual tokens
at the start of the input, while PPD inserts them in the middle of a sequence
at arbitrary points, with their own attention pattern, so the module is our
own (:class:`PPDModule`). Embeddings start from the target's embeddings of
``ppd.init_text`` (the paper initialises from text). Held-out per-depth
top-k accuracies are measured and saved with the tokens: they shape the
dynamic sparse tree at inference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.drafters.ppd import PPDConfig, PromptTokens
from specdec.training.common import fit, run_record, start_run
from specdec.training.config import TrainConfig
from specdec.training.data import tokenize_conversation
from specdec.training.losses import DepthAccuracy, depth_loss

__all__ = ["PPDModule", "train_ppd", "ppd_heldout_accuracy", "ppd_examples"]

log = logging.getLogger(__name__)


def ppd_examples(tokenizer, convs, cfg: TrainConfig, seed: int) -> list[dict]:
    """Per conversation: ids [T] and ``ppd.groups`` insertion points inside the answer (drawn once, seeded)."""
    g = torch.Generator().manual_seed(seed)
    m = cfg.depth
    out = []
    for conv in convs:
        ids = tokenize_conversation(tokenizer, conv, cfg.max_len)
        start = tokenize_conversation(tokenizer, conv[:1], cfg.max_len).numel() if len(conv) > 1 else 1
        last = ids.numel() - m - 2  # a cut needs m targets after it
        if last < start:
            continue
        cuts = torch.randint(start, last + 1, (cfg.ppd.groups,), generator=g)
        out.append({"ids": ids, "cuts": torch.sort(cuts).values})
    return out


def collate_examples(batch: list[dict]) -> dict:
    seq = max(b["ids"].numel() for b in batch)
    ids = torch.zeros(len(batch), seq, dtype=torch.long)
    lengths = torch.tensor([b["ids"].numel() for b in batch])
    for i, b in enumerate(batch):
        ids[i, : b["ids"].numel()] = b["ids"]
    return {"ids": ids, "lengths": lengths, "cuts": torch.stack([b["cuts"] for b in batch])}


class PPDModule(nn.Module):
    """The frozen target with prompt tokens inserted at cut points; ``forward`` gives the loss and per-depth accuracies."""

    def __init__(self, target, tokens: PromptTokens, decay: float, loss_type: str) -> None:
        super().__init__()
        self.tokens, self.decay, self.loss_type = tokens, decay, loss_type
        self._target = (target,)  # frozen and not a submodule: only the prompt tokens are trained and saved

    @property
    def target(self):
        return self._target[0]

    def layout(self, ids: Tensor, lengths: Tensor, cuts: Tensor, dtype: torch.dtype):
        """Inputs for one forward: embeddings [B, L, H], positions [B, L], additive mask [B, 1, L, L], and the rows
        of the prompt tokens [B, K, m, v] (into L)."""
        b, t = ids.shape
        m, v, h = self.tokens.embeds.shape
        k = cuts.shape[1]
        emb = self.target.get_input_embeddings()(ids).to(dtype)
        prompt = self.tokens.embeds.to(dtype)[None, None].expand(b, k, m, v, h)  # [B, K, m, v, H]
        extra = prompt.permute(0, 1, 3, 2, 4).reshape(b, k * v * m, h)  # group, virtual chain, prompt token
        inputs = torch.cat([emb, extra], dim=1)
        n = t + k * v * m
        i_idx = torch.arange(m).repeat(k * v)  # prompt token index of each extra row
        g_idx = torch.arange(k).repeat_interleave(v * m)
        c_idx = torch.arange(k * v).repeat_interleave(m)  # its chain
        pos = torch.cat([torch.arange(t)[None].expand(b, t), cuts[:, g_idx] + 1 + i_idx[None]], dim=1)
        visible = torch.zeros(b, n, n, dtype=torch.bool)
        real = torch.arange(t)[None, :] < lengths[:, None]  # [B, T]
        visible[:, :t, :t] = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & real[:, None, :]
        visible[:, t:, :t] = torch.arange(t)[None, None, :] <= cuts[:, g_idx][:, :, None]  # the sequence up to the cut
        same_chain = (c_idx[:, None] == c_idx[None, :]) & (i_idx[None, :] <= i_idx[:, None])
        visible[:, t:, t:] = same_chain[None]
        visible |= torch.eye(n, dtype=torch.bool)[None]
        mask = torch.zeros(b, 1, n, n, dtype=dtype).masked_fill_(~visible[:, None], torch.finfo(dtype).min)
        rows = (t + torch.arange(k * v * m)).reshape(k, v, m).permute(0, 2, 1)  # [K, m, v]
        return inputs, pos, mask, rows[None].expand(b, -1, -1, -1)

    def forward(self, ids: Tensor, lengths: Tensor, cuts: Tensor, num_items_in_batch=None) -> dict:
        model, m = self.target, self.tokens.config.num_prompt_tokens
        head = model.get_output_embeddings().weight
        b, k = cuts.shape
        with torch.no_grad():  # the target's own distribution at every position
            plain = model(input_ids=ids, attention_mask=(torch.arange(ids.shape[1])[None] < lengths[:, None]).long(),
                          output_hidden_states=True)
            teacher_hidden = plain.hidden_states[-1]  # [B, T, H]
        dtype = teacher_hidden.dtype
        inputs, pos, mask, rows = self.layout(ids, lengths, cuts, dtype)
        out = model(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # [B, L, H]
        student_h = hidden[torch.arange(b)[:, None, None, None], rows]  # [B, K, m, v, H]
        student = self.tokens.aggregate((student_h @ head.T).float())  # [B, K, m, V]
        target_pos = cuts[:, :, None] + torch.arange(1, m + 1)[None, None, :]  # [B, K, m]: position t + i
        teacher_logits = (teacher_hidden[torch.arange(b)[:, None, None], target_pos] @ head.T).float()
        loss, acc = student.new_zeros(()), DepthAccuracy(m)
        for i in range(m):
            s, te = student[:, :, i], teacher_logits[:, :, i]
            label, ok = te.argmax(-1), torch.ones(te.shape[:-1], dtype=torch.bool)
            loss = loss + self.decay**i * depth_loss(s, label, ok, F.log_softmax(te, -1) if self.loss_type == "kl" else None)
            acc.add(i, s, label, ok)
        return {"loss": loss, "metrics": acc.metrics()}


@torch.inference_mode()
def ppd_heldout_accuracy(module: PPDModule, examples: list[dict]) -> list[list[float]]:
    """acc[i][r]: share of held-out cut points where prompt token i's r-th choice is the target's own token."""
    m = module.tokens.config.num_prompt_tokens
    acc = DepthAccuracy(m)
    head = module.target.get_output_embeddings().weight
    for ex in examples:
        batch = collate_examples([ex])
        inputs, pos, mask, rows = module.layout(batch["ids"], batch["lengths"], batch["cuts"], head.dtype)
        hidden = module.target(inputs_embeds=inputs, attention_mask=mask, position_ids=pos, output_hidden_states=True).hidden_states[-1]
        plain = module.target(input_ids=batch["ids"], output_hidden_states=True).hidden_states[-1]
        student = module.tokens.aggregate(hidden[0, rows[0]] @ head.T)  # [K, m, V]
        target_pos = batch["cuts"][0][:, None] + torch.arange(1, m + 1)[None]
        teacher = (plain[0, target_pos] @ head.T).argmax(-1)  # [K, m]
        for i in range(m):
            acc.add(i, student[:, i], teacher[:, i], torch.ones_like(teacher[:, i], dtype=torch.bool))
    return acc.table()


def train_ppd(cfg: TrainConfig) -> Path:
    """Train PPD prompt tokens as ``cfg`` says; returns the directory of the final drafter."""

    from specdec.training.trainer import PermutedDataset

    out, model, tokenizer, heldout_convs, train_convs = start_run(cfg)
    held = ppd_examples(tokenizer, heldout_convs, cfg, seed=cfg.seed + 1)
    train_ex = ppd_examples(tokenizer, train_convs, cfg, seed=cfg.seed)
    if not train_ex:
        raise ValueError(f"{cfg.data} gave no conversation with an answer longer than {cfg.depth + 2} tokens")
    m, v, h = cfg.depth, cfg.ppd.virtual, model.config.hidden_size
    init_ids = tokenizer(cfg.ppd.init_text, add_special_tokens=False)["input_ids"] or [0]
    init = model.get_input_embeddings()(torch.tensor([init_ids[i % len(init_ids)] for i in range(m * v)])).detach().float()
    pcfg = PPDConfig(hidden_size=h, vocab_size=model.get_output_embeddings().weight.shape[0], num_prompt_tokens=m, num_virtual=v,
                     aggregation=cfg.ppd.aggregation, target_model=str(cfg.model),
                     extra={"init_text": cfg.ppd.init_text})
    tokens = PromptTokens(pcfg, init.reshape(m, v, h))
    module = PPDModule(model, tokens, cfg.loss_decay, cfg.loss_type)
    trainer = fit(module, PermutedDataset(train_ex, cfg.seed, cfg.shuffle), collate_examples, cfg, out)
    final = out / "final"
    if trainer.is_world_process_zero():
        tokens.eval()
        if held:
            pcfg.extra["heldout_accuracy"] = [[round(a, 4) for a in row] for row in ppd_heldout_accuracy(module, held)]
        pcfg.extra.update(run_record(cfg, trainer, len(train_ex)))
        pcfg.extra["parameters"] = sum(p.numel() for p in tokens.parameters())
        tokens.save_pretrained(final)
    return final
