"""Agents of the town: routes along lanes and sidewalks, turns and stops at intersections, a time loop.

A route is a dense polyline in logical coordinates with speed limits along it (slow on turn arcs, zero with
a wait at stop lines). The time loop moves every agent along its route at 10 Hz with bounded acceleration,
keeping a gap to whoever is ahead, and returns physical poses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from occlab.classes import CLASS_ID
from occlab.data.town.plan import LANE_WIDTH, Road, TownPlan

DT = 0.1  # 10 Hz
STEP = 0.1  # polyline spacing, metres
VEHICLE, PEDESTRIAN = CLASS_ID["vehicle"], CLASS_ID["pedestrian"]
VEHICLE_SIZES = np.array([  # length, width, height, metres
    [4.4, 1.85, 1.5],  # car
    [4.8, 2.0, 1.8],  # SUV
    [5.4, 2.05, 2.3],  # van
    [8.5, 2.5, 3.2],  # truck
    [11.5, 2.6, 3.3],  # bus
])
VEHICLE_MIX = (0.5, 0.22, 0.14, 0.08, 0.06)
DENSITY_GAP = (70.0, 35.0, 18.0)  # metres of lane per vehicle: light, medium, heavy
COMMAND_TURN = {1: "straight", 2: "left", 3: "right"}


@dataclass
class Route:
    """A polyline with speed limits: `limits` rows are (s, v_max, wait_frames) at arc length s."""

    points: np.ndarray  # (N, 2) logical
    limits: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def length(self) -> float:
        return (len(self.points) - 1) * STEP


@dataclass
class Agent:
    """One moving (or parked) object: its class, box size, route and driving style."""

    cls: int
    size: np.ndarray  # (3,) length, width, height
    route: Route
    speed: float  # desired cruise speed, m/s
    s0: float = 0.0  # start position along the route
    v0: float = 0.0  # start speed
    accel: float = 2.0
    brake: float = 3.5
    track: int = 0


def _line(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Points from p0 towards p1 at STEP spacing (p1 excluded)."""
    n = max(int(np.linalg.norm(p1 - p0) / STEP), 0)
    return p0 + (p1 - p0) * (np.arange(n) / max(n, 1))[:, None] if n else np.zeros((0, 2))


def _arc(center: np.ndarray, radius: float, a0: float, a1: float) -> np.ndarray:
    """Points along a circular arc from angle a0 to a1 (a1 excluded)."""
    n = max(int(abs(a1 - a0) * radius / STEP), 1)
    ang = a0 + (a1 - a0) * np.arange(n) / n
    return center + radius * np.stack([np.cos(ang), np.sin(ang)], -1)


def _frame(axis: int, sign: int) -> tuple[np.ndarray, np.ndarray]:
    """Heading and right-hand unit vectors of travel along a road."""
    h = np.array([0.0, sign]) if axis == 0 else np.array([float(sign), 0.0])
    return h, np.array([h[1], -h[0]])


def _point(road: Road, sign: int, along: float, lateral: float) -> np.ndarray:
    """Logical point `along` the road's axis at `lateral` metres to the right of travel."""
    h, right = _frame(road.axis, sign)
    base = np.array([road.center, 0.0]) if road.axis == 0 else np.array([0.0, road.center])
    return base + h * along * sign + right * lateral


