"""Issue #10: every fast path of the DynamicCity VAE and its loss against the plain reference path (same weights,
same input: same loss, logits and gradients), checkpointing and frame chunks, and the `occlab bench` JSON."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from occlab.bench import RESULT_KEYS, BenchSpec, curve_gap, loss_curve
from occlab.errors import OcclabError
from occlab.models.dynamiccity import Compute, DynamicCity, dynamiccity_tiny
from occlab.train.losses import OccupancyLoss, lovasz_softmax

GRID, T = (8, 8, 4), 4



def run_step(model: DynamicCity, labels: torch.Tensor, compute: Compute, loss_fn: OccupancyLoss):
    """Loss, logits and every parameter's gradient of one training forward/backward (same noise each call).
    Ignored voxels (255) enter the model as free, as in the trainer; the loss leaves them out."""
    model.compute = compute
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the Gaussian heads' samples and the dropout masks
    out = model(labels.masked_fill(labels == 255, 0))
    loss = loss_fn(out, labels)["loss"]
    loss.backward()
    return loss.detach(), out["logits"].detach().contiguous(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b, rtol=1e-4):
    loss_a, logits_a, grads_a = a
    loss_b, logits_b, grads_b = b
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max().item() for g in grads_a.values())  # gradients compared on the largest one's scale
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("kw,batch", [({}, 1), ({}, 2), ({"expansion": "sum"}, 1), ({"rates": (1, 1, 1, 1)}, 1),
                                      ({"rates": (4, 2, 2, 1)}, 2), ({"encoder": "avgpool"}, 1)])
def test_fast_path_equals_reference(kw, batch):
    """In float64, so that the two paths must agree far below fp32 rounding (in fp32 a tiny model's near-constant
    channels let instance norm amplify a change in the order of summation to 1e-4 .. 1e-2 of the largest
    gradient). At 1e-6 this caught the reference path's wrong gradient from torch's instance norm (test_blocks)."""
    torch.manual_seed(0)
    model = DynamicCity(dynamiccity_tiny(GRID, T, **kw)).double()  # dropout 0.1 as released: same masks
    labels = torch.randint(0, 11, (batch, T, *GRID), generator=torch.Generator().manual_seed(2))
    labels[0, 0, 0, 0, 0] = 255  # an ignored voxel: input as free, out of the loss
    weights = torch.linspace(0.5, 2.0, 11)
    ref = run_step(model, labels, Compute(fast=False), OccupancyLoss(weights, fused=False))
    fast = run_step(model, labels, Compute(), OccupancyLoss(weights))
    assert_same(ref, fast, rtol=1e-6)


def test_checkpoint_and_frame_chunks_give_the_same_gradients():
    torch.manual_seed(0)
    model = DynamicCity(dynamiccity_tiny(GRID, T))
    labels = torch.randint(0, 11, (2, T, *GRID), generator=torch.Generator().manual_seed(3))
    loss_fn = OccupancyLoss(torch.ones(11))
    plain = run_step(model, labels, Compute(), loss_fn)
    for compute in (Compute(checkpoint=True), Compute(checkpoint=True, frame_chunk=3), Compute(frame_chunk=1),
                    Compute(fast=False, checkpoint=True, frame_chunk=2)):
        assert_same(plain, run_step(model, labels, compute, loss_fn))


def test_checkpoint_keeps_fewer_activations():
    """Checkpointing stores only chunk boundaries: the bytes saved for backward drop."""
    torch.manual_seed(0)
    model = DynamicCity(dynamiccity_tiny((16, 16, 4), 8))
    labels = torch.randint(0, 11, (1, 8, 16, 16, 4), generator=torch.Generator().manual_seed(4))

    def saved_bytes(compute: Compute) -> int:
        model.compute = compute
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(labels)["logits"].sum()
        return total

    assert saved_bytes(Compute(checkpoint=True, frame_chunk=2)) < 0.5 * saved_bytes(Compute())


def test_chunked_decoding_equals_whole_in_eval():
    torch.manual_seed(0)
    model = DynamicCity(dynamiccity_tiny(GRID, T)).eval()
    labels = torch.randint(0, 11, (2, T, *GRID), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        planes = model.encode(labels)["mu"]
        model.compute = Compute(fast=False)
        whole = model.decode(planes)
        model.compute = Compute(frame_chunk=1)
        chunked = model.decode(planes)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
    assert chunked.shape == (2, 11, T, *GRID)


def test_fast_decoder_returns_channels_last_logits():
    """The fast path's logits are a (B, K, T, X, Y, Z) view of a classes-last array: the loss's (voxels, classes)
    view is free."""
    torch.manual_seed(0)
    model = DynamicCity(dynamiccity_tiny(GRID, T))
    logits = model(torch.zeros(1, T, *GRID, dtype=torch.long))["logits"]
    assert logits.shape == (1, 11, T, *GRID)
    assert logits.stride(1) == 1
    assert logits.movedim(1, -1).is_contiguous()


def test_fused_loss_equals_plain_loss():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 5, 3, 4, 6, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 4, 6), generator=g)  # class 4 absent
    labels[0, 0, 0, :2] = 255
    weights = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0])
    out = {"logits": logits}
    parts = {}
    for fused in (False, True):
        p = OccupancyLoss(weights, fused=fused)(out, labels)
        grad, = torch.autograd.grad(p["loss"], logits)
        parts[fused] = (p, grad)
    for key in ("ce", "lovasz", "loss"):
        torch.testing.assert_close(parts[True][0][key], parts[False][0][key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts[True][1], parts[False][1], rtol=1e-4, atol=1e-7)
    # and the plain formula: weighted CE over the non-ignored voxels
    keep = labels != 255
    want = F.cross_entropy(logits.movedim(1, -1)[keep], labels[keep], weight=weights)
    torch.testing.assert_close(parts[True][0]["ce"], want)
    assert lovasz_softmax(torch.eye(3), torch.arange(3)).item() == 0.0


def test_bf16_loss_curve_follows_fp32_short():
    """A short fixed run at tiny widths: bf16 autocast (convs in bf16, norms and attention fp32) stays within 2%."""
    a = loss_curve("fp32", steps=20, grid=(8, 8, 4), frames=4, preset="tiny", lr=3e-3)
    b = loss_curve("bf16", steps=20, grid=(8, 8, 4), frames=4, preset="tiny", lr=3e-3)
    assert a[-1] < 0.9 * a[0]  # it trains
    assert curve_gap(a, b) < 0.02


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured 2026-11-26: bf16 trains slightly slower; the 10-step-window gap "
                   "grows to 1.5% at step 80, 2.7% at 160 and 5.9% at 180-190, so bf16 does not meet issue #10's "
                   "2% criterion and fp32 is the counted precision (strict: this fails once bf16 holds)")
def test_bf16_loss_curve_follows_fp32_200_steps():
    """Issue #10 §2: the fixed 200-step run (paper widths at 32x32x8, T = 4) in bf16 stays within 2% of fp32."""
    a = loss_curve("fp32", steps=200, grid=(32, 32, 8), frames=4)
    b = loss_curve("bf16", steps=200, grid=(32, 32, 8), frames=4)
    assert a[-1] < 0.7 * a[0]
    assert curve_gap(a, b) < 0.02


def test_curve_gap_by_hand():
    assert curve_gap([1.0] * 10 + [2.0] * 10, [1.01] * 10 + [2.0] * 10) == pytest.approx(0.01)


def test_bench_spec_validation():
    with pytest.raises(OcclabError):
        BenchSpec(model="nope")
    with pytest.raises(OcclabError):
        BenchSpec(model="dynamiccity-dit", task="encode-decode")
    with pytest.raises(OcclabError):
        BenchSpec(steps=0)


def test_bench_cli_json_schema(tmp_path):
    """`occlab bench step --json` in a fresh process: one JSON line with the issue's keys."""
    cmd = [sys.executable, "-m", "occlab", "bench", "step", "--small", "--task", "encode-decode", "--steps", "1",
           "--warmup", "0", "--threads", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(RESULT_KEYS) <= set(result)
    assert result["device"] == "cpu" and result["precision"] == "fp32" and result["path"] == "fast"
    assert result["s_min"] <= result["s_per_step"] <= result["s_max"]
    assert 0.2 < result["peak_mem_gib"] < 16  # torch itself takes a few hundred MB
    assert result["params"] > 1_000_000  # paper widths
