"""Reconstruction metrics, compression ratio, mean-scene baseline and cost meter (hand-computed cases)."""
from __future__ import annotations

import itertools
import json
import math
import os
import socket
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from occlab.errors import OcclabError
from occlab.metrics import (ConfusionMatrix, CostMeter, compression_ratio, eval_recon_files, mean_scene_baseline,
                            recon_metrics)

C = 11  # CarlaSC: free + 10 classes; 1 building, 5 pole, 6 road, 10 vehicle

# Ten voxels. Voxel 9 is ignore (255) in the gt, so its prediction never counts.
GT = np.array([0, 0, 1, 1, 1, 6, 6, 6, 6, 255], np.uint8)
PRED = np.array([0, 10, 1, 1, 6, 6, 6, 6, 0, 1], np.uint8)
# Mask hides voxels 1 (the vehicle false positive) and 4 (building predicted as road).
MASK = np.array([1, 0, 1, 1, 0, 1, 1, 1, 1, 1], bool)


def test_hand_computed_iou_miou_and_geometry() -> None:
    m = recon_metrics(PRED, GT, num_classes=C)
    # building: TP 2 (v2,v3), FP 0 (v9 is ignored), FN 1 (v4 -> road): 2/3
    assert m.per_class["building"] == pytest.approx(2 / 3)
    # road: TP 3 (v5..v7), FP 1 (v4), FN 1 (v8 -> free): 3/5
    assert m.per_class["road"] == pytest.approx(3 / 5)
    # vehicle: predicted at v1 but absent from the gt: TP 0, FP 1 -> IoU 0, excluded from the default mIoU
    assert m.per_class["vehicle"] == 0.0
    assert math.isnan(m.per_class["pole"])  # neither in gt nor predicted
    assert "free" not in m.per_class
    # mIoU over gt classes {building, road}: (2/3 + 3/5) / 2 = (10/15 + 9/15) / 2 = 19/30
    assert m.miou == pytest.approx(19 / 30)
    assert m.averaged == ("building", "road")
    # geometry on the 9 counted voxels: occupied TP v2..v7 = 6, FP v1 = 1, FN v8 = 1 -> 6/8
    assert m.iou == pytest.approx(0.75)
    assert m.counted == 9  # ten voxels minus the ignored v9


def test_all_classes_flag_counts_predicted_absent_class_as_zero() -> None:
    m = recon_metrics(PRED, GT, num_classes=C, all_classes=True)
    # {building, road, vehicle}: (2/3 + 3/5 + 0) / 3 = 19/45; pole etc. (neither present nor predicted) skipped
    assert m.miou == pytest.approx(19 / 45)
    assert m.averaged == ("building", "road", "vehicle")


def test_mask_excludes_voxels() -> None:
    m = recon_metrics(PRED, GT, MASK, num_classes=C)
    # building: TP 2, FP 0, FN 0 (v4 masked) -> 1; road: TP 3, FP 0 (v4 masked), FN 1 (v8) -> 3/4
    assert m.per_class["building"] == 1.0
    assert m.per_class["road"] == pytest.approx(0.75)
    assert math.isnan(m.per_class["vehicle"])  # its only prediction (v1) is masked
    assert m.miou == pytest.approx((1 + 0.75) / 2)
    # geometry: occupied TP v2,v3,v5,v6,v7 = 5, FP 0, FN v8 = 1 -> 5/6
    assert m.iou == pytest.approx(5 / 6)
    assert m.counted == 7  # v1, v4 masked, v9 ignored


def test_to_dict_is_json_with_none_for_nan() -> None:
    d = recon_metrics(PRED, GT, num_classes=C).to_dict()
    text = json.dumps(d, allow_nan=False)
    assert json.loads(text)["per_class"]["pole"] is None
    assert d["miou"] == pytest.approx(19 / 30)


def test_torch_input_any_shape_and_inferred_classes() -> None:
    pred, gt = torch.from_numpy(PRED).view(1, 1, 2, 5, 1), torch.from_numpy(GT).view(1, 1, 2, 5, 1)
    m = recon_metrics(pred, gt)
    assert len(m.per_class) == 10  # no label >= 11: CarlaSC's 11 classes inferred
    assert m.miou == pytest.approx(19 / 30)
    assert len(recon_metrics(np.array([11, 1]), np.array([1, 1])).per_class) == 11  # bicycle -> Occ3D's 12