def build_route(plan: TownPlan, road: Road, sign: int, lateral: float, along: float, length: float,
                rng: np.random.Generator, walker: bool, first_turn: str | None = None,
                then: str | None = None, stop_prob: float = 0.4) -> Route:
    """Follow a lane (or sidewalk) for `length` metres, choosing a manoeuvre at every crossing road.

    `lateral` is the signed offset to the right of travel. Vehicles turn from lane to lane on quarter
    circles that start at the crosswalk; pedestrians either cross the road ahead on the crosswalk (after an
    optional wait at the curb) or turn the corner on their side of the street. `first_turn` forces the first
    manoeuvre and `then` every later one (the ego's command); otherwise they are drawn from `rng`.
    """
    pts, limits, s = [], [], 0.0
    turn = first_turn
    while s < length:
        nxt = min((c for c in plan.crossing(road.axis) if (c.center - along) * sign > c.half_width),
                  key=lambda c: abs(c.center - along))
        if turn is None:
            turn = str(rng.choice(["straight", "corner"], p=[0.6, 0.4]) if walker else
                       rng.choice(["straight", "left", "right"], p=[0.5, 0.25, 0.25]))
        if turn == "corner":
            turn = "right" if lateral > 0 else "left"
        if walker:
            offset = min(abs(lateral) - road.half_width, nxt.sidewalk - 0.3)
            new_lateral = float(np.sign(lateral)) * (nxt.half_width + offset)
            gap = nxt.half_width + 0.3 if turn == "straight" else abs(new_lateral) + 0.8
        else:
            new_lateral = lateral if turn == "straight" else (int(rng.integers(nxt.lanes)) + 0.5) * LANE_WIDTH
            gap = nxt.half_width + nxt.sidewalk * 0.5
        if (nxt.center - sign * gap - along) * sign <= 0:  # already past the stop line: go straight on
            turn, gap = "straight", abs(nxt.center - along)
        left = turn == "left"
        stop = _point(road, sign, nxt.center - sign * gap, lateral)
        seg = _line(_point(road, sign, along, lateral), stop)
        pts.append(seg)
        s += len(seg) * STEP
        waits = len(seg) > 0 and (turn == "straight" or not walker)
        if waits and rng.random() < stop_prob:  # stop line or curb: brake to zero and wait
            limits.append((s, 0.0, int(rng.integers(5, 25) if walker else rng.integers(8, 40))))
        if turn == "straight":
            along = nxt.center + sign * gap
            seg = _line(stop, _point(road, sign, along, lateral))
        else:
            _, right = _frame(road.axis, sign)
            target = nxt.center + sign * (new_lateral if left else -new_lateral)
            radius = max(abs(target - (nxt.center - sign * gap)), 0.5)
            center = stop + (-right if left else right) * radius
            a0 = float(np.arctan2(stop[1] - center[1], stop[0] - center[0]))
            a1 = a0 + (np.pi / 2 if left else -np.pi / 2)
            seg = _arc(center, radius, a0, a1)
            if not walker:
                limits.append((s, float(np.sqrt(2.5 * radius)), 0))
            end = center + radius * np.array([np.cos(a1), np.sin(a1)])
            sign = sign * (-1 if road.axis == 0 else 1) * (1 if left else -1)
            road, lateral = nxt, new_lateral
            along = float(end[1] if road.axis == 0 else end[0])
        pts.append(seg)
        s += len(seg) * STEP
        turn = then
    return Route(np.concatenate(pts + [_point(road, sign, along, lateral)[None]]), limits)


