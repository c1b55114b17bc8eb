"""The procedural 4D town: occlab's embedded default dataset (DESIGN.md §2), no download needed.

`generate_sequence(seed, geometry, frames)` builds one ego-centric sequence: a town plan (plan.py), the
agents and their motion (traffic.py), then per frame the static world sampled in the ego frame, the
agents stamped in as oriented boxes, poles as single voxels, and visibility from the lidar (raycast.py).
`TownSource` serves disjoint seed ranges per split, cached on disk by seed.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from occlab.classes import CLASS_ID
from occlab.data.geometry import Geometry, get_geometry
from occlab.data.sequence import BOX_FIELDS, COMMANDS, Sequence, load_sequence
from occlab.data.town.plan import CELL, LANE_WIDTH, Raster, TownPlan, make_plan, rng_for
from occlab.data.town.raycast import visibility
from occlab.data.town.traffic import (DT, PEDESTRIAN, STEP, VEHICLE, VEHICLE_MIX, VEHICLE_SIZES, Agent, Route,
                                      build_route, pack, route_pose, simulate)
from occlab.errors import OcclabError

MAX_FRAMES = 128
SPLITS = {"train": (0, 100_000), "val": (100_000, 110_000), "test": (110_000, 120_000)}
COMMAND_PROBS = (0.1, 0.4, 0.25, 0.25)  # static, forward, left, right
DENSITY_GAP = (70.0, 35.0, 18.0)  # metres of lane per moving vehicle: light, medium, heavy
PEDESTRIAN_GAP = (45.0, 22.0, 11.0)  # metres of sidewalk per pedestrian
SPAWN_RADIUS = 100.0
ROUTE_MARGIN = 40.0  # metres of vehicle route beyond the last frame: more than any braking distance
POLE = CLASS_ID["pole"]
_SOURCES = ("__init__.py", "plan.py", "traffic.py", "raycast.py")
TOWN_VERSION = hashlib.sha1(b"".join((Path(__file__).parent / f).read_bytes() for f in _SOURCES)
                            + (Path(__file__).parents[1] / "geometry.py").read_bytes()).hexdigest()[:10]


def generate_sequence(seed: int, geometry: str | Geometry = "carlasc", frames: int = 16,
                      command: int | None = None, density: int | None = None) -> Sequence:
    """One town sequence: deterministic by seed; T frames are the prefix of any longer sequence."""
    geo = get_geometry(geometry) if isinstance(geometry, str) else geometry
    if not 1 <= frames <= MAX_FRAMES:
        raise OcclabError(f"frames must be in 1..{MAX_FRAMES}, got {frames}")
    rng = rng_for(seed, 9)
    drawn_command, drawn_density = int(rng.choice(4, p=COMMAND_PROBS)), int(rng.integers(3))
    command = drawn_command if command is None else command
    density = drawn_density if density is None else density
    plan = make_plan(seed)
    ego = _ego(plan, command, frames, rng)
    ego_s = simulate([ego], frames)[:, 0]
    ego_xy, _ = route_pose(pack([ego] * frames), ego_s)
    reach = float(np.hypot(*np.abs(np.array([geo.min_bound[:2], geo.max_bound[:2]])).max(0))) + 8.0
    lo, hi = ego_xy.min(0) - reach, ego_xy.max(0) + reach
    margin = 1.2 * float(np.abs(plan.warp.amp).sum()) + 2.0
    raster = plan.rasterize(lo[0] - margin, hi[0] + margin, lo[1] - margin, hi[1] + margin)
    agents = [ego] + _traffic(plan, ego, density, frames, seed) + _parked(plan)
    s = simulate(agents, frames)
    return _render(plan, raster, agents, s, geo, seed, command, density)


def _ego(plan: TownPlan, command: int, frames: int, rng: np.random.Generator) -> Agent:
    """The ego car near the origin, placed so that its command's manoeuvre happens early."""
    axis = int(rng.integers(2))
    road = min(plan.roads[axis], key=lambda r: abs(r.center))
    sign = int(rng.choice([-1, 1]))
    lateral = (int(rng.integers(road.lanes)) + 0.5) * LANE_WIDTH
    nxt = min((c for c in plan.crossing(axis) if c.center * sign > c.outer + 12),
              key=lambda c: abs(c.center))
    stop_line = nxt.center - sign * (nxt.half_width + nxt.sidewalk * 0.5)
    if command == 0:  # static: waiting at the stop line
        along, cruise, v0 = stop_line - sign * rng.uniform(0.3, 3.0), 0.0, 0.0
    elif command == 1:
        along, cruise = stop_line - sign * rng.uniform(-5, 30), rng.uniform(6, 11)
        v0 = cruise * rng.uniform(0.7, 1.0)
    else:
        along, cruise, v0 = stop_line - sign * rng.uniform(0.5, 6.0), rng.uniform(6, 9), rng.uniform(3.5, 6.0)
    turn = ("straight", "straight", "left", "right")[command]
    route = build_route(plan, road, sign, lateral, along, 11.0 * frames * DT + ROUTE_MARGIN, rng, walker=False,
                        first_turn=turn, then="straight", stop_prob=0.0)
    return Agent(VEHICLE, VEHICLE_SIZES[0], route, cruise, v0=v0, track=0)


