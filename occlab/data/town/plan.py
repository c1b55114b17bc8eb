"""The static town: a road grid bent by a smooth warp, city blocks, street furniture, and its raster.

The plan lives in *logical* coordinates, where roads are straight and blocks are rectangles. The physical
world is a smooth warp of it (`logical = physical + warp(physical)`), so roads curve gently. Everything
random is drawn from generators seeded by (seed, what, index), so any part of the town is the same whatever
region is rasterised, and a sequence of T frames is the prefix of the longer one with the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from occlab.classes import CLASS_ID

LANE_WIDTH = 3.5
CELL = 0.2  # raster cell of the logical plan, metres
EXTENT = 600.0  # roads are laid out over [-EXTENT, EXTENT] in both axes
BUILDING, BARRIER, OTHER, POLE = CLASS_ID["building"], CLASS_ID["barrier"], CLASS_ID["other"], CLASS_ID["pole"]
ROAD, GROUND, SIDEWALK, VEGETATION = CLASS_ID["road"], CLASS_ID["ground"], CLASS_ID["sidewalk"], CLASS_ID["vegetation"]
BLOCK_KINDS = ("urban", "residential", "park", "industrial", "parking")
BLOCK_WEIGHTS = (0.38, 0.22, 0.16, 0.12, 0.12)


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A generator for one named part of the town, independent of every other part."""
    return np.random.default_rng([seed, *key])


@dataclass(frozen=True)
class Road:
    """A straight road in the logical plan: `axis` 0 runs along y at x = center, axis 1 along x at y = center."""

    axis: int
    index: int
    center: float
    lanes: int  # per direction
    sidewalk: float

    @property
    def half_width(self) -> float:
        return self.lanes * LANE_WIDTH

    @property
    def outer(self) -> float:
        """Half width including both sidewalks."""
        return self.half_width + self.sidewalk


@dataclass
class Warp:
    """A smooth displacement field: logical = physical + warp(physical), small gradient so it inverts."""

    amp: np.ndarray  # (K, 2) displacement amplitude of each wave, metres
    freq: np.ndarray  # (K, 2) wave vector, rad/m
    phase: np.ndarray  # (K,)

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        """Displacement at physical points (..., 2)."""
        if len(self.amp) == 0:
            return np.zeros_like(xy)
        arg = xy @ self.freq.T + self.phase  # (..., K)
        return np.sin(arg) @ self.amp

    def to_logical(self, xy: np.ndarray) -> np.ndarray:
        return xy + self(xy)

    def to_physical(self, uv: np.ndarray, iters: int = 6) -> np.ndarray:
        """Invert the warp by fixed-point iteration (it contracts: |grad warp| < 0.3, so 6 steps reach mm)."""
        if len(self.amp) == 0:
            return uv.copy()
        xy = uv.copy()
        for _ in range(iters):
            xy = uv - self(xy)
        return xy


@dataclass
class Pole:
    """A one-voxel-thick vertical structure (lamp, sign, traffic light) at a logical position."""

    x: float
    y: float
    height: float


