"""Consistency-aware outpainting of X-Scene (Yang et al., 2025, §3.3 Eq. 3): extend a scene chunk by chunk into a
large occupancy map.

A chunk is one grid of the VAE (X, Y, Z); chunk (i, j) of an n x m map starts at voxel (i * sx, j * sy), with
stride s = grid - overlap, so the map is (X + (n-1) sx, Y + (m-1) sy, Z). Chunks are made in row-major order.
Each new chunk's latent triplane is sampled with its denoising synchronised, inside the overlap mask M, with
the forward-noised latent of the chunks already made (Eq. 3):
    h_{t-1}^new <- (sqrt(abar) h_0^ref + sqrt(1 - abar) eps) * M + denoiser step(h_t^new) * (1 - M),
which is occlab.diffusion's inpainting (`known`, `known_mask`: the known cells re-noised to the step being
entered after every step, and set to h_0^ref exactly at the end), so at t = 0 the overlap of the new latent
equals the reference latent.

Which latent cells are known (triplane extrapolation decomposed into three planes, Fig. 3): a plane keeps
the axes it spans and averages over the one it lacks, so it shares cells with an earlier chunk only when both
cover the same range of that missing axis. The latent is kept in one canvas per plane and per chunk index
along the chunked axes the plane lacks: xy (lacks z, not chunked) in one big canvas, xz (lacks y) in one canvas
per chunk column j, yz (lacks x) in one per chunk row i. A new chunk's known cells are the written cells of its
crops of those canvases: for chunk (i, j) the xy cells shared with every earlier neighbour (left, above,
above-left), the xz rows shared with chunk (i-1, j), the yz rows shared with chunk (i, j-1).

Stitching: every chunk is decoded on its whole grid (argmax, uint8) and written where the map has no voxel
yet, so the overlap keeps the reference chunk's voxels (their latent cells agree; the decoded voxels may not
quite, since the decoder's plane convolutions and normalisation see the whole plane and the third plane is
new). `seam_agreement` measures, per new chunk, how often its own decoding agrees with the map in its
overlap.

The paper samples the outpainting with RePaint (5 resamplings, jump 20, App. A.2); `resample` = r gives every
sampler step r RePaint resamplings (occlab.diffusion, jump length one sampler step; default 0: Eq. 3 alone).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from occlab import planes as P
from occlab.diffusion import Diffusion, cfg_model
from occlab.errors import OcclabError
from occlab.models.xscene_diffusion import boxes_condition, decode_labels, encode_latent

CHUNK_AXES = "xy"  # chunks tile x (rows, index i) and y (columns, index j); z is never chunked


def _pair(v, what: str) -> tuple[int, int]:
    out = (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(a) for a in v)
    if len(out) != 2:
        raise OcclabError(f"{what} must be one number or two (x, y), got {v}")
    return out


def big_shape(grid, chunks=(3, 3), overlap=None) -> tuple[int, int, int]:
    """Size of an n x m map of chunks of `grid` (X, Y, Z) overlapping by `overlap` voxels (default half a chunk).
    Occ3D (200, 200, 16), 3 x 3, overlap 100 -> (400, 400, 16)."""
    X, Y, Z = (int(v) for v in grid)
    n, m = _pair(chunks, "chunks")
    ox, oy = _pair(overlap if overlap is not None else (X // 2, Y // 2), "overlap")
    return X + (n - 1) * (X - ox), Y + (m - 1) * (Y - oy), Z


def chunk_offsets(grid, chunks=(3, 3), overlap=None) -> dict[tuple[int, int], tuple[int, int]]:
    """{(i, j): (x0, y0)} voxel corner of every chunk, row-major (the generation order)."""
    X, Y, _ = (int(v) for v in grid)
    n, m = _pair(chunks, "chunks")
    ox, oy = _pair(overlap if overlap is not None else (X // 2, Y // 2), "overlap")
    if n < 1 or m < 1:
        raise OcclabError(f"chunks must be at least 1 x 1, got {n} x {m}")
    if not (0 <= ox < X and 0 <= oy < Y):
        raise OcclabError(f"overlap {(ox, oy)} must lie in [0, chunk size) = [0, {X}) x [0, {Y})")
    return {(i, j): (i * (X - ox), j * (Y - oy)) for i in range(n) for j in range(m)}


def stitch(chunks: Mapping[tuple[int, int], torch.Tensor], offsets: Mapping[tuple[int, int], tuple[int, int]],
           shape) -> torch.Tensor:
    """Chunk labels {(i, j): (X, Y, Z)} at their `offsets` -> one (X_big, Y_big, Z) uint8 map; chunks are written
    in row-major order where the map is still empty, so an overlap keeps the earlier (reference) chunk."""
    out = torch.zeros(tuple(int(v) for v in shape), dtype=torch.uint8)
    written = torch.zeros(out.shape[:2], dtype=torch.bool)
    for key in sorted(chunks):
        lab = chunks[key].to("cpu", torch.uint8)
        (x0, y0), (X, Y) = offsets[key], lab.shape[:2]
        region = (slice(x0, x0 + X), slice(y0, y0 + Y))
        fresh = ~written[region]
        out[region][fresh] = lab[fresh]
        written[region] = True
    return out


def seam_agreement(chunks: Mapping[tuple[int, int], torch.Tensor], offsets: Mapping[tuple[int, int], tuple[int, int]],
                   shape) -> dict[tuple[int, int], float]:
    """Per chunk after the first: the fraction of its overlap voxels (columns already covered by earlier chunks)
    where its own decoding equals the map stitched so far (1.0: a seamless continuation)."""
    out = {}
    done: dict = {}
    for key in sorted(chunks):
        if done:
            so_far = stitch(done, offsets, shape)
            covered = torch.zeros(so_far.shape[:2], dtype=torch.bool)
            for k in done:
                (x0, y0), (X, Y) = offsets[k], done[k].shape[:2]
                covered[x0:x0 + X, y0:y0 + Y] = True
            (x0, y0), lab = offsets[key], chunks[key].to("cpu", torch.uint8)
            region = (slice(x0, x0 + lab.shape[0]), slice(y0, y0 + lab.shape[1]))
            seam = covered[region]
            if seam.any():
                out[key] = (lab[seam] == so_far[region][seam]).float().mean().item()
        done[key] = chunks[key]
    return out


@dataclass
class OutpaintResult:
    """What `outpaint(..., details=True)` returns beside the map."""

    labels: torch.Tensor  # (X_big, Y_big, Z) uint8
    offsets: dict  # {(i, j): (x0, y0)} voxel corners
    chunks: dict = field(default_factory=dict)  # {(i, j): (X, Y, Z) uint8} each chunk's own decoding
    latents: dict = field(default_factory=dict)  # {(i, j): {plane: (C, a, b)}} each chunk's latent triplane
    known: dict = field(default_factory=dict)  # {(i, j): {plane: (a, b) bool}} the cells synchronised (Eq. 3 M)
    agreement: dict = field(default_factory=dict)  # seam_agreement of the chunks


def outpaint_chunk(denoiser, diffusion: Diffusion, known: Mapping[str, torch.Tensor] | None = None,
                   known_mask: Mapping[str, torch.Tensor] | None = None, cond: Mapping | None = None, *,
                   steps: int = 50, guidance: float = 1.0, method: str = "ddim", eta: float = 0.0,
                   clip: float | None = None, generator: torch.Generator | None = None,
                   resample: int = 0) -> dict[str, torch.Tensor]:
    """One chunk's latent triplane {plane: (1, C, a, b)}, sampled with Eq. 3 inside `known_mask`.

    known: reference latent planes {plane: (1, C, a, b)} (values outside the mask are ignored); known_mask:
    {plane: (1, 1, a, b) bool}. Without them: plain (conditional) sampling. cond: the denoiser's conditions
    (batch 1), guided with scale `guidance` (occlab.diffusion.cfg_model; 1 = conditional only). clip bounds the
    x_0 prediction of every step (e.g. 1 for the tanh-bounded latent of a VAE without Gaussian head).
    """
    lay = denoiser.layout
    device = next(denoiser.parameters()).device
    shape = (1, denoiser.config.channels, *lay.map_shape)
    kw = {}
    if known is not None:
        if known_mask is None:
            raise OcclabError("outpaint_chunk needs known_mask together with known")
        kw["known"] = lay.to_map({n: known[n].to(device) for n in lay.names})
        kw["known_mask"] = lay.to_map({n: known_mask[n].to(device).bool() for n in lay.names})
    model_fn = cfg_model(denoiser, {k: v.to(device) for k, v in (cond or {}).items()}, guidance)
    x = diffusion.sample(model_fn, shape, method=method, steps=steps if method == "ddim" else None, eta=eta,
                         generator=generator, device=device, clip=clip, resample=resample, **kw)
    return {n: v.contiguous() for n, v in lay.from_map(x).items()}


def outpaint(vae, denoiser, diffusion: Diffusion, layout_big: torch.Tensor | None = None,
             boxes_big: torch.Tensor | None = None, chunks=(3, 3), overlap=None, steps: int = 50, seed: int = 0, *,
             scene: torch.Tensor | None = None, guidance: float = 1.0, method: str = "ddim", eta: float = 0.0,
             clip: float | None = None, stats: Mapping | None = None, voxel_size=(1.0, 1.0, 1.0),
             min_bound=(0.0, 0.0, 0.0), details: bool = False, resample: int = 0):
    """Generate an n x m map of chunks by consistency-aware outpainting -> labels (X_big, Y_big, Z) uint8.

    vae: an X-Scene VAE (its grid is the chunk); denoiser: a TriplaneDiT over its latent; diffusion: the
    schedule it was trained with. layout_big: the whole map's BEV, (X_big, Y_big) integer classes or
    (K, X_big, Y_big) float (each chunk gets its crop); boxes_big: (M, 10) box rows in occlab's BOX_FIELDS
    order (frame column ignored) in the frame of the map, whose origin corner is `min_bound` and voxels
    `voxel_size` (defaults: voxel units from the map's corner); each chunk keeps the boxes whose centre it holds.
    overlap: voxels shared by neighbouring chunks along x and y (one number or two; default half a chunk),
    multiples of the VAE's downsampling. scene: an existing (X, Y, Z) scene to extend (chunk (0, 0), kept as
    it is); otherwise chunk (0, 0) is sampled. steps, method, eta, clip: the sampler (DDIM by default; clip
    bounds its x_0 predictions; resample: RePaint resamplings per step); guidance: classifier-free guidance
    scale. stats: {"mean", "std": {plane: (C,)}}
    when the denoiser was trained on normalised latents (x = (h - mean) / std): sampling and the overlap
    synchronisation happen in that space, the VAE decodes h = x * std + mean. The same seed gives the same map;
    details=True returns an OutpaintResult.
    """
    cfg = vae.config
    grid = tuple(cfg.grid)
    lat = cfg.latent_sizes
    rate = {a: grid["xyz".index(a)] // lat[a] for a in "xyz"}
    if tuple(denoiser.config.sizes) != tuple(lat[a] for a in "xyz") or denoiser.config.channels != cfg.latent_channels:
        raise OcclabError(f"the denoiser's latent {denoiser.config.sizes} x C {denoiser.config.channels} does not "
                          f"match the VAE's {tuple(lat.values())} x C {cfg.latent_channels}")
    X, Y, _ = grid
    ov = _pair(overlap if overlap is not None else (X // 2 // rate["x"] * rate["x"], Y // 2 // rate["y"] * rate["y"]),
               "overlap")
    if ov[0] % rate["x"] or ov[1] % rate["y"]:
        raise OcclabError(f"overlap {ov} must be a multiple of the VAE's downsampling {(rate['x'], rate['y'])}, so "
                          f"that the chunks' latent cells align")
    offsets = chunk_offsets(grid, chunks, ov)
    shape = big_shape(grid, chunks, ov)
    if layout_big is not None:
        want = tuple(shape[:2])
        if tuple(layout_big.shape[-2:]) != want or layout_big.dim() not in (2, 3):
            raise OcclabError(f"layout_big must be (X_big, Y_big) = {want} or (K, {want[0]}, {want[1]}), "
                              f"got {tuple(layout_big.shape)}")
    device = next(denoiser.parameters()).device
    modes = (vae.training, denoiser.training)
    vae.eval()
    denoiser.eval()
    generator = torch.Generator().manual_seed(int(seed))
    vsize = torch.as_tensor(voxel_size, dtype=torch.float32)
    corner = torch.as_tensor(min_bound, dtype=torch.float32)
    names = P.axis_pairs("xyz")
    C = cfg.latent_channels
    big_lat = {a: (shape["xyz".index(a)] // rate[a] if a in CHUNK_AXES else lat[a]) for a in "xyz"}
    canvas: dict = {}  # (plane, key) -> ((C, a, b) values, (a, b) written)
    result = OutpaintResult(torch.empty(0), offsets)
    try:
        for (i, j), (x0, y0) in offsets.items():
            index = {"x": i, "y": j}
            start = {"x": x0 // rate["x"], "y": y0 // rate["y"], "z": 0}
            crops, known, mask = {}, {}, {}
            for n in names:
                key = (n, tuple(index[a] for a in CHUNK_AXES if a not in n))
                if key not in canvas:
                    size = [big_lat[a] if a in CHUNK_AXES else lat[a] for a in n]
                    canvas[key] = (torch.zeros(C, *size, device=device), torch.zeros(*size, dtype=torch.bool,
                                                                                   device=device))
                crops[n] = (slice(None), *[slice(start[a], start[a] + lat[a]) for a in n])
                values, written = canvas[key]
                known[n], mask[n] = values[crops[n]][None].clone(), written[crops[n][1:]][None, None].clone()
            cond = _chunk_cond(denoiser, layout_big, boxes_big, x0, y0, grid, vsize, corner, device)
            if (i, j) == (0, 0) and scene is not None:
                labels = scene.to(device).long().reshape(1, *grid)
                planes = _normalise(encode_latent(vae, labels), stats)
                chunk = labels[0].to(torch.uint8)
            else:
                any_known = any(bool(m.any()) for m in mask.values())
                with torch.no_grad():
                    planes = outpaint_chunk(denoiser, diffusion, known if any_known else None,
                                            mask if any_known else None, cond, steps=steps, guidance=guidance,
                                            method=method, eta=eta, clip=clip, generator=generator,
                                            resample=resample)
                    chunk = decode_labels(vae, _normalise(planes, stats, inverse=True))[0]
            for n in names:
                key = (n, tuple(index[a] for a in CHUNK_AXES if a not in n))
                values, written = canvas[key]
                values[crops[n]] = planes[n][0].to(values.dtype)
                written[crops[n][1:]] = True
            result.chunks[(i, j)] = chunk.cpu()
            if details:
                result.latents[(i, j)] = {n: planes[n][0].cpu() for n in names}
                result.known[(i, j)] = {n: mask[n][0, 0].cpu() for n in names}
    finally:
        vae.train(modes[0])
        denoiser.train(modes[1])
    result.labels = stitch(result.chunks, offsets, shape)
    if not details:
        return result.labels
    result.agreement = seam_agreement(result.chunks, offsets, shape)
    return result


def _normalise(planes: Mapping[str, torch.Tensor], stats: Mapping | None, inverse: bool = False) -> dict:
    """(h - mean) / std per plane and channel, or its inverse; identity without stats."""
    if stats is None:
        return dict(planes)
    out = {}
    for n, v in planes.items():
        mean = torch.as_tensor(stats["mean"][n], dtype=v.dtype, device=v.device).reshape(1, -1, 1, 1)
        std = torch.as_tensor(stats["std"][n], dtype=v.dtype, device=v.device).reshape(1, -1, 1, 1)
        out[n] = v * std + mean if inverse else (v - mean) / std
    return out


def _chunk_cond(denoiser, layout_big, boxes_big, x0: int, y0: int, grid, vsize, corner, device) -> dict:
    """The denoiser's conditions for the chunk at voxel corner (x0, y0): layout crop and the boxes it holds."""
    X, Y, Z = grid
    cond = {}
    if layout_big is not None:
        crop = layout_big[..., x0:x0 + X, y0:y0 + Y]
        cond["layout"] = crop[None].to(device)  # (1, X, Y) classes or (1, K, X, Y)
    if boxes_big is not None and len(boxes_big):
        lo = corner + torch.tensor([x0, y0, 0], dtype=torch.float32) * vsize
        hi = lo + torch.tensor([X, Y, Z], dtype=torch.float32) * vsize
        corners, classes = boxes_condition(boxes_big[None].float(), lo, hi, denoiser.config.max_boxes)
        cond["boxes"], cond["box_classes"] = corners.to(device), classes.to(device)
    return cond


__all__ = ["CHUNK_AXES", "OutpaintResult", "big_shape", "chunk_offsets", "outpaint", "outpaint_chunk",
           "seam_agreement", "stitch"]