def simulate(agents: list[Agent], frames: int, leader_ignores: int = 1) -> np.ndarray:
    """Move every agent along its route for `frames` steps; returns arc lengths s (frames, N).

    Speed follows the route's limits (braking in time for the next three, waiting at stops) and keeps a gap
    to any vehicle or pedestrian ahead in the same lane; the first `leader_ignores` agents (the ego) ignore
    the others. Everything is vectorised over agents.
    """
    n = len(agents)
    rows = np.arange(n)
    s = np.array([a.s0 for a in agents], float)
    v = np.array([a.v0 for a in agents], float)
    limits = [sorted(lim for lim in a.route.limits if lim[0] >= a.s0 - 0.2) for a in agents]
    table = np.tile(np.array([np.inf, np.inf, 0.0]), (n, max(map(len, limits)) + 3, 1))  # (N, M, 3) padded
    for i, lim in enumerate(limits):
        if lim:
            table[i, : len(lim)] = lim
    nxt = np.zeros(n, int)  # index of each agent's next pending limit
    waiting = np.zeros(n, int)
    cruise = np.array([a.speed for a in agents])
    brake = np.array([a.brake for a in agents])
    accel = np.array([a.accel for a in agents])
    half_len = np.array([a.size[0] / 2 for a in agents])
    walker = np.array([a.cls == PEDESTRIAN for a in agents])
    routes = pack(agents)
    lengths = (routes[1] - 1) * STEP
    out = np.zeros((frames, n))
    for t in range(frames):
        out[t] = s
        pos, head = route_pose(routes, s)
        # waiting at a stop: count down, then the stop is done
        was_waiting = waiting > 0
        waiting[was_waiting] -= 1
        nxt[was_waiting & (waiting == 0)] += 1
        ahead = table[rows[:, None], nxt[:, None] + np.arange(3)]  # (N, 3, 3): the next three limits
        first_s, first_v, first_wait = ahead[:, 0, 0], ahead[:, 0, 1], ahead[:, 0, 2].astype(int)
        arrive = ~was_waiting & (first_v == 0) & (s >= first_s - 0.3) & (v < 0.6)
        waiting[arrive] = first_wait[arrive]
        reach = np.sqrt(ahead[..., 1] ** 2 + 2 * brake[:, None] * np.clip(ahead[..., 0] - s[:, None] - 0.3, 0, None))
        allow = np.minimum(cruise, np.nan_to_num(reach, posinf=np.inf).min(1))
        allow[was_waiting | arrive] = 0.0
        nxt[(first_v > 0) & np.isfinite(first_s) & (s > first_s + 1.0)] += 1  # speed limit passed
        # gap keeping: the nearest agent ahead within the lane width (vehicles also yield to pedestrians)
        rel = pos[None, :, :] - pos[:, None, :]  # (i, j, 2): j seen from i
        fwd = np.einsum("ijk,ik->ij", rel, head)
        lat = np.abs(rel[..., 0] * head[:, None, 1] - rel[..., 1] * head[:, None, 0])
        in_lane = (fwd > 0) & (lat < 1.6) & ~np.eye(n, dtype=bool) & ~(walker[:, None] & ~walker[None, :])
        gap = np.where(in_lane, fwd - half_len[:, None] - half_len[None, :], np.inf).min(1)
        follow = np.sqrt(2 * brake * np.clip(gap - 2.0, 0, None))
        follow[:leader_ignores] = np.inf
        v = np.clip(np.minimum(allow, follow), np.maximum(v - 2 * brake * DT, 0.0), v + accel * DT)
        s = np.minimum(s + v * DT, lengths)
    return out


def pack(agents: list[Agent]) -> tuple[np.ndarray, np.ndarray]:
    """All routes in one array (N, L, 2), padded by repeating the last point, and their point counts."""
    counts = np.array([len(a.route.points) for a in agents])
    out = np.empty((len(agents), counts.max(), 2))
    for i, a in enumerate(agents):
        out[i, : counts[i]], out[i, counts[i]:] = a.route.points, a.route.points[-1]
    return out, counts


def route_pose(packed: tuple[np.ndarray, np.ndarray], s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logical position (N, 2) and unit heading (N, 2) of packed routes at arc lengths s (N,)."""
    routes, counts = packed
    rows = np.arange(len(routes))
    k = np.clip(s / STEP, 0, counts - 1)
    k0 = k.astype(np.int64)
    k1 = np.minimum(k0 + 1, counts - 1)
    pos = routes[rows, k0] + (routes[rows, k1] - routes[rows, k0]) * (k - k0)[:, None]
    hi = np.minimum(k0 + 5, counts - 1)
    ahead = routes[rows, hi] - routes[rows, np.maximum(hi - 5, 0)]
    norm = np.linalg.norm(ahead, axis=1, keepdims=True)
    head = np.where(norm > 1e-9, ahead / np.maximum(norm, 1e-12), np.array([1.0, 0.0]))
    return pos, head
