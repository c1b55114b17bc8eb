"""Losses shared by every occupancy VAE: class-weighted cross-entropy, Lovász-softmax, KL, VQ terms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from occlab.classes import IGNORE


def class_weights(counts: torch.Tensor, power: float = 1 / 3) -> torch.Tensor:
    """DynamicCity's cross-entropy weights: (max_freq / freq) ** (1/3); unseen classes get the largest weight."""
    freq = counts.double() / counts.sum().clamp(min=1)
    seen = freq > 0
    weights = torch.ones_like(freq)
    weights[seen] = (freq.max() / freq[seen]) ** power
    weights[~seen] = weights[seen].max() if seen.any() else 1.0
    return weights.float()


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    """Lovász-softmax (Berman et al. 2018) over the classes present in `labels`, all classes in one sort.

    probs: (N, C) softmax probabilities; labels: (N,) int. No host synchronisation: absent classes are masked
    out of the mean instead of being skipped in Python. One 1-D integer sort of (class, error, foreground) keys
    (errors are non-negative floats, whose bit patterns sort as integers) replaces C float sorts and the gather;
    the Lovász weights are scattered back to the voxels, so the loss is sum(errors * weights) with the same
    value as the sorted sum and the same gradient (up to the order of exact ties, which the value ignores).
    """
    valid = labels != ignore_index
    probs, labels = probs[valid], labels[valid].long()
    n, num_classes = probs.shape
    fg = labels[:, None] == torch.arange(num_classes, device=labels.device)  # (N, C) bool, no float one-hot
    errors = torch.where(fg, 1 - probs, probs)  # (N, C) = |fg - probs| for probabilities
    with torch.no_grad():
        bits = errors.detach().float().t().contiguous().view(torch.int32).long()  # (C, N): order-preserving
        cls = torch.arange(num_classes, device=probs.device)[:, None] << 33
        keys = cls | ((0x7FFFFFFF - bits) << 1) | fg.t()  # (C, N): class, then error descending, then fg
        keys, order = torch.sort(keys.reshape(-1))  # (C*N,) one integer sort
        fg_sorted = (keys & 1).view(num_classes, n).to(probs.dtype)  # (C, N) each row sorted by error
        gts = fg_sorted.sum(1, keepdim=True)  # (C, 1)
        intersection = gts - fg_sorted.cumsum(1)
        union = gts + (1 - fg_sorted).cumsum(1)
        jaccard = 1.0 - intersection / union  # (C, N)
        jaccard[:, 1:] -= jaccard[:, :-1].clone()  # Lovász extension gradient, in sorted order
        weights = torch.empty(num_classes * n, dtype=probs.dtype, device=probs.device)
        weights[order] = jaccard.reshape(-1)  # back to (class, voxel) positions
        present = (gts[:, 0] > 0).to(probs.dtype)  # (C,)
    per_class = (errors * weights.view(num_classes, n).t()).sum(0)  # (C,)
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

    def _ce_lovasz(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """CE and Lovász from one log-softmax of the (voxels, classes) view of the logits (no second softmax,
        no copy when the logits are channels-last, as DynamicCity's fast path returns them)."""
        flat = logits.movedim(1, -1).reshape(-1, logits.shape[1])  # (N, K)
        logp = flat.log_softmax(-1)  # (N, K)
        target = target.reshape(-1)  # (N,)
        parts = {"ce": F.nll_loss(logp, target, weight=self.weights if self.weights.numel() else None,
                                  ignore_index=self.ignore_index)}
        if self.lovasz:
            parts["lovasz"] = lovasz_softmax(logp.exp(), target, self.ignore_index)
        return parts

    def forward(self, out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """out: the model's dict (logits (B, C, ...), optional targets (B, ...) for them, mu/logvar dicts, vq_loss)."""
        logits = out["logits"].float()
        target = out.get("targets", labels).long()  # a query-sampling model (X-Scene) scores its own points
        if self.fused:
            parts = self._ce_lovasz(logits, target)
        else:
            parts = {"ce": F.cross_entropy(logits, target, weight=self.weights if self.weights.numel() else None,
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