@dataclass
class Raster:
    """The plan rasterised on a logical grid: a ground class and one object interval per cell."""

    origin: np.ndarray  # logical (x, y) of cell (0, 0)'s corner
    ground: np.ndarray  # (NX, NY) uint8 class of the surface layer
    obj: np.ndarray  # (NX, NY) uint8 class of the object standing on the cell (0 = none)
    bottom: np.ndarray  # (NX, NY) uint16 object bottom, decimetres above ground
    top: np.ndarray  # (NX, NY) uint16 object top, decimetres above ground

    def cells(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Index slices of the cells whose centres fall in a logical rectangle (clipped)."""
        nx, ny = self.ground.shape
        ox, oy = self.origin

        def index(v: float, o: float, n: int) -> int:
            return min(max(int(np.ceil((v - o) / CELL - 0.5)), 0), n)

        return slice(index(x0, ox, nx), index(x1, ox, nx)), slice(index(y0, oy, ny), index(y1, oy, ny))

    def put(self, x0, x1, y0, y1, cls: int, bottom: float, top: float, where: np.ndarray | None = None) -> None:
        """Stand an object of class `cls` from `bottom` to `top` metres on a rectangle (optionally masked)."""
        si, sj = self.cells(x0, x1, y0, y1)
        if si.start >= si.stop or sj.start >= sj.stop:
            return
        sel = np.s_[si, sj]
        if where is None:
            where = np.ones((si.stop - si.start, sj.stop - sj.start), bool)
        self.obj[sel][where] = cls
        self.bottom[sel][where] = int(round(bottom * 10))
        self.top[sel][where] = int(round(top * 10))

    def disc(self, x: float, y: float, r: float, cls: int, bottom: float, top: float) -> None:
        """Stand an object on a disc (tree canopies, bushes)."""
        si, sj = self.cells(x - r, x + r, y - r, y + r)
        cx = self.origin[0] + (np.arange(si.start, si.stop) + 0.5) * CELL
        cy = self.origin[1] + (np.arange(sj.start, sj.stop) + 0.5) * CELL
        inside = (cx[:, None] - x) ** 2 + (cy[None, :] - y) ** 2 <= r * r
        self.put(x - r, x + r, y - r, y + r, cls, bottom, top, inside)

    def surface(self, x0, x1, y0, y1, cls: int) -> None:
        """Paint the ground class of a rectangle."""
        si, sj = self.cells(x0, x1, y0, y1)
        self.ground[si, sj] = cls


@dataclass
class Block:
    """The land between four roads' sidewalks, with a kind that decides what stands on it."""

    i: int
    j: int
    kind: str
    x0: float
    x1: float
    y0: float
    y1: float


@dataclass
class TownPlan:
    """Roads, warp and blocks of one town; rasterises any region on demand."""

    seed: int
    roads: tuple[list[Road], list[Road]]  # (roads along y at x = c, roads along x at y = c)
    warp: Warp
    poles: list[Pole] = field(default_factory=list)
    parked: list[tuple[float, float, float, int, int]] = field(default_factory=list)  # x, y, yaw, size, track

    def crossing(self, axis: int) -> list[Road]:
        """The roads that cross a road of the given axis."""
        return self.roads[1 - axis]

    def blocks(self, x0: float, x1: float, y0: float, y1: float) -> list[Block]:
        """Blocks overlapping a logical rectangle."""
        out = []
        rx, ry = self.roads
        for a, b in zip(rx[:-1], rx[1:]):
            if b.center < x0 - 200 or a.center > x1 + 200:
                continue
            for c, d in zip(ry[:-1], ry[1:]):
                if d.center < y0 - 200 or c.center > y1 + 200:
                    continue
                bx0, bx1 = a.center + a.outer, b.center - b.outer
                by0, by1 = c.center + c.outer, d.center - d.outer
                if bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1:
                    continue
                kind = BLOCK_KINDS[rng_for(self.seed, 2, a.index, c.index).choice(len(BLOCK_KINDS), p=BLOCK_WEIGHTS)]
                out.append(Block(a.index, c.index, kind, bx0, bx1, by0, by1))
        return out

    def rasterize(self, x0: float, x1: float, y0: float, y1: float) -> Raster:
        """Rasterise the logical rectangle; also collects the poles and parked cars that stand in it."""
        x0, y0 = np.floor(x0 / CELL) * CELL, np.floor(y0 / CELL) * CELL  # one global cell lattice
        nx, ny = int(np.ceil((x1 - x0) / CELL)), int(np.ceil((y1 - y0) / CELL))
        r = Raster(np.array([x0, y0]), np.full((nx, ny), GROUND, np.uint8), np.zeros((nx, ny), np.uint8),
                   np.zeros((nx, ny), np.uint16), np.zeros((nx, ny), np.uint16))
        self.poles, self.parked = [], []
        for block in self.blocks(x0, x1, y0, y1):
            BLOCK_BUILDERS[block.kind](self, r, block, rng_for(self.seed, 3, block.i, block.j))
        near = [(axis, road) for axis, roads in enumerate(self.roads) for road in roads
                if (x0 - 50 < road.center < x1 + 50 if axis == 0 else y0 - 50 < road.center < y1 + 50)]
        for carriageway in (False, True):  # sidewalks first, carriageways over them at crossings
            for axis, road in near:
                _road_surface(r, road, axis, x0, x1, y0, y1, carriageway)
        for axis, road in near:
            _street_furniture(self, r, road, axis, (x0, x1) if axis == 1 else (y0, y1))
        return r


def make_plan(seed: int) -> TownPlan:
    """Lay out the road grid and the warp of the town with this seed."""
    roads: tuple[list[Road], list[Road]] = ([], [])
    for axis in (0, 1):
        rng = rng_for(seed, 0, axis)
        c, k = -EXTENT + rng.uniform(0, 40), 0
        while c < EXTENT:
            lanes = 2 if rng.random() < 0.25 else 1
            roads[axis].append(Road(axis, k, c, lanes, rng.uniform(2.5, 4.0)))
            c += rng.uniform(48, 100)
            k += 1
    rng = rng_for(seed, 1)
    waves = 0 if rng.random() < 0.3 else 2
    direction = rng.uniform(0, 2 * np.pi, waves)
    wavelength = rng.uniform(180, 320, waves)
    freq = np.stack([np.cos(direction), np.sin(direction)], -1) * (2 * np.pi / wavelength)[:, None]
    amp = rng.uniform(-1, 1, (waves, 2)) * rng.uniform(1.5, 4.0, (waves, 1)) / np.sqrt(2)
    return TownPlan(seed, roads, Warp(amp, freq, rng.uniform(0, 2 * np.pi, waves)))


def _road_surface(r: Raster, road: Road, axis: int, x0, x1, y0, y1, carriageway: bool = False) -> None:
    """Sidewalks on both sides (first pass), then the carriageway on top (second pass)."""
    half = road.half_width if carriageway else road.outer
    cls = ROAD if carriageway else SIDEWALK
    if axis == 0:
        r.surface(road.center - half, road.center + half, y0, y1, cls)
        if not carriageway:
            r.put(road.center - half, road.center + half, y0, y1, 0, 0, 0)  # nothing stands on streets
    else:
        r.surface(x0, x1, road.center - half, road.center + half, cls)
        if not carriageway:
            r.put(x0, x1, road.center - half, road.center + half, 0, 0, 0)


def _along(axis: int, center: float, a: float, lateral: float) -> tuple[float, float]:
    """Logical (x, y) of a point `a` along a road and `lateral` across it (towards +x or +y)."""
    return (center + lateral, a) if axis == 0 else (a, center + lateral)


def _rect(r: Raster, axis: int, center: float, a0: float, a1: float, l0: float, l1: float, cls, bottom, top):
    """An object on a rectangle given in road coordinates (along a0..a1, across l0..l1)."""
    (xa, ya), (xb, yb) = _along(axis, center, a0, l0), _along(axis, center, a1, l1)
    r.put(min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb), cls, bottom, top)


