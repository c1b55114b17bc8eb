"""Losses: hand-computed Lovász-softmax, DynamicCity class weights, KL, the combined occupancy loss."""
import pytest
import torch

from occlab.train.losses import OccupancyLoss, class_weights, kl_divergence, lovasz_softmax


def test_lovasz_by_hand():
    # labels [0, 1]; class-1 probabilities [0.3, 0.6].
    # class 1: errors |fg - p| = [0.3, 0.4] -> sorted [0.4 (fg 1), 0.3 (fg 0)], Jaccard [1, 1], grad [1, 0] -> 0.4
    # class 0: errors [0.3, 0.4] -> sorted [0.4 (fg 0), 0.3 (fg 1)], Jaccard [0.5, 1], grad [0.5, 0.5] -> 0.35
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    assert lovasz_softmax(probs, torch.tensor([0, 1])).item() == pytest.approx(0.375)


def test_lovasz_perfect_is_zero_and_absent_classes_do_not_count():
    labels = torch.tensor([0, 2, 2, 0])
    perfect = torch.nn.functional.one_hot(labels, 4).float()
    assert lovasz_softmax(perfect, labels).item() == pytest.approx(0.0)
    # a predicted-but-absent class (1) is left out: the mean runs over classes {0, 2} (reference loop)
    probs = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0], [0.2, 0.0, 0.8, 0.0], [0.9, 0.0, 0.1, 0.0]])
    losses = []
    for c in (0, 2):
        fg = (labels == c).float()
        errors, order = (fg - probs[:, c]).abs().sort(descending=True)
        fg = fg[order]
        jaccard = 1 - (fg.sum() - fg.cumsum(0)) / (fg.sum() + (1 - fg).cumsum(0))
        losses.append((errors * torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])).sum())
    assert lovasz_softmax(probs, labels).item() == pytest.approx(torch.stack(losses).mean().item(), abs=1e-6)


def test_lovasz_ignores_255():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.0, 1.0]])
    assert lovasz_softmax(probs, torch.tensor([0, 1, 255])).item() == pytest.approx(0.375)


def test_class_weights_cube_root():
    w = class_weights(torch.tensor([1000, 10, 1, 0]))
    assert torch.allclose(w, torch.tensor([1.0, 100 ** (1 / 3), 10.0, 10.0]), atol=1e-5)


def test_kl_zero_at_prior_and_known_value():
    zero = torch.zeros(2, 3)
    assert kl_divergence([zero], [zero]).item() == 0.0
    mu, logvar = torch.ones(1, 2), torch.zeros(1, 2)
    assert kl_divergence([mu], [logvar]).item() == pytest.approx(0.5)  # 0.5 * mu^2 per float


def test_occupancy_loss_parts_and_gradients():
    logits = torch.randn(1, 3, 2, 4, 4, 2, requires_grad=True)
    labels = torch.randint(0, 3, (1, 2, 4, 4, 2))
    mu = {"xy": torch.randn(1, 2, 4, 4, requires_grad=True)}
    logvar = {"xy": torch.zeros(1, 2, 4, 4, requires_grad=True)}
    parts = OccupancyLoss(torch.ones(3), kl=0.005)({"logits": logits, "mu": mu, "logvar": logvar}, labels)
    assert set(parts) == {"ce", "lovasz", "kl", "loss"}
    expected = parts["ce"] + parts["lovasz"] + 0.005 * parts["kl"]
    assert parts["loss"].item() == pytest.approx(expected.item())
    parts["loss"].backward()
    assert logits.grad.abs().sum() > 0 and mu["xy"].grad.abs().sum() > 0


def test_plain_autoencoder_has_no_kl():
    """A DynamicCity with vae=False returns its planes as mu and no logvar: the loss skips the KL term."""
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 1], [2, 1]]])
    parts = OccupancyLoss(kl=0.005)({"logits": logits, "mu": {"xy": torch.ones(1, 2, 2)}, "logvar": None}, labels)
    assert "kl" not in parts
    assert parts["loss"].item() == pytest.approx((parts["ce"] + parts["lovasz"]).item())


def test_lovasz_integer_sort_equals_reference():
    """The one-integer-sort Lovász (fast path) against the float-sort-and-gather reference: value and gradient."""
    from occlab.train.losses import lovasz_softmax_reference

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3000, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (3000,), generator=g)  # class 5 absent
    labels[:7] = 255
    values, grads = [], []
    for fn in (lovasz_softmax_reference, lovasz_softmax):
        value = fn(logits.softmax(-1), labels)
        grad, = torch.autograd.grad(value, logits)
        values.append(value)
        grads.append(grad)
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-9)
    assert values[0].item() > 0.1


def test_lovasz_ignored_voxels_get_exactly_no_gradient():
    """Ignored voxels stay in the sort, keyed after every valid one: their Lovász weights are exactly 0."""
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(500, 4, generator=g).softmax(-1).requires_grad_()
    labels = torch.randint(0, 4, (500,), generator=g)
    labels[::7] = 255
    value = lovasz_softmax(probs, labels)
    grad, = torch.autograd.grad(value, probs)
    assert grad[labels == 255].abs().max().item() == 0.0 and grad[labels != 255].abs().max().item() > 0
    kept = lovasz_softmax(probs[labels != 255], labels[labels != 255])  # the same loss with them removed
    torch.testing.assert_close(value, kept, rtol=1e-6, atol=1e-7)
