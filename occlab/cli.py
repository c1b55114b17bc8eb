"""The `occlab` command line. Every command imports its heavy modules only when it runs."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from occlab.errors import OcclabError

PRESETS = ("smoke", "study", "paper")
VAE_MODELS = ("dynamiccity", "sep4d", "occsora", "xscene")  # = occlab.models.MODELS (tested); --help stays light
CAMERAS = ("oblique", "bev", "ego")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _data_sample(args) -> int:
    from occlab.data.town import generate_sequence

    seq = generate_sequence(args.seed, args.geometry, args.frames, command=args.command)
    path = seq.save(args.out)
    print(f"wrote {path}: {seq.frames} frames of {args.geometry} {seq.labels.shape[1:]}, command "
          f"{seq.command}, {len(seq.boxes)} boxes")
    return 0


def _data_verify(args) -> int:
    from occlab.data.verify import verify_main

    return verify_main(args.name, args.root)


def _data_describe(args) -> int:
    from occlab.data.verify import describe

    info = describe(args.name, args.root, frames=args.frames)
    print(json.dumps(info, indent=None if args.json else 2))
    return 0


def _data_export(args) -> int:
    from occlab.data import export
    from occlab.data.town import SPLITS, generate_sequence

    start = SPLITS[args.split][0]
    seqs = [generate_sequence(start + i, args.geometry, args.frames) for i in range(args.n)]
    writer = {"carlasc": export.export_carlasc, "occ3d_nuscenes": export.export_occ3d_nuscenes,
              "semantickitti": export.export_semantickitti}[args.layout]
    writer(seqs, args.out, split=args.split)
    print(f"wrote {args.n} synthetic sequences in the {args.layout} layout under {args.out}")
    return 0


def _view(args) -> int:
    from occlab.render.scene import view_file

    out = view_file(args.file, frame=args.frame, camera=args.camera, out=args.out)
    print(f"wrote {out}")
    return 0


def _reproduce(args) -> int:
    from occlab.reproduce import reproduce

    result = reproduce(preset=args.preset, only=args.only, out_dir=args.out, dataset=args.dataset,
                       data_root=args.data_root, device=args.device, seed=args.seed)
    return 0 if result.ok else 1


def _eval_recon(args) -> int:
    from occlab.metrics.recon import eval_recon_files

    res = eval_recon_files(args.pred, args.gt, args.mask)
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))
    return 0


def _parse_rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four integers like 2,2,2,2, got {text!r}") from None
    if len(rates) != 4 or any(r not in (1, 2, 4) for r in rates):
        raise argparse.ArgumentTypeError(f"expected four rates dT,dX,dY,dZ each in 1, 2, 4, got {text!r}")
    return rates


def _train_vae(args) -> int:
    from occlab.studies.vae import vae_setup
    from occlab.train.runs import build_model, model_spec, run_key, runs_dir
    from occlab.train.trainer import train

    model_kw = {k: getattr(args, k) for k in ("rates", "encoder", "decoder", "expansion", "fusion")
                if getattr(args, k) is not None}
    cfg, data, train_cfg = vae_setup(args.model, args.preset, args.dataset, args.data_root, args.device, args.seed,
                                     geometry=args.geometry, frames=args.frames, **model_kw)
    for key in ("steps", "precision", "kl_weight", "batch_size", "threads", "lr"):
        if getattr(args, key) is not None:
            setattr(train_cfg, key, getattr(args, key))

    spec = model_spec(args.model, cfg)
    out = args.out or runs_dir() / run_key(spec, data, train_cfg)
    model = build_model(args.model, spec["config"], train_cfg.seed)
    result = train(model, spec, data, train_cfg, out, num_classes=cfg.num_classes)
    print(json.dumps({"out": str(result.out_dir), "miou": result.miou, "iou": result.metrics["val"]["iou"],
                      "s_per_iter": result.metrics["s_per_iter"], "peak_mem_gib": result.metrics["peak_mem_gib"]}))
    return 0


def _eval_vae(args) -> int:
    from occlab.train.runs import load_trained
    from occlab.train.trainer import evaluate

    model, num_classes, dataset = load_trained(args.ckpt, args.split)
    metrics = evaluate(model, dataset, args.device, num_classes).to_dict()
    out = {"miou": metrics["miou"], "iou": metrics["iou"], "per_class": metrics["per_class"],
           "split": args.split, "windows": len(dataset)}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


def _eval_gen(args) -> int:
    from occlab.metrics.generation import eval_gen_dirs

    res = eval_gen_dirs(args.real, args.fake, args.space, weights=args.weights, extractor=args.extractor,
                        dataset=args.dataset, geometry=args.geometry, frame_stride=args.frame_stride,
                        device=args.device)
    res = {k: (None if isinstance(v, float) and v != v else v) for k, v in res.items()}  # NaN is not JSON
    if args.compare:  # refuse to set this result beside one from another metric network
        from occlab.metrics.generation import compare_results

        try:
            other = json.loads(Path(args.compare).read_text())
        except (OSError, ValueError) as e:
            raise OcclabError(f"--compare {args.compare}: not a JSON result of `occlab eval gen` ({e})") from e
        compare_results(other, res)
        res["compared_with"] = {k: other.get(k) for k in ("fid", "kid", "precision", "recall", "network_version")}
    print(json.dumps(res) if args.json else json.dumps(res, indent=2))
    return 0


def _metrics_build(args) -> int:
    from occlab.metrics import networks

    nets = networks.build(args.dataset, args.data_root, args.geometry, tuple(args.grid) if args.grid else None,
                          tuple(args.kinds), args.out, args.device, args.force)
    for net in nets:
        print(f"{net.name}: {net.path} (sha256 {net.manifest['sha256'][:12]})")
    return 0


def _metrics_list(args) -> int:
    from occlab.metrics import networks

    nets = networks.installed()
    if args.json:
        print(json.dumps([{"name": n.name, "path": str(n.path), "committed": n.committed, **n.manifest}
                          for n in nets], indent=2))
        return 0
    if not nets:
        print(f"no metric networks installed (committed: {networks.COMMITTED}, user: {networks.user_root()})")
    for n in nets:
        m = n.manifest
        print(f"{n.name:45s} {'committed' if n.committed else 'user':9s} sha256 {m['sha256'][:12]} "
              f"torch {m.get('torch', '?'):8s} reference n={m['reference_split']['count']}  {n.path}")
    return 0


def _runs_list(args) -> int:
    from occlab.train import runs

    rows = [runs.summary(r) for r in runs.list_runs(args.root)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs under {args.root or runs.runs_dir()}")
    for r in rows:
        final = " ".join(f"{k}={v:.4g}" for k, v in r["final"].items()) or "-"
        print(f"{r['id']:28s} {r['model']:14s} {'done' if r['finished'] else 'open':4s} {r['date']}  "
              f"{r['config']}  {final}")
    return 0


def _runs_show(args) -> int:
    from occlab.train import runs

    print(json.dumps(runs.show(runs.find_run(args.id, args.root)), indent=2, default=str))
    return 0


def _runs_reproduce(args) -> int:
    import tempfile

    from occlab.train import runs

    scratch = args.scratch or tempfile.mkdtemp(prefix="occlab-reproduce-")
    res = runs.reproduce(args.id, scratch, args.root, progress=not args.quiet)
    print(json.dumps(res, indent=2, default=str))
    return 0


def _train_features(args) -> int:
    from occlab.train.features import train_f2d, train_f3d

    fn = train_f3d if args.kind == "f3d" else train_f2d
    path = fn(dataset=args.dataset, data_root=args.data_root, geometry=args.geometry,
              crop=tuple(args.crop) if args.crop else None, steps=args.steps, device=args.device, out=args.out,
              force=args.force)
    print(f"wrote {path}")
    return 0


def _model_info(args) -> int:
    from occlab.data import get_geometry
    from occlab.models import MODELS

    grid = get_geometry(args.geometry).grid
    num_classes = 12 if args.geometry == "occ3d" else 11
    entry = MODELS[args.name]
    kw = {"rates": args.rates} if args.rates is not None else {}
    info = entry.info(entry.presets["paper"](grid, args.frames, num_classes=num_classes, **kw))
    print(json.dumps(info) if args.json else json.dumps(info, indent=2))
    return 0


BENCH_MODELS = ("dynamiccity-vae", "dynamiccity-dit", "sep4d", "occsora", "xscene-vae")  # = bench.MODELS (tested)


def bench_spec(args):
    """The BenchSpec of `occlab bench step`'s arguments."""
    from occlab.bench import STATIC, BenchSpec

    if args.model in STATIC and args.frames not in (None, 1):
        raise OcclabError(f"--model {args.model} is static (one scene per sample): leave out --frames or give 1 "
                          f"(got {args.frames}); --batch sets the scenes per step")
    frames = 16 if args.frames is None else args.frames
    return BenchSpec(model=args.model, task=args.task, geometry=args.geometry, frames=frames, batch=args.batch,
                     device=args.device, threads=args.threads, precision=args.precision, steps=args.steps,
                     warmup=args.warmup, small=args.small, reference=args.reference, checkpoint=args.checkpoint,
                     frame_chunk=args.frame_chunk, attn_dropout=args.attn_dropout, rates=args.rates,
                     encoder=args.encoder, decoder=args.decoder, widths=args.widths,
                     grid=tuple(args.grid) if args.grid else None)