def _street_furniture(plan: TownPlan, r: Raster, road: Road, axis: int, span: tuple[float, float]) -> None:
    """Trees, lamps, signs, bins and guard rails along one road's sidewalks, segment by segment."""
    crossing = plan.crossing(axis)
    for seg, (c0, c1) in enumerate(zip(crossing[:-1], crossing[1:])):
        a0, a1 = c0.center + c0.outer, c1.center - c1.outer
        if a1 < span[0] - 10 or a0 > span[1] + 10:
            continue
        rng = rng_for(plan.seed, 4, axis, road.index, seg)
        for side in (-1, 1):
            curb = side * (road.half_width + 0.6)  # furniture stands by the curb; pedestrians walk further in
            if rng.random() < 0.7:  # a row of street trees
                gap = rng.uniform(7, 14)
                for a in np.arange(a0 + rng.uniform(2, gap), a1 - 2, gap):
                    x, y = _along(axis, road.center, a, curb)
                    _tree(r, x, y, rng)
            if rng.random() < 0.85:  # street lamps
                gap = rng.uniform(18, 30)
                for a in np.arange(a0 + rng.uniform(1, gap), a1 - 1, gap):
                    x, y = _along(axis, road.center, a, curb + side * 0.2)
                    plan.poles.append(Pole(x, y, rng.uniform(5.0, 8.0)))
            for end in (a0 + 1.0, a1 - 1.0):  # signs and traffic lights at the corners, bollards
                if rng.random() < 0.6:
                    x, y = _along(axis, road.center, end, curb)
                    plan.poles.append(Pole(x, y, rng.uniform(2.4, 5.5)))
                if rng.random() < 0.3:
                    _rect(r, axis, road.center, end - 1.5, end + 1.5, curb - 0.2, curb + 0.2, BARRIER, 0, 0.9)
            for _ in range(rng.poisson(2.5)):  # bins, benches, boxes, kiosks
                a = rng.uniform(a0 + 2, a1 - 2)
                length = rng.uniform(0.6, 2.0)
                _rect(r, axis, road.center, a, a + length, curb - 0.4, curb + 0.4, OTHER, 0, rng.uniform(0.6, 1.4))
            if rng.random() < 0.3:  # a guard rail along the curb
                a = rng.uniform(a0, a1 - 10)
                _rect(r, axis, road.center, a, min(a1, a + rng.uniform(10, 40)), curb - 0.2 * side - 0.2,
                      curb - 0.2 * side + 0.2, BARRIER, 0, 0.9)


