"""The ego motion an occupancy sequence implies, and the driving command that motion reads as.

Used to ask whether command-conditioned samples follow their command (DynamicCity §4 / issue 7 §6): a
generated sequence has no poses, but its static world should move past the ego as the command says.

- `static_bev(labels)`: per frame the top-most *static* class of every column (vehicles, pedestrians and
  bicycles removed first, since they move on their own), 0 where a column holds nothing static.
- `register(a, b)`: the rigid motion (dx, dy, dyaw) of the ego from frame a to frame b, found by a search
  over a grid of candidates (coarse, then fine around the best): a cell q of b (metres, ego at the grid
  centre) is looked up in a at R(dyaw) q + (dx, dy) (nearest cell), and the score is the fraction of b's
  static cells that land on a static cell of a with the same class. Ties on the fine grid (nearest look-ups
  make plateaus) are averaged, which gives a sub-voxel estimate. Same convention as
  `occlab.data.sequence.trajectory_from_poses`: the motion of frame t in the ego frame of frame t-1.
- `estimate_trajectory(labels)`: (T, 3) per-frame motion, frame 0 zeros.
- `motion_summary(traj)`: path length (metres) and total heading change (degrees) of a window.
- `CommandRule` / `fit_command_rule` / `classify`: static (path shorter than `static_m`), left (heading
  change above `turn_deg`), right (below -`turn_deg`), else forward; the two thresholds are fitted on
  windows whose command is known (grid search, balanced accuracy).

Sizes: at 32 x 32 cells one frame pair costs about 5 ms on one CPU thread; at 128 x 128 about 80 ms.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from occlab.classes import CLASS_ID, IGNORE
from occlab.errors import OcclabError

COMMANDS = ("static", "forward", "left", "right")  # as occlab.data.COMMANDS
DYNAMIC = (CLASS_ID["pedestrian"], CLASS_ID["vehicle"], CLASS_ID["bicycle"])
# search per frame: (dx range m, dy range m, dyaw range deg) at a coarse step, then a fine grid around the best
COARSE = {"dx": (-1.6, 1.6, 0.2), "dy": (-0.8, 0.8, 0.2), "yaw": (-10.0, 10.0, 2.0)}
FINE = {"dx": 0.05, "dy": 0.05, "yaw": 0.5}


def static_bev(labels) -> torch.Tensor:
    """(..., X, Y, Z) labels -> (..., X, Y) long: top-most static class per column (0: none)."""
    lab = torch.as_tensor(np.asarray(labels)).long()
    static = (lab != 0) & (lab != IGNORE)
    for c in DYNAMIC:
        static &= lab != c
    Z = lab.shape[-1]
    height = torch.arange(1, Z + 1, device=lab.device)
    top = (static.long() * height).argmax(-1, keepdim=True)  # highest static voxel (0 if none)
    bev = torch.gather(lab, -1, top)[..., 0]
    return torch.where(static.any(-1), bev, torch.zeros_like(bev))


def _axis(lo: float, hi: float, step: float) -> torch.Tensor:
    return torch.arange(round((hi - lo) / step) + 1, dtype=torch.float64) * step + lo


def _scores(a: torch.Tensor, cells: torch.Tensor, classes: torch.Tensor, cand: torch.Tensor, voxel: tuple,
            chunk: int = 512) -> torch.Tensor:
    """Score of every candidate (K, 3) [dx m, dy m, yaw rad] for b's static cells (N, 2) metres of class (N,)."""
    X, Y = a.shape
    out = []
    for c in cand.split(chunk):
        cos, sin = torch.cos(c[:, 2:3]), torch.sin(c[:, 2:3])  # (k, 1)
        px = cos * cells[None, :, 0] - sin * cells[None, :, 1] + c[:, 0:1]  # (k, N) metres in frame a
        py = sin * cells[None, :, 0] + cos * cells[None, :, 1] + c[:, 1:2]
        i = torch.floor(px / voxel[0] + X / 2).long()
        j = torch.floor(py / voxel[1] + Y / 2).long()
        inside = (i >= 0) & (i < X) & (j >= 0) & (j < Y)
        hit = a[i.clamp(0, X - 1), j.clamp(0, Y - 1)]  # (k, N)
        agree = (inside & (hit == classes[None])).sum(1).double()
        seen = inside.sum(1).double().clamp_min(1.0)
        out.append(agree / seen)
    return torch.cat(out)


def _edges(bev: torch.Tensor) -> torch.Tensor:
    """(X, Y) bool: static cells with a 4-neighbour of another class (uniform areas such as a long road say
    nothing about a shift along them, so only boundaries are scored)."""
    p = torch.nn.functional.pad(bev[None, None].double(), (1, 1, 1, 1), mode="replicate")[0, 0].long()
    c = p[1:-1, 1:-1]
    diff = (p[:-2, 1:-1] != c) | (p[2:, 1:-1] != c) | (p[1:-1, :-2] != c) | (p[1:-1, 2:] != c)
    return (bev > 0) & diff


