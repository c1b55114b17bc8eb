"""Losses shared by every occupancy VAE: class-weighted cross-entropy, Lovász-softmax, KL, VQ terms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from occlab.classes import IGNORE

_ONE_BITS = 0x3F800000  # the int32 bit pattern of 1.0f: errors in [0, 1] have bits in [0, _ONE_BITS]
_IGNORED_KEY = 0x7FFFFFFE  # above every valid key ((_ONE_BITS << 1) | 1 at most), foreground bit 0


def class_weights(counts: torch.Tensor, power: float = 1 / 3) -> torch.Tensor:
    """DynamicCity's cross-entropy weights: (max_freq / freq) ** (1/3); unseen classes get the largest weight."""
    freq = counts.double() / counts.sum().clamp(min=1)
    seen = freq > 0
    weights = torch.ones_like(freq)
    weights[seen] = (freq.max() / freq[seen]) ** power
    weights[~seen] = weights[seen].max() if seen.any() else 1.0
    return weights.float()


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018) over the classes present in `labels`: one 1-D integer sort per class.

    probs: (N, C) softmax probabilities in [0, 1]; labels: (N,) int. No host synchronisation: absent classes are
    masked out of the mean instead of being skipped in Python. Each class sorts int32 keys (error descending,
    then foreground; an error in [0, 1] is a non-negative float, whose bit pattern sorts as an integer), so the
    foreground of every sorted position is read from its key, not gathered. Ignored voxels are not removed (a
    copy of every voxel and a scatter in backward) but keyed after every valid one: with no foreground among
    them the Jaccard curve is flat there and their Lovász weights are exactly 0. The weights are scattered back
    to the voxels, so the loss is sum(errors * weights): the same value as the sorted sum and the same gradient
    (up to the order of exact ties, which the value ignores).
    """
    n, num_classes = probs.shape
    labels = labels.long()
    fg = labels[:, None] == torch.arange(num_classes, device=labels.device)  # (N, C) bool, no float one-hot
    errors = torch.where(fg, 1 - probs, probs)  # (N, C) = |fg - probs| for probabilities
    with torch.no_grad():
        bits = errors.detach().float().t().clamp(0, 1).contiguous().view(torch.int32)  # (C, N) order-preserving
        keys = ((_ONE_BITS - bits) << 1) | fg.t()  # (C, N) int32 >= 0: error descending, then foreground
        keys.masked_fill_(labels == ignore_index, _IGNORED_KEY)  # after every valid key, foreground bit 0
        weights = torch.empty(num_classes, n, dtype=probs.dtype, device=probs.device)
        present = torch.empty(num_classes, dtype=probs.dtype, device=probs.device)
        for c in range(num_classes):
            key, order = torch.sort(keys[c])  # (N,) one integer sort per class
            fg_sorted = (key & 1).to(probs.dtype)  # (N,) foreground in sorted order
            gts = fg_sorted.sum()
            jaccard = 1.0 - (gts - fg_sorted.cumsum(0)) / (gts + (1 - fg_sorted).cumsum(0))  # (N,)
            jaccard[1:] -= jaccard[:-1].clone()  # Lovász extension gradient, in sorted order
            weights[c, order] = jaccard  # back to the voxels
            present[c] = gts > 0
    per_class = (errors * weights.t()).sum(0)  # (C,)
    return (per_class * present).sum() / present.sum().clamp(min=1)


def lovasz_softmax_reference(probs: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018), the plain way: a float sort of each class's column and a gather.

    probs: (N, C) softmax probabilities; labels: (N,) int. No host synchronisation: absent classes are
    masked out of the mean instead of being skipped in Python.
    """
    valid = labels != ignore_index
    probs, labels = probs[valid], labels[valid]
    num_classes = probs.shape[1]
    fg = F.one_hot(labels.long(), num_classes).to(probs.dtype)  # (N, C)
    errors = (fg - probs).abs()
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)  # (N, C) each column sorted
    fg_sorted = torch.gather(fg, 0, order)
    gts = fg_sorted.sum(0, keepdim=True)  # (1, C)
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]], 0)  # Lovász extension gradient
    per_class = (errors_sorted * grad).sum(0)  # (C,)
    present = (gts[0] > 0).to(probs.dtype)
    return (per_class * present).sum() / present.sum().clamp(min=1)


def kl_divergence(mu: list[torch.Tensor], logvar: list[torch.Tensor]) -> torch.Tensor:
    """KL to a unit Gaussian, averaged over every latent float of every plane."""
    total = sum((-0.5 * (1 + lv - m.pow(2) - lv.exp())).sum() for m, lv in zip(mu, logvar))
    return total / sum(m.numel() for m in mu)


class OccupancyLoss(nn.Module):
    """CE (class-weighted) + Lovász-softmax on the logits, + KL for Gaussian latents, + VQ terms if present."""

    def __init__(self, weights: torch.Tensor | None = None, ce: float = 1.0, lovasz: float = 1.0,
                 kl: float = 0.005, ignore_index: int = IGNORE, fused: bool = True):
        super().__init__()
        self.register_buffer("weights", weights if weights is not None else torch.empty(0), persistent=False)
        self.ce, self.lovasz, self.kl, self.ignore_index = ce, lovasz, kl, ignore_index
        self.fused = fused  # one log-softmax for CE and Lovász over a channels-last view; False: the plain path

    def _weights(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The class weights in the logits' dtype (None: unweighted)."""
        return self.weights.to(dtype) if self.weights.numel() else None

    def _ce_lovasz(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE and Lovász from one log-softmax of the (voxels, classes) view of the logits (no second softmax,
        no copy when the logits are channels-last, as DynamicCity's fast path returns them)."""
        flat = logits.movedim(1, -1).reshape(-1, logits.shape[1])  # (N, K)
        logp = flat.log_softmax(-1)  # (N, K)
        target = target.reshape(-1)  # (N,)
        parts = {"ce": F.nll_loss(logp, target, weight=self._weights(logp.dtype),
                                  ignore_index=self.ignore_index)}
        if self.lovasz:
            parts["lovasz"] = lovasz_softmax(logp.exp(), target, self.ignore_index)
        return parts

    def forward(self, out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """out: the model's dict (logits (B, C, ...), optional targets (B, ...) for them, mu/logvar dicts, vq_loss)."""
        logits = out["logits"].to(torch.promote_types(out["logits"].dtype, torch.float32))  # bf16/fp16 -> fp32
        target = out.get("targets", labels).long()  # a query-sampling model (X-Scene) scores its own points
        if self.fused:
            parts = self._ce_lovasz(logits, target)
        else:
            parts = {"ce": F.cross_entropy(logits, target, weight=self._weights(logits.dtype),
                                           ignore_index=self.ignore_index)}
            if self.lovasz:
                flat = logits.movedim(1, -1).reshape(-1, logits.shape[1])
                parts["lovasz"] = lovasz_softmax_reference(flat.softmax(-1), target.reshape(-1), self.ignore_index)
        loss = self.ce * parts["ce"] + self.lovasz * parts.get("lovasz", 0.0)
        if out.get("logvar") is not None and self.kl:  # a plain autoencoder has mu but no logvar
            mu, logvar = out["mu"], out["logvar"]
            parts["kl"] = kl_divergence(list(mu.values()), list(logvar.values()))
            loss = loss + self.kl * parts["kl"]
        if out.get("vq_loss") is not None:
            parts["vq"] = out["vq_loss"]
            loss = loss + parts["vq"]
        parts["loss"] = loss
        return parts