def _tree(r: Raster, x: float, y: float, rng: np.random.Generator, big: bool = False) -> None:
    """A tree: a canopy disc high up and a trunk to the ground (all vegetation)."""
    radius = rng.uniform(1.8, 3.5) if big else rng.uniform(1.2, 2.5)
    top = rng.uniform(5.0, 10.0) if big else rng.uniform(4.0, 7.5)
    r.disc(x, y, radius, VEGETATION, rng.uniform(2.0, 3.0), top)
    r.put(x - 0.2, x + 0.2, y - 0.2, y + 0.2, VEGETATION, 0.0, top)


def _lots(block: Block, rng: np.random.Generator, width: tuple[float, float], depth: tuple[float, float]):
    """Building lots along the four sides of a block: (x0, x1, y0, y1) rectangles, corners not doubled."""
    lots = []
    w, h = block.x1 - block.x0, block.y1 - block.y0
    for side in range(4):
        along = w if side < 2 else h
        d = min(rng.uniform(*depth), (h if side < 2 else w) / 2 - 1)
        if d < 4:
            continue
        a = 0.0 if side >= 2 else d  # lots on the x sides skip the corners taken by the y sides
        end = along if side >= 2 else along - d
        while a < end - 4:
            lw = min(rng.uniform(*width), end - a)
            setback = rng.uniform(0, 2.0)
            if side == 0:
                lots.append((block.x0 + a, block.x0 + a + lw, block.y0 + setback, block.y0 + d))
            elif side == 1:
                lots.append((block.x0 + a, block.x0 + a + lw, block.y1 - d, block.y1 - setback))
            elif side == 2:
                lots.append((block.x0 + setback, block.x0 + d, block.y0 + a, block.y0 + a + lw))
            else:
                lots.append((block.x1 - d, block.x1 - setback, block.y0 + a, block.y0 + a + lw))
            a += lw + rng.uniform(0, 3.0)
    return lots


def _urban(plan: TownPlan, r: Raster, b: Block, rng: np.random.Generator) -> None:
    """Perimeter blocks of varied height (many taller than any grid), courtyards with trees."""
    for x0, x1, y0, y1 in _lots(b, rng, (8, 26), (10, 22)):
        if rng.random() < 0.88:
            height = rng.choice([rng.uniform(4, 12), rng.uniform(12, 45)], p=[0.5, 0.5])
            r.put(x0, x1, y0, y1, BUILDING, 0, height)
            if rng.random() < 0.3:  # an L-shaped annex
                r.put(x0, (x0 + x1) / 2, y0, y1 + rng.uniform(-3, 3), BUILDING, 0, height * rng.uniform(0.4, 0.9))
        else:
            for _ in range(rng.integers(1, 4)):
                x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
                r.put(x, x + rng.uniform(0.8, 2.5), y, y + rng.uniform(0.8, 2.5), OTHER, 0, rng.uniform(0.8, 2.5))
    for _ in range(rng.poisson(3)):
        _tree(r, rng.uniform(b.x0 + 24, max(b.x0 + 24, b.x1 - 24)), rng.uniform(b.y0 + 24, max(b.y0 + 24, b.y1 - 24)),
              rng, big=True)


def _residential(plan: TownPlan, r: Raster, b: Block, rng: np.random.Generator) -> None:
    """Detached houses with hedges, fences and garden trees."""
    for x0, x1, y0, y1 in _lots(b, rng, (12, 18), (14, 22)):
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        hx, hy = (x1 - x0) / 2 * rng.uniform(0.5, 0.75), (y1 - y0) / 2 * rng.uniform(0.5, 0.75)
        r.put(cx - hx, cx + hx, cy - hy, cy + hy, BUILDING, 0, rng.uniform(4, 9))
        if rng.random() < 0.5:
            edge = rng.integers(4)
            hedge = [(x0, x1, y0, y0 + 0.8), (x0, x1, y1 - 0.8, y1), (x0, x0 + 0.8, y0, y1), (x1 - 0.8, x1, y0, y1)][edge]
            cls, top = (VEGETATION, rng.uniform(0.9, 1.6)) if rng.random() < 0.6 else (BARRIER, rng.uniform(1.0, 1.8))
            r.put(*hedge, cls, 0, top)
        if rng.random() < 0.5:
            _tree(r, rng.uniform(x0, x1), rng.uniform(y0, y1), rng)