def _segments(plan: TownPlan, radius: float):
    """(road, along_lo, along_hi) for every road stretch between two crossings within `radius` of the origin."""
    for axis, roads in enumerate(plan.roads):
        crossing = plan.crossing(axis)
        for road in roads:
            if abs(road.center) > radius:
                continue
            for c0, c1 in zip(crossing[:-1], crossing[1:]):
                lo, hi = max(c0.center + c0.outer + 3, -radius), min(c1.center - c1.outer - 3, radius)
                if hi > lo:
                    yield road, lo, hi


def _spread(rng: np.random.Generator, lo: float, hi: float, gap: float, min_gap: float) -> np.ndarray:
    """Poisson-many positions in [lo, hi] at least `min_gap` apart."""
    pos = np.sort(rng.uniform(lo, hi, rng.poisson((hi - lo) / gap)))
    keep = np.concatenate([[True], np.diff(pos) > min_gap]) if len(pos) else np.zeros(0, bool)
    return pos[keep]


def _traffic(plan: TownPlan, ego: Agent, density: int, frames: int, seed: int) -> list[Agent]:
    """Vehicles in every lane and pedestrians on every sidewalk around the ego's start."""
    rng = rng_for(seed, 10)
    ego_start = ego.route.points[0]
    agents: list[Agent] = []
    for road, lo, hi in _segments(plan, SPAWN_RADIUS):
        for sign in (-1, 1):
            for lane in range(road.lanes):
                for along in _spread(rng, lo, hi, DENSITY_GAP[density], 10.0):
                    agents.append(("vehicle", road, sign, (lane + 0.5) * LANE_WIDTH, along))
            for along in _spread(rng, lo, hi, PEDESTRIAN_GAP[density], 1.5):
                side = sign * (road.half_width + rng.uniform(0.45, 0.85) * road.sidewalk)
                agents.append(("pedestrian", road, int(rng.choice([-1, 1])), side, along))
    out = []
    for track, (kind, road, sign, lateral, along) in enumerate(agents, start=1):
        arng = rng_for(seed, 11, track)
        walker = kind == "pedestrian"
        if walker:
            size = np.array([0.6, 0.6, arng.uniform(1.55, 1.9)])
            cruise = 0.0 if arng.random() < 0.1 else arng.uniform(1.0, 1.7)
        else:
            size = VEHICLE_SIZES[arng.choice(len(VEHICLE_SIZES), p=VEHICLE_MIX)]
            cruise = arng.uniform(4.0, 12.0)
        route = build_route(plan, road, sign, lateral, along, cruise * frames * DT + (10.0 if walker else ROUTE_MARGIN),
                            arng, walker)
        if not walker and np.linalg.norm(route.points[0] - ego_start) < 12.0:
            continue  # keep the ego's own spot free
        out.append(Agent(PEDESTRIAN if walker else VEHICLE, size, route, cruise,
                         v0=cruise * arng.uniform(0.3, 1.0), accel=1.0 if walker else 2.0, track=track))
    return out


def _parked(plan: TownPlan) -> list[Agent]:
    """Parked cars of the rasterised parking lots, as still agents with stable track ids."""
    out = []
    for x, y, yaw, size, key in plan.parked:
        direction = np.array([np.cos(yaw), np.sin(yaw)])
        points = np.array([x, y]) + direction * (np.arange(6) * STEP)[:, None]
        out.append(Agent(VEHICLE, VEHICLE_SIZES[size], Route(points), 0.0, track=key))
    return out