def _bench_step(args) -> int:
    from occlab.bench import run

    result = run(bench_spec(args))
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


DIT_CONDITIONS = ("command", "trajectory", "layout", "previous")  # = occlab.models.dit.CONDITIONS (tested)
ROLLOUTS = ("pro", "unfold", "vconcat")  # = occlab.planes.ROLLOUTS (tested)
SAMPLERS = ("ddim", "ddpm")


def _parse_conditions(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in names if v not in DIT_CONDITIONS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown conditions {bad}; expected some of {','.join(DIT_CONDITIONS)}")
    return names


def _train_dit(args) -> int:
    from occlab.train.dit_trainer import dit_setup, run_key, train_dit
    from occlab.train.latents import read_vae_checkpoint
    from occlab.train.runs import runs_dir

    dit, cfg = dit_setup(args.vae_ckpt, args.preset, args.rollout, args.conditions or (), args.device, args.seed)
    for key in ("steps", "batch_size", "lr", "precision", "ema_decay", "threads"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.sequence_frames is not None:
        cfg.data_options = {"seq_len": args.sequence_frames}
    out = args.out or runs_dir() / run_key(dit, cfg, read_vae_checkpoint(args.vae_ckpt)["fingerprint"])
    result = train_dit(args.vae_ckpt, out, dit, cfg, latents_dir=args.latents)
    m = result.metrics
    print(json.dumps({"out": str(result.out_dir), "ckpt": str(result.checkpoint), "steps": m["steps"],
                      "final_loss": m["final_loss"], "params": m["params"], "s_per_iter": m["s_per_iter"],
                      "peak_mem_gib": m["peak_mem_gib"]}))
    return 0


def _generate(args) -> int:
    if args.model == "xscene":
        return _generate_xscene(args)
    given = [f"--{n}" for n in ("layout", "boxes") if getattr(args, n)]
    if given:
        raise OcclabError(f"{' and '.join(given)} condition X-Scene's outpainting (--model xscene); the HexPlane DiT "
                          f"takes its layout from --cond-file")
    if args.n is None:
        raise OcclabError("occlab generate needs --n (number of samples) for the HexPlane DiT")
    from occlab.generate import generate

    cond = {}
    if args.cond_file or args.previous:
        from occlab.data import load_sequence
        from occlab.train.dit_trainer import load_dit
        from occlab.train.latents import latent_geometry

        dit, state = load_dit(args.ckpt)
        geo = latent_geometry(state["vae_info"]["config"])

        def fit(path, last: bool):
            """The window the VAE takes: T frames (the first, or the last for a previous window), and an
            ego-centred crop when the file's grid is larger."""
            seq = load_sequence(path)
            T = geo["frames"]
            if seq.frames < T:
                raise OcclabError(f"{path}: {seq.frames} frames, the DiT's windows have {T}")
            seq = seq.slice(slice(seq.frames - T, None) if last else slice(0, T))
            if seq.labels.shape[1:] != tuple(geo["grid"]):
                seq = seq.crop(tuple(geo["grid"]))
            return seq

        if args.cond_file:
            seq = fit(args.cond_file, last=False)
            wanted = args.conditions if args.conditions is not None else dit.config.conditions
            cond = {k: v for k, v in {"command": seq.command, "trajectory": seq.trajectory,
                                      "layout": seq.layout}.items() if k in wanted}
        if args.previous:
            cond["previous"] = fit(args.previous, last=True).labels
    if args.command is not None:
        cond["command"] = int(args.command) if args.command.isdigit() else args.command
    if args.frames is not None:  # long sequences: n files of `frames` frames, chunk by chunk
        from pathlib import Path

        from occlab.generate import generate_long

        paths = [generate_long(args.ckpt, args.frames, Path(args.out) / f"long_{i:05d}.npz", steps=args.steps,
                               sampler=args.sampler, guidance=args.guidance, cond=cond or None, seed=args.seed + i,
                               eta=args.eta, device=args.device) for i in range(args.n)]
        print(json.dumps({"out": str(args.out), "files": len(paths), "frames": args.frames}))
        return 0
    paths = generate(args.ckpt, args.n, args.out, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                     cond=cond or None, seed=args.seed, batch_size=args.batch_size, eta=args.eta, device=args.device,
                     clip=args.clip)
    print(json.dumps({"out": str(args.out), "files": len(paths)}))
    return 0

def _generate_xscene(args) -> int:
    """X-Scene: consistency-aware outpainting of an n x m map with a triplane diffusion checkpoint -> one npz."""
    from occlab.train.triplane_diffusion import outpaint_file, read_boxes, read_layout

    try:
        n, m = (int(v) for v in args.outpaint.lower().split("x"))
    except ValueError:
        raise OcclabError(f"--outpaint wants NxM chunks, e.g. 3x3, got {args.outpaint!r}") from None
    layout = read_layout(args.layout) if args.layout else None
    boxes = read_boxes(args.boxes) if args.boxes else None
    info = outpaint_file(args.ckpt, args.out, (n, m), layout, boxes, steps=args.steps, seed=args.seed,
                         guidance=args.guidance, resample=args.resample, voxel_size=args.voxel_size,
                         min_bound=args.min_bound)
    print(json.dumps(info))
    return 0


def _claims(args) -> int:
    from pathlib import Path

    from occlab.report.claims import ledger

    if not Path(args.report).is_dir():
        raise OcclabError(f"no report folder {args.report}; run `occlab reproduce --out {args.report}` first")
    led = ledger(args.report)
    if args.json:
        print(json.dumps(led))
        return 0
    for c in led["claims"]:
        print(f"{c['holds']:>12}  {c['id']}: {c['statement']}")
    print(f"held {led['held']}, failed {led['failed']}, inconclusive {led['inconclusive']}, smoke {led['smoke']}, "
          f"not run {led['not_run']} (preset {led['preset']})")
    return 0


def build_parser() -> Parser:
    """The whole command tree."""
    p = Parser(prog="occlab", description="4D semantic-occupancy study kit: data, viewing, reproduction.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    data = sub.add_parser("data", help="sample, export, verify and describe datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=Parser)
    s = dsub.add_parser("sample", help="write one synthetic-town sequence as an occlab npz")
    s.add_argument("dataset", choices=["synthetic"])
    s.add_argument("--geometry", choices=["carlasc", "occ3d"], default="carlasc")
    s.add_argument("--frames", type=int, default=16, help="1..128")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--command", type=int, choices=range(4), default=None,
                   help="0 static, 1 forward, 2 left, 3 right (default: drawn from the seed)")
    s.add_argument("--out", required=True, help="FILE.npz")
    s.set_defaults(func=_data_sample)
    v = dsub.add_parser("verify", help="check a local dataset copy against its manifest")
    v.add_argument("name")
    v.add_argument("--root", required=True)
    v.set_defaults(func=_data_verify)
    d = dsub.add_parser("describe", help="frames, windows and class statistics of a dataset")
    d.add_argument("name")
    d.add_argument("--root", default=None)
    d.add_argument("--frames", type=int, default=None)
    d.add_argument("--json", action="store_true", help="one-line JSON")
    d.set_defaults(func=_data_describe)
    e = dsub.add_parser("export", help="write synthetic-town sequences in a real dataset's layout")
    e.add_argument("layout", choices=["carlasc", "occ3d_nuscenes", "semantickitti"])
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=2)
    e.add_argument("--frames", type=int, default=16)
    e.add_argument("--geometry", choices=["carlasc", "occ3d", "semantickitti"], default=None)
    e.add_argument("--split", choices=["train", "val", "test"], default="train")
    e.set_defaults(func=_data_export)

    w = sub.add_parser("view", help="render an occlab npz to PNG, GIF or MP4")
    w.add_argument("file")
    w.add_argument("--frame", type=int, default=None)
    w.add_argument("--camera", choices=CAMERAS, default="oblique")
    w.add_argument("--out", required=True, help="FILE.png | FILE.gif | FILE.mp4")
    w.set_defaults(func=_view)

    r = sub.add_parser("reproduce", help="run the notebooks with Papermill and write reports/index.html")
    r.add_argument("--preset", choices=PRESETS, default="smoke")
    r.add_argument("--only", nargs="+", default=None, metavar="NAME")
    r.add_argument("--out", default="reports")
    r.add_argument("--dataset", default="synthetic_town")
    r.add_argument("--data-root", default=None)
    r.add_argument("--device", default="cpu")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=_reproduce)

    tr = sub.add_parser("train", help="train a model (runs resume from their checkpoint)")
    tsub = tr.add_subparsers(dest="train_command", required=True, parser_class=Parser)
    tv = tsub.add_parser("vae", help="train an occupancy VAE with the shared trainer")
    tv.add_argument("--model", choices=VAE_MODELS, default="dynamiccity")
    tv.add_argument("--preset", choices=PRESETS, default="smoke")
    tv.add_argument("--dataset", default="synthetic_town")
    tv.add_argument("--data-root", default=None)
    tv.add_argument("--geometry", choices=["carlasc", "occ3d"], default="carlasc")
    tv.add_argument("--out", default=None, help="run folder (default: the run cache)")
    tv.add_argument("--device", default="cpu")
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--frames", type=int, default=None)
    tv.add_argument("--rates", type=_parse_rates, default=None, help="dT,dX,dY,dZ each in 1,2,4")
    tv.add_argument("--encoder", default=None, help="dynamiccity: projection|avgpool; sep4d: planar|conv3d_se")
    tv.add_argument("--decoder", default=None, help="dynamiccity: ess|query")
    tv.add_argument("--fusion", default=None, help="sep4d: sep|concat|conv|average|dynamic")
    tv.add_argument("--expansion", choices=["hadamard", "sum"], default=None)
    tv.add_argument("--steps", type=int, default=None)
    tv.add_argument("--batch-size", type=int, default=None)
    tv.add_argument("--lr", type=float, default=None)
    tv.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    tv.add_argument("--kl-weight", type=float, default=None)
    tv.add_argument("--threads", type=int, default=None)
    tv.set_defaults(func=_train_vae)

    td = tsub.add_parser("dit", help="train a HexPlane DiT on the cached latents of a trained VAE")
    td.add_argument("--vae-ckpt", required=True, help="checkpoint.pt of `occlab train vae` (a DynamicCity VAE)")
    td.add_argument("--preset", choices=PRESETS, default="smoke", help="DiT size and steps (smoke: tiny DiT)")
    td.add_argument("--rollout", choices=ROLLOUTS, default="pro", help="token layout (padded rollout by default)")
    td.add_argument("--conditions", type=_parse_conditions, default=None,
                    help=f"comma-separated, some of {','.join(DIT_CONDITIONS)} (default: none)")
    td.add_argument("--out", default=None, help="run folder (default: the run cache)")
    td.add_argument("--latents", default=None, help="latent cache folder (default: beside the VAE checkpoint)")
    td.add_argument("--sequence-frames", type=int, default=None,
                    help="synthetic town: scenes of this many frames, so windows have a previous window")
    td.add_argument("--device", default="cpu")
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--steps", type=int, default=None)
    td.add_argument("--batch-size", type=int, default=None)
    td.add_argument("--lr", type=float, default=None)
    td.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    td.add_argument("--ema-decay", type=float, default=None)
    td.add_argument("--threads", type=int, default=None)
    td.set_defaults(func=_train_dit)

    for kind, what in (("f3d", "the sparse-conv 3D feature network"), ("f2d", "the 2D render classifier")):
        tf = tsub.add_parser(kind, help=f"train {what} of the generation metrics (cached per dataset)")
        tf.add_argument("--dataset", default="synthetic_town")
        tf.add_argument("--data-root", default=None)
        tf.add_argument("--geometry", choices=["carlasc", "occ3d"], default="carlasc")
        tf.add_argument("--crop", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"))
        tf.add_argument("--steps", type=int, default=600)
        tf.add_argument("--device", default="cpu")
        tf.add_argument("--out", default=None)
        tf.add_argument("--force", action="store_true", help="retrain even when a cached network exists")
        tf.set_defaults(func=_train_features, kind=kind)

    g = sub.add_parser("generate", help="sample occupancy sequences from a trained DiT (npz files for eval gen)")
    g.add_argument("--ckpt", required=True, help="checkpoint.pt of `occlab train dit`")
    g.add_argument("--model", choices=("dit", "xscene"), default="dit",
                   help="dit: HexPlane DiT samples; xscene: triplane diffusion outpainting into one large map")
    g.add_argument("--n", type=int, default=None, help="number of samples (HexPlane DiT)")
    g.add_argument("--out", required=True, help="folder for sample_00000.npz, ...")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM runs the whole schedule)")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddim")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic given the noise)")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    g.add_argument("--command", default=None, help="static|forward|left|right (or 0..3)")
    g.add_argument("--cond-file", default=None, help="occlab npz whose command, trajectory and layout condition")
    g.add_argument("--conditions", type=_parse_conditions, default=None,
                   help="which conditions of --cond-file to use (default: all of them)")
    g.add_argument("--previous", default=None, help="occlab npz of the window before (previous-window condition)")
    g.add_argument("--frames", type=int, default=None,
                   help="long sequences of this many frames, chunk by chunk, each chunk conditioned on the one "
                        "before (needs a DiT trained with the previous condition); one npz per sample")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--clip", type=float, default=None,
                   help="bound each step's x_0 prediction to [-CLIP, CLIP] (normalised latent units)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--device", default="cpu")
    g.add_argument("--layout", default=None, help="xscene: BEV layout of the whole map (.npy, or .npz 'layout')")
    g.add_argument("--boxes", default=None,
                   help="xscene: boxes of the whole map, (M, 10) rows frame,cls,cx,cy,cz,l,w,h,yaw,track (.npy, or "
                        ".npz 'boxes': a sequence file's first frame), in the map's frame (see --voxel-size)")
    g.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("SX", "SY", "SZ"),
                   help="xscene: the boxes' units per map voxel (default 1: boxes in voxels)")
    g.add_argument("--min-bound", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                   help="xscene: the boxes' coordinates of the map's corner voxel (default 0)")
    g.add_argument("--outpaint", default="3x3", help="xscene: NxM chunks of the outpainted map")
    g.add_argument("--resample", type=int, default=0, help="xscene: RePaint resamplings per sampler step")
    g.set_defaults(func=_generate)

    cl = sub.add_parser("claims", help="the claims ledger of a report: which of the papers' orderings held")
    cl.add_argument("--report", default="reports", help="a folder written by `occlab reproduce`")
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(func=_claims)

    mi = sub.add_parser("model", help="model facts")
    msub = mi.add_subparsers(dest="model_command", required=True, parser_class=Parser)
    info = msub.add_parser("info", help="parameters, plane shapes and compression ratio")
    info.add_argument("name", choices=VAE_MODELS)
    info.add_argument("--geometry", choices=["carlasc", "occ3d"], default="carlasc")
    info.add_argument("--frames", type=int, default=16)
    info.add_argument("--rates", type=_parse_rates, default=None, help="dynamiccity, sep4d (default 2,2,2,2)")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=_model_info)

    be = sub.add_parser("bench", help="speed and peak memory of one training step (one workload per process)")
    besub = be.add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    bs = besub.add_parser("step", help="s/step (median after warm-up) and peak memory as JSON")
    bs.add_argument("--model", choices=BENCH_MODELS, default="dynamiccity-vae",
                    help="a paper-size model: the DynamicCity VAE or DiT-DC/2, SEP-4D, OccSora's 4D VQ-VAE, or "
                         "X-Scene's triplane VAE (static: one scene per sample, no --frames)")
    bs.add_argument("--task", choices=["train", "encode-decode"], default="train",
                    help="encode-decode: the VAEs only, no grad")
    bs.add_argument("--geometry", choices=["carlasc", "occ3d"], default="carlasc")
    bs.add_argument("--frames", type=int, default=None, help="T (default 16; X-Scene's VAE: 1)")
    bs.add_argument("--batch", type=int, default=1)
    bs.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    bs.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    bs.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    bs.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    bs.add_argument("--warmup", type=int, default=1)
    bs.add_argument("--small", action="store_true",
                    help="64x64x8, T = 8 instead of the geometry's grid (X-Scene: one 64x64x8 scene)")
    bs.add_argument("--reference", action="store_true", help="the plain reference path (DynamicCity VAE)")
    bs.add_argument("--checkpoint", action="store_true", help="activation checkpointing (DynamicCity VAE)")
    bs.add_argument("--frame-chunk", type=int, default=0,
                    help="frames per chunk of the per-frame 3D stages (DynamicCity VAE)")
    bs.add_argument("--attn-dropout", type=float, default=0.0,
                    help="projection-module attention dropout (DynamicCity VAE; released 0.1, studies 0)")
    bs.add_argument("--rates", type=_parse_rates, default=(2, 2, 2, 2), help="dT,dX,dY,dZ (DynamicCity VAE, SEP-4D)")
    bs.add_argument("--encoder", default="projection", help="plane reducer: projection | avgpool (DynamicCity VAE)")
    bs.add_argument("--decoder", default="ess", help="ess | query (DynamicCity VAE)")
    bs.add_argument("--widths", default="paper", help="the VAE's size preset: paper | small | tiny (study: small)")
    bs.add_argument("--grid", type=int, nargs=3, metavar=("X", "Y", "Z"), help="a crop of the geometry's grid (VAEs)")
    bs.add_argument("--json", action="store_true", help="one line")
    bs.set_defaults(func=_bench_step)

    ev = sub.add_parser("eval", help="evaluate predictions")
    esub = ev.add_subparsers(dest="eval_command", required=True, parser_class=Parser)
    er = esub.add_parser("recon", help="mIoU, IoU and per-class IoU of predicted labels")
    er.add_argument("--pred", required=True)
    er.add_argument("--gt", required=True)
    er.add_argument("--mask", default=None)
    er.add_argument("--json", action="store_true")
    er.set_defaults(func=_eval_recon)
    eg = esub.add_parser("gen", help="IS, FID, KID, precision, recall and F-score of generated samples")
    eg.add_argument("--real", required=True, help="folder of npz files with `labels`")
    eg.add_argument("--fake", required=True, help="folder of npz files with `labels`")
    eg.add_argument("--space", choices=["2d", "3d"], default="3d")
    eg.add_argument("--dataset", default="synthetic_town", help="whose 3D feature network to use")
    eg.add_argument("--weights", default=None, help="a feature-network checkpoint (default: the cached one)")
    eg.add_argument("--extractor", choices=["inception", "f2d"], default="inception")
    eg.add_argument("--geometry", default=None)
    eg.add_argument("--frame-stride", type=int, default=4)
    eg.add_argument("--device", default="cpu")
    eg.add_argument("--json", action="store_true")
    eg.add_argument("--compare", default=None, help="a saved result JSON; an error if its metric network differs")
    eg.set_defaults(func=_eval_gen)
    evv = esub.add_parser("vae", help="reconstruction metrics of a trained VAE checkpoint")
    evv.add_argument("--ckpt", required=True)
    evv.add_argument("--split", choices=["train", "val", "test"], default="val")
    evv.add_argument("--device", default="cpu")
    evv.add_argument("--json", action="store_true")
    evv.set_defaults(func=_eval_vae)

    me = sub.add_parser("metrics", help="frozen, versioned metric networks (occlab.metrics.networks)")
    msub = me.add_subparsers(dest="metrics_command", required=True, parser_class=Parser)
    mb = msub.add_parser("build", help="train the f3d/f2d networks by the fixed recipe, with reference statistics")
    mb.add_argument("--dataset", default="synthetic_town")
    mb.add_argument("--data-root", default=None)
    mb.add_argument("--geometry", default="carlasc", help="synthetic town only")
    mb.add_argument("--grid", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"), help="an ego-centred crop")
    mb.add_argument("--kinds", nargs="+", choices=["f3d", "f2d"], default=["f3d", "f2d"])
    mb.add_argument("--out", default=None, help="root folder (default $OCCLAB_CACHE/metrics/networks)")
    mb.add_argument("--device", default="cpu")
    mb.add_argument("--force", action="store_true", help="rebuild an installed version")
    mb.set_defaults(func=_metrics_build)
    ml = msub.add_parser("list", help="installed metric networks (committed and user)")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=_metrics_list)

    ru = sub.add_parser("runs", help="the run registry (occlab.train.runs)")
    rsub = ru.add_subparsers(dest="runs_command", required=True, parser_class=Parser)
    rl = rsub.add_parser("list", help="id, model, config, finished, final metrics, date of every run")
    rl.add_argument("--root", default=None, help="runs root (default $OCCLAB_RUNS)")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(func=_runs_list)
    rs = rsub.add_parser("show", help="config, code revision, data fingerprint, loss curve, final metrics")
    rs.add_argument("id")
    rs.add_argument("--root", default=None)
    rs.set_defaults(func=_runs_show)
    rr = rsub.add_parser("reproduce", help="retrain a run from its config into a scratch root and compare")
    rr.add_argument("id")
    rr.add_argument("--root", default=None)
    rr.add_argument("--scratch", default=None, help="where to retrain (default a new temporary folder)")
    rr.add_argument("--quiet", action="store_true")
    rr.set_defaults(func=_runs_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `occlab` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "geometry", "") is None and args.func is _data_export:
        args.geometry = {"carlasc": "carlasc", "semantickitti": "semantickitti"}.get(args.layout, "occ3d")
    try:
        return args.func(args)
    except OcclabError as e:
        print(f"occlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("occlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