def _park(plan: TownPlan, r: Raster, b: Block, rng: np.random.Generator) -> None:
    """Terrain with trees, bushes, a footpath, benches and lamps; sometimes fenced or hedged."""
    area = (b.x1 - b.x0) * (b.y1 - b.y0)
    px = rng.uniform(b.x0 + 5, b.x1 - 5) if b.x1 - b.x0 > 12 else (b.x0 + b.x1) / 2
    r.surface(px - 1.2, px + 1.2, b.y0, b.y1, SIDEWALK)
    for _ in range(rng.poisson(area / 90)):
        x, y = rng.uniform(b.x0, b.x1), rng.uniform(b.y0, b.y1)
        if abs(x - px) > 3.5:
            _tree(r, x, y, rng, big=rng.random() < 0.5)
    for _ in range(rng.poisson(area / 250)):
        x, y = rng.uniform(b.x0, b.x1), rng.uniform(b.y0, b.y1)
        if abs(x - px) > 2.5:
            r.disc(x, y, rng.uniform(0.6, 1.6), VEGETATION, 0, rng.uniform(0.5, 1.3))
    for y in np.arange(b.y0 + 8, b.y1 - 8, rng.uniform(15, 30)):
        r.put(px + 1.4, px + 2.0, y, y + 1.6, OTHER, 0, 0.8)
        plan.poles.append(Pole(px - 1.6, y, rng.uniform(3.5, 5.0)))
    edge = rng.random()
    if edge < 0.35:
        _fence(r, b, BARRIER, rng.uniform(1.2, 2.0), gate=px)
    elif edge < 0.7:
        _fence(r, b, VEGETATION, rng.uniform(0.8, 1.5), gate=px, thickness=0.8)


def _industrial(plan: TownPlan, r: Raster, b: Block, rng: np.random.Generator) -> None:
    """Large low halls, stacked containers and a perimeter fence on bare ground."""
    w, h = b.x1 - b.x0, b.y1 - b.y0
    for _ in range(rng.integers(1, 4)):
        hw, hh = rng.uniform(0.15, 0.35) * w, rng.uniform(0.15, 0.35) * h
        cx, cy = rng.uniform(b.x0 + hw + 4, max(b.x0 + hw + 4, b.x1 - hw - 4)), rng.uniform(
            b.y0 + hh + 4, max(b.y0 + hh + 4, b.y1 - hh - 4))
        r.put(cx - hw, cx + hw, cy - hh, cy + hh, BUILDING, 0, rng.uniform(5, 10))
    for _ in range(rng.poisson(6)):
        x, y = rng.uniform(b.x0 + 2, b.x1 - 8), rng.uniform(b.y0 + 2, b.y1 - 4)
        horizontal = rng.random() < 0.5
        r.put(x, x + (6.1 if horizontal else 2.4), y, y + (2.4 if horizontal else 6.1), OTHER, 0,
              2.6 * rng.integers(1, 3))
    _fence(r, b, BARRIER, rng.uniform(1.6, 2.4), gate=(b.x0 + b.x1) / 2)


def _parking(plan: TownPlan, r: Raster, b: Block, rng: np.random.Generator) -> None:
    """An asphalt lot with rows of parked cars, lamps and a low barrier."""
    r.surface(b.x0, b.x1, b.y0, b.y1, ROAD)
    slot = 1_000_000 + (b.i * 100 + b.j) * 1000  # stable track ids, whatever region is rasterised
    k = 0
    for y in np.arange(b.y0 + 4, b.y1 - 4, 7.0):
        for x in np.arange(b.x0 + 3, b.x1 - 3, 2.8):
            if rng.random() < 0.55:
                yaw = np.pi / 2 + (np.pi if rng.random() < 0.5 else 0)
                plan.parked.append((x, y + 1.2, yaw, int(rng.integers(3)), slot + k))
                k += 1
        plan.poles.append(Pole(b.x0 + 1, y, rng.uniform(5, 7)))
    if rng.random() < 0.6:
        _fence(r, b, BARRIER, 0.8, gate=(b.x0 + b.x1) / 2, thickness=0.4)


def _fence(r: Raster, b: Block, cls: int, top: float, gate: float, thickness: float = 0.4) -> None:
    """A fence or hedge around a block, with a gate where a footpath leaves it."""
    t = thickness
    for y0, y1 in ((b.y0, b.y0 + t), (b.y1 - t, b.y1)):
        r.put(b.x0, gate - 2.0, y0, y1, cls, 0, top)
        r.put(gate + 2.0, b.x1, y0, y1, cls, 0, top)
    r.put(b.x0, b.x0 + t, b.y0, b.y1, cls, 0, top)
    r.put(b.x1 - t, b.x1, b.y0, b.y1, cls, 0, top)


BLOCK_BUILDERS = {"urban": _urban, "residential": _residential, "park": _park, "industrial": _industrial,
                  "parking": _parking}