def _render(plan: TownPlan, raster: Raster, agents: list[Agent], s: np.ndarray, geo: Geometry, seed: int,
            command: int, density: int) -> Sequence:
    """Sample the world in the ego frame for every frame: labels, visibility, poses and boxes."""
    frames = len(s)
    nx, ny, nz = geo.grid
    xs, ys = geo.centers(0), geo.centers(1)
    cols = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)  # (X*Y, 2) ego frame
    heights = geo.heights()
    ground_layer = ((heights < 0) & (heights >= -geo.voxel_size[2])).astype(np.uint8)
    hdm = np.floor(heights * 10.0).astype(np.int32)  # layer centres in whole decimetres (as the raster)
    sizes = np.array([a.size for a in agents])
    classes = np.array([a.cls for a in agents])
    pole_xy = plan.warp.to_physical(np.array([[p.x, p.y] for p in plan.poles]).reshape(-1, 2))
    pole_top = np.array([p.height for p in plan.poles])
    labels = np.zeros((frames, nx, ny, nz), np.uint8)
    mask = np.zeros((frames, nx, ny, nz), bool)
    poses = np.tile(np.eye(4), (frames, 1, 1))
    boxes = []
    half = np.array(geo.max_bound[:2])
    routes = pack(agents)
    for t in range(frames):
        logical, head = route_pose(routes, s[t])
        xy = plan.warp.to_physical(logical)
        ahead = plan.warp.to_physical(logical + 0.5 * head)
        yaw = np.arctan2(ahead[:, 1] - xy[:, 1], ahead[:, 0] - xy[:, 0])
        c, si = np.cos(yaw[0]), np.sin(yaw[0])
        rot = np.array([[c, -si], [si, c]])
        poses[t, :2, :2], poses[t, :2, 3] = rot, xy[0]
        # static world: ego columns -> physical -> logical -> raster cell
        world = plan.warp.to_logical(cols @ rot.T + xy[0])
        ij = np.floor((world - raster.origin) / CELL).astype(np.int64)
        i = np.clip(ij[:, 0], 0, raster.ground.shape[0] - 1)
        j = np.clip(ij[:, 1], 0, raster.ground.shape[1] - 1)
        flat = i * raster.ground.shape[1] + j
        bottom, top = raster.bottom.ravel()[flat], raster.top.ravel()[flat]
        stands = (bottom[:, None] <= hdm) & (hdm < top[:, None])  # empty cells have bottom = top = 0
        frame = np.where(stands, raster.obj.ravel()[flat][:, None], raster.ground.ravel()[flat][:, None] * ground_layer)
        frame = frame.reshape(nx, ny, nz)
        # poles: one voxel each
        if len(pole_xy):
            local = (pole_xy - xy[0]) @ rot
            pi = np.floor((local[:, 0] - geo.min_bound[0]) / geo.voxel_size[0]).astype(int)
            pj = np.floor((local[:, 1] - geo.min_bound[1]) / geo.voxel_size[1]).astype(int)
            ok = (pi >= 0) & (pi < nx) & (pj >= 0) & (pj < ny)
            for a, b, h in zip(pi[ok], pj[ok], pole_top[ok]):
                frame[a, b, (heights >= 0) & (heights < h)] = POLE
        # agents: oriented boxes
        local = (xy - xy[0]) @ rot
        rel_yaw = yaw - yaw[0]
        reach = np.hypot(sizes[:, 0], sizes[:, 1]) / 2
        near = np.all(np.abs(local) < half + reach[:, None], axis=1)
        near[0] = False  # the ego is not in its own scan
        for k in np.flatnonzero(near):
            _stamp(frame, geo, local[k], rel_yaw[k], sizes[k], classes[k], heights)
            if np.all(np.abs(local[k]) < half):
                boxes.append([t, classes[k], local[k, 0], local[k, 1], geo.ground_z + sizes[k, 2] / 2,
                              *sizes[k], (rel_yaw[k] + np.pi) % (2 * np.pi) - np.pi, agents[k].track])
        labels[t] = frame
        mask[t] = visibility(frame, geo)
    boxes = np.array(boxes, np.float32).reshape(-1, len(BOX_FIELDS))
    return Sequence(labels, mask, poses, command, None, None, boxes, geo.name, seed, density)