def register(a, b, voxel: tuple[float, float] = (0.4, 0.4)) -> tuple[float, float, float]:
    """Ego motion (dx m, dy m, dyaw rad) from static BEV a (X, Y) to static BEV b (X, Y), b's frame in a's."""
    a, b = torch.as_tensor(a).long(), torch.as_tensor(b).long()
    if a.shape != b.shape or a.dim() != 2:
        raise OcclabError(f"register takes two BEV maps of the same (X, Y) shape, got {tuple(a.shape)}, "
                          f"{tuple(b.shape)}")
    X, Y = b.shape
    ii, jj = torch.nonzero(_edges(b), as_tuple=True)
    if len(ii) == 0 or not bool((a > 0).any()):
        return 0.0, 0.0, 0.0  # nothing static to register: no evidence of motion
    cells = torch.stack([(ii.double() + 0.5 - X / 2) * voxel[0], (jj.double() + 0.5 - Y / 2) * voxel[1]], 1)
    classes = b[ii, jj]
    grid = [_axis(*COARSE["dx"]), _axis(*COARSE["dy"]), torch.deg2rad(_axis(*COARSE["yaw"]))]
    cand = torch.tensor(list(itertools.product(*(g.tolist() for g in grid))), dtype=torch.float64)
    s = _scores(a, cells, classes, cand, voxel)
    if float(s.max() - s.min()) < 1e-12:
        return 0.0, 0.0, 0.0  # every motion fits as well: no evidence
    norm = (cand / torch.tensor([COARSE["dx"][2], COARSE["dy"][2], np.deg2rad(COARSE["yaw"][2])])).norm(dim=1)
    best = cand[torch.where(s >= s.max() - 1e-12, norm, torch.inf).argmin()]  # ties: the smallest motion
    steps = (COARSE["dx"][2], COARSE["dy"][2], np.deg2rad(COARSE["yaw"][2]))
    fine = (FINE["dx"], FINE["dy"], np.deg2rad(FINE["yaw"]))
    axes = [best[k] + _axis(-steps[k], steps[k], fine[k]) for k in range(3)]
    cand = torch.tensor(list(itertools.product(*(g.tolist() for g in axes))), dtype=torch.float64)
    s = _scores(a, cells, classes, cand, voxel)
    top = cand[s >= s.max() - 1e-12].mean(0)  # the plateau's centre
    return float(top[0]), float(top[1]), float(top[2])


def estimate_trajectory(labels, voxel: tuple[float, float] = (0.4, 0.4)) -> np.ndarray:
    """(T, X, Y, Z) labels -> (T, 3) float32 per-frame ego motion (dx, dy, dyaw) in the previous ego frame,
    frame 0 zeros (the layout of occlab.data.sequence.trajectory_from_poses)."""
    lab = np.asarray(labels)
    if lab.ndim != 4:
        raise OcclabError(f"estimate_trajectory takes (T, X, Y, Z) labels, got shape {lab.shape}")
    bev = static_bev(lab)
    traj = np.zeros((len(lab), 3), np.float32)
    with torch.no_grad():
        for t in range(1, len(lab)):
            traj[t] = register(bev[t - 1], bev[t], voxel)
    return traj


def motion_summary(traj) -> dict:
    """Path length (m), forward and lateral displacement summed per frame (m), heading change (deg)."""
    tr = np.asarray(traj, dtype=np.float64)[1:]
    return {"path_m": float(np.hypot(tr[:, 0], tr[:, 1]).sum()), "forward_m": float(tr[:, 0].sum()),
            "lateral_m": float(tr[:, 1].sum()), "yaw_deg": float(np.degrees(tr[:, 2].sum()))}


@dataclass(frozen=True)
class CommandRule:
    """static if path < static_m; else left if yaw > turn_deg, right if yaw < -turn_deg; else forward."""

    static_m: float = 0.5
    turn_deg: float = 8.0

    def classify(self, summary: dict) -> int:
        if summary["path_m"] < self.static_m:
            return COMMANDS.index("static")
        if summary["yaw_deg"] > self.turn_deg:
            return COMMANDS.index("left")
        if summary["yaw_deg"] < -self.turn_deg:
            return COMMANDS.index("right")
        return COMMANDS.index("forward")


def classify(traj, rule: CommandRule | None = None) -> int:
    """The command index (occlab.data.COMMANDS) a (T, 3) trajectory reads as."""
    return (rule or CommandRule()).classify(motion_summary(traj))


def balanced_accuracy(true, pred, classes: int = len(COMMANDS)) -> float:
    """Mean over the classes present in `true` of the fraction predicted right."""
    true, pred = np.asarray(true), np.asarray(pred)
    present = [c for c in range(classes) if (true == c).any()]
    if not present:
        return float("nan")
    return float(np.mean([(pred[true == c] == c).mean() for c in present]))


STATIC_GRID = tuple(round(0.1 * k, 1) for k in range(1, 21))  # 0.1 .. 2.0 m
TURN_GRID = tuple(float(k) for k in range(1, 31))  # 1 .. 30 degrees


def fit_command_rule(summaries: list[dict], commands, static_m=STATIC_GRID, turn_deg=TURN_GRID) -> CommandRule:
    """The thresholds with the best balanced accuracy on windows of known command (grid search; ties: the
    smallest thresholds)."""
    if not summaries:
        raise OcclabError("fit_command_rule needs at least one window")
    best, best_acc = None, -1.0
    for s_m, t_d in itertools.product(static_m, turn_deg):
        rule = CommandRule(float(round(s_m, 3)), float(round(t_d, 3)))
        acc = balanced_accuracy(commands, [rule.classify(s) for s in summaries])
        if acc > best_acc + 1e-12:
            best, best_acc = rule, acc
    return best


def confusion(true, pred, classes: int = len(COMMANDS)) -> np.ndarray:
    """(classes, classes) counts, rows the true (requested) command, columns the implied one."""
    m = np.zeros((classes, classes), np.int64)
    for t, p in zip(true, pred):
        m[int(t), int(p)] += 1
    return m


__all__ = ["COMMANDS", "CommandRule", "balanced_accuracy", "classify", "confusion", "estimate_trajectory",
           "fit_command_rule", "motion_summary", "register", "static_bev"]