def _random_batches(seed: int, n: int = 6, shape: tuple[int, ...] = (2, 3, 8, 8, 4)) -> list[tuple]:
    """Random (pred, gt, mask) batches with ignore labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        gt = torch.randint(0, C, shape, generator=g, dtype=torch.uint8)
        gt[torch.rand(shape, generator=g) < 0.1] = 255
        pred = torch.where(torch.rand(shape, generator=g) < 0.6, gt,
                           torch.randint(0, C, shape, generator=g, dtype=torch.uint8))
        pred[pred == 255] = 0
        out.append((pred, gt, torch.rand(shape, generator=g) < 0.8))
    return out


def test_streaming_equals_one_shot() -> None:
    batches = _random_batches(0, n=3)
    cm = ConfusionMatrix(C)
    for pred, gt, mask in batches:
        cm.update(pred, gt, mask)
    one = ConfusionMatrix(C)
    one.update(*(torch.cat(x) for x in zip(*batches)))
    assert torch.equal(cm.matrix, one.matrix)
    assert cm.matrix.dtype == torch.int64
    assert cm.compute() == one.compute()
    cm.reset()
    assert cm.matrix.sum() == 0


def _hexplane_shapes(shape: tuple[int, ...], rates: tuple[int, ...], channels: int = 16) -> list[tuple[int, ...]]:
    """Six planes (C, a, b) over the axis pairs (T,X),(T,Y),(T,Z),(X,Y),(X,Z),(Y,Z) of the downsampled grid."""
    reduced = [n // r for n, r in zip(shape, rates)]
    return [(channels, a, b) for a, b in itertools.combinations(reduced, 2)]


# DynamicCity Tab. 4: (geometry (T,X,Y,Z), rates (dT,dX,dY,dZ), exact ratio, printed C.R.)
CR_CASES = [
    ((16, 128, 128, 8), (1, 1, 1, 1), Fraction(1024, 177), 5.78),  # 5.7853...
    ((16, 128, 128, 8), (1, 2, 2, 1), Fraction(1024, 57), 17.96),  # 17.9649...
    ((16, 128, 128, 8), (2, 2, 2, 2), Fraction(4096, 177), 23.14),  # 23.1412...
    ((16, 128, 128, 8), (2, 4, 4, 2), Fraction(4096, 57), 71.86),  # 71.8596...
    ((16, 200, 200, 16), (1, 2, 2, 1), Fraction(40000, 1041), 38.42),  # 38.4246...
    ((16, 200, 200, 16), (2, 2, 2, 2), Fraction(40000, 829), 48.25),  # 48.2509...
    ((16, 200, 200, 16), (2, 4, 4, 2), Fraction(160000, 1041), 153.69),  # 153.6984...
]


@pytest.mark.parametrize("shape,rates,exact,printed", CR_CASES)
def test_compression_ratio_dynamiccity_tab4(shape, rates, exact, printed) -> None:
    # C.R. = T*X*Y*Z / (16 * sum of a*b over the axis pairs of (T/dT, X/dX, Y/dY, Z/dZ)), all axes downsampled.
    # The paper's last digit is sometimes truncated (5.785 -> 5.78, 153.698 -> 153.69), sometimes rounded
    # (71.8596 -> 71.86), so the printed value is matched to within 0.01.
    cr = compression_ratio(shape, _hexplane_shapes(shape, rates))
    assert cr == pytest.approx(float(exact), rel=1e-12)
    assert abs(cr - printed) < 0.01


def test_compression_ratio_errors() -> None:
    with pytest.raises(OcclabError, match="latent shapes"):
        compression_ratio((16, 128, 128, 8), [])
    with pytest.raises(OcclabError, match="positive"):
        compression_ratio((16, 0, 128, 8), [(16, 4, 4)])


def test_mean_scene_baseline_hand_made() -> None:
    # grid (X,Y,Z) = (1,1,4); per position the counts over 4 training frames (2 + 1 + 1):
    # pos0: road x3, ground x1 -> road; pos1: free x2, vehicle x2 -> tie, lowest id -> free;
    # pos2: building x2, ignore x2 -> building; pos3: ignore only -> free
    seq = np.array([[6, 0, 1, 255], [6, 0, 1, 255]], np.uint8).reshape(2, 1, 1, 4)
    frame_b = np.array([6, 10, 255, 255], np.uint8).reshape(1, 1, 4)
    frame_c = torch.tensor([7, 10, 255, 255], dtype=torch.uint8).view(1, 1, 4)
    scene = mean_scene_baseline(iter([seq, frame_b, frame_c]), C)
    assert scene.shape == (1, 1, 4) and scene.dtype == np.uint8
    assert scene.ravel().tolist() == [6, 0, 1, 0]
    # scored against a (T,X,Y,Z) gt, the static scene is broadcast over T:
    # road: TP 2 (pos0, both frames), FP 0, FN 0 -> 1;
    # building: TP 2 (pos2, both frames), FP 0, FN 1 (t1 has building at pos3, predicted free) -> 2/3
    gt = np.array([[6, 0, 1, 0], [6, 0, 1, 1]], np.uint8).reshape(2, 1, 1, 4)
    m = recon_metrics(scene, gt, num_classes=C)
    assert m.per_class["road"] == 1.0 and m.per_class["building"] == pytest.approx(2 / 3)
    assert m.miou == pytest.approx((1 + 2 / 3) / 2)


def test_mean_scene_baseline_errors() -> None:
    with pytest.raises(OcclabError, match="no training labels"):
        mean_scene_baseline([], C)
    with pytest.raises(OcclabError, match="grid"):
        mean_scene_baseline([np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8)], C)
    with pytest.raises(OcclabError, match="outside 0..10"):
        mean_scene_baseline([np.full((2, 2, 2), 11, np.uint8)], C)


def test_bad_input_errors() -> None:
    with pytest.raises(OcclabError, match=r"pred shape \(10,\) differs from gt shape \(9,\)"):
        recon_metrics(PRED, GT[:9], num_classes=C)
    with pytest.raises(OcclabError, match="mask shape"):
        recon_metrics(PRED, GT, MASK[:5], num_classes=C)
    with pytest.raises(OcclabError, match=r"pred: label values \[11\] are outside 0..10"):
        recon_metrics(np.where(PRED == 10, 11, PRED), GT, num_classes=C)
    with pytest.raises(OcclabError, match=r"pred: label values \[255\]"):
        recon_metrics(np.full(3, 255, np.uint8), np.zeros(3, np.uint8), num_classes=C)
    with pytest.raises(OcclabError, match=r"gt: label values \[20\]"):
        recon_metrics(np.zeros(3, np.uint8), np.array([1, 20, 255], np.uint8), num_classes=C)
    with pytest.raises(OcclabError, match="expected integer class labels"):
        recon_metrics(PRED.astype(np.float32), GT, num_classes=C)
    with pytest.raises(OcclabError, match="num_classes"):
        ConfusionMatrix(1)


def test_empty_mask_warns_and_flags_counted_zero() -> None:
    with pytest.warns(RuntimeWarning, match="no voxel was counted"):
        m = recon_metrics(PRED, GT, np.zeros_like(MASK), num_classes=C)
    assert m.counted == 0 and math.isnan(m.miou) and math.isnan(m.iou)


def _save(path: Path, **arrays) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def test_eval_recon_files(tmp_path: Path) -> None:
    shape = (1, 2, 5, 1)  # (T,X,Y,Z)
    pred = _save(tmp_path / "pred.npz", labels=PRED.reshape(shape))
    gt = _save(tmp_path / "gt.npz", labels=GT.reshape(shape))
    d = eval_recon_files(pred, gt, num_classes=C)
    assert d["miou"] == pytest.approx(19 / 30) and d["iou"] == pytest.approx(0.75)
    assert d["per_class"]["building"] == pytest.approx(2 / 3) and d["per_class"]["pole"] is None
    assert d["mask"] is None
    json.dumps(d, allow_nan=False)
    for key in ("mask", "labels"):  # a mask npz holds `mask`, or `labels` with nonzero = visible
        mask = _save(tmp_path / f"mask_{key}.npz", **{key: MASK.reshape(shape).astype(np.uint8)})
        assert eval_recon_files(pred, mask_path=mask, gt_path=gt, num_classes=C)["miou"] == pytest.approx(0.875)
    gt_with_mask = _save(tmp_path / "gt_mask.npz", labels=GT.reshape(shape), mask=MASK.reshape(shape))
    d = eval_recon_files(pred, gt_with_mask, num_classes=C)  # DESIGN §4: visible voxels when a mask exists
    assert d["miou"] == pytest.approx(0.875) and d["mask"].endswith(":mask")
    assert eval_recon_files(pred, gt_with_mask, num_classes=C, use_gt_mask=False)["miou"] == pytest.approx(19 / 30)


def test_eval_recon_files_errors(tmp_path: Path) -> None:
    shape = (1, 2, 5, 1)
    gt = _save(tmp_path / "gt.npz", labels=GT.reshape(shape))
    pred = _save(tmp_path / "pred.npz", labels=PRED.reshape(shape))
    with pytest.raises(OcclabError, match="missing.npz: no such file"):
        eval_recon_files(tmp_path / "missing.npz", gt)
    (tmp_path / "corrupt.npz").write_text("not a zip")
    with pytest.raises(OcclabError, match="corrupt.npz: not a readable npz"):
        eval_recon_files(tmp_path / "corrupt.npz", gt)
    with pytest.raises(OcclabError, match=r"nolabels.npz: has keys \['x'\], expected 'labels'"):
        eval_recon_files(_save(tmp_path / "nolabels.npz", x=PRED), gt)
    with pytest.raises(OcclabError, match="float.npz: predicted labels have dtype float32"):
        eval_recon_files(_save(tmp_path / "float.npz", labels=PRED.reshape(shape).astype(np.float32)), gt)
    with pytest.raises(OcclabError, match=r"flat.npz: predicted labels have shape \(10,\)"):
        eval_recon_files(_save(tmp_path / "flat.npz", labels=PRED), gt)
    with pytest.raises(OcclabError, match=r"small.npz: predicted labels have shape \(1, 2, 4, 1\)"):
        eval_recon_files(_save(tmp_path / "small.npz", labels=PRED[:8].reshape(1, 2, 4, 1)), gt)
    with pytest.raises(OcclabError, match=r"badmask.npz: mask shape"):
        eval_recon_files(pred, gt, _save(tmp_path / "badmask.npz", mask=MASK))
    with pytest.raises(OcclabError, match="selects no voxel"):
        eval_recon_files(pred, gt, _save(tmp_path / "empty.npz", mask=np.zeros(shape, bool)))


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: accumulate every other batch, all_reduce, rank 0 saves the matrix."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(C)
        for pred, gt, mask in _random_batches(1)[rank::2]:
            cm.update(pred, gt, mask)
        cm.all_reduce()
        if rank == 0:
            torch.save(cm.matrix, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_all_reduce_equals_single_process(tmp_path: Path) -> None:
    out = str(tmp_path / "matrix.pt")
    mp.spawn(_ddp_worker, args=(_free_port(), out), nprocs=2, join=True)
    single = ConfusionMatrix(C)
    for pred, gt, mask in _random_batches(1):
        single.update(pred, gt, mask)
    reduced = torch.load(out)
    assert torch.equal(reduced, single.matrix)
    assert single.all_reduce() is single and torch.equal(single.matrix, reduced)  # no-op without a group


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu, cuda = ConfusionMatrix(C), ConfusionMatrix(C, device="cuda")
    for pred, gt, mask in _random_batches(2, n=2):
        cpu.update(pred, gt, mask)
        cuda.update(pred.cuda(), gt.cuda(), mask.cuda())
    assert cuda.matrix.is_cuda and torch.equal(cuda.matrix.cpu(), cpu.matrix)


def test_cost_meter_median_with_fake_clock() -> None:
    ticks = iter([0.0, 10.0, 11.0, 13.0, 14.0, 20.0])
    meter = CostMeter(warmup=1, clock=lambda: next(ticks))
    assert meter.tick() is None  # first tick only starts the clock
    for _ in range(5):
        meter.tick()
    assert meter.times == [10.0, 1.0, 2.0, 1.0, 6.0]
    assert meter.median() == 1.5  # median of [1, 2, 1, 6] after one warm-up step
    clock = iter([0.0, 3.0, 5.0, 9.0])
    meter = CostMeter(warmup=0, clock=lambda: next(clock))
    for _ in range(2):
        with meter.step():
            pass
    assert meter.times == [3.0, 4.0] and meter.median() == 3.5


def test_cost_meter_edge_cases_and_memory() -> None:
    meter = CostMeter(warmup=5)
    with pytest.warns(RuntimeWarning, match="none after the 5 warm-up"):
        assert math.isnan(meter.median())
    assert 0.01 < meter.peak_memory_gib() < 64  # this process's peak RSS
    meter.reset_peak()  # no-op on CPU