def _stamp(frame: np.ndarray, geo: Geometry, center: np.ndarray, yaw: float, size: np.ndarray, cls: int,
           heights: np.ndarray) -> None:
    """Fill the voxels of an oriented box standing on the ground with `cls`."""
    length, width, height = size
    r = np.hypot(length, width) / 2
    vx, vy = geo.voxel_size[:2]
    i0 = max(int(np.floor((center[0] - r - geo.min_bound[0]) / vx)), 0)
    i1 = min(int(np.ceil((center[0] + r - geo.min_bound[0]) / vx)), geo.grid[0])
    j0 = max(int(np.floor((center[1] - r - geo.min_bound[1]) / vy)), 0)
    j1 = min(int(np.ceil((center[1] + r - geo.min_bound[1]) / vy)), geo.grid[1])
    if i0 >= i1 or j0 >= j1:
        return
    dx = geo.min_bound[0] + (np.arange(i0, i1) + 0.5) * vx - center[0]
    dy = geo.min_bound[1] + (np.arange(j0, j1) + 0.5) * vy - center[1]
    c, s = np.cos(yaw), np.sin(yaw)
    u = dx[:, None] * c + dy[None, :] * s
    v = -dx[:, None] * s + dy[None, :] * c
    inside = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
    layers = (heights >= 0) & (heights < height)
    frame[i0:i1, j0:j1][inside[:, :, None] & layers[None, None, :]] = cls


def cache_dir() -> Path:
    """Where generated sequences are cached ($OCCLAB_CACHE, default ~/.cache/occlab)."""
    return Path(os.environ.get("OCCLAB_CACHE", Path.home() / ".cache" / "occlab")) / f"town-{TOWN_VERSION}"


class TownSource:
    """Scenes of the synthetic town for one split: scene i is the sequence with seed split_start + i."""

    name = "synthetic_town"

    def __init__(self, data_root: str | None = None, split: str = "train", geometry: str = "carlasc",
                 num_sequences: int | None = None, seq_len: int = 16, cache: bool = True, memory: int = 8):
        if split not in SPLITS:
            raise OcclabError(f"unknown split {split!r} for synthetic_town; expected one of {', '.join(SPLITS)}")
        if not 1 <= seq_len <= MAX_FRAMES:
            raise OcclabError(f"synthetic_town sequences have 1..{MAX_FRAMES} frames, got seq_len={seq_len}")
        start, stop = SPLITS[split]
        n = num_sequences if num_sequences is not None else {"train": 64, "val": 8, "test": 8}[split]
        if not 1 <= n <= stop - start:
            raise OcclabError(f"num_sequences must be in 1..{stop - start} for split {split}, got {n}")
        self.geometry = get_geometry(geometry)
        self.num_classes = 11
        self.seeds = range(start, start + n)
        self.seq_len, self.cache, self.memory = seq_len, cache, memory
        self._recent: OrderedDict[int, Sequence] = OrderedDict()
        del data_root  # the town needs no data; the argument keeps every source's signature alike

    def __len__(self) -> int:
        return len(self.seeds)

    def length(self, scene: int) -> int:
        return self.seq_len

    def sequence(self, scene: int) -> Sequence:
        """The whole scene, from memory, the disk cache, or generated (and cached)."""
        seed = self.seeds[scene]
        if seed in self._recent:
            self._recent.move_to_end(seed)
            return self._recent[seed]
        path = cache_dir() / self.geometry.name / f"{seed}_{self.seq_len}.npz"
        if self.cache and path.is_file():
            try:
                seq = load_sequence(path)
            except OcclabError:
                seq = None  # a corrupt cache entry is regenerated
        else:
            seq = None
        if seq is None:
            seq = generate_sequence(seed, self.geometry, self.seq_len)
            if self.cache:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                seq.save(tmp)
                os.replace(tmp, path)
        self._recent[seed] = seq
        if len(self._recent) > self.memory:
            self._recent.popitem(last=False)
        return seq

    def load(self, scene: int, frames: np.ndarray) -> Sequence:
        return self.sequence(scene).slice(np.asarray(frames))


__all__ = ["COMMANDS", "MAX_FRAMES", "SPLITS", "TOWN_VERSION", "TownSource", "generate_sequence", "cache_dir"]
