"""The `occlab` command line. Every command imports its heavy modules only when it runs."""
from __future__ import annotations

import argparse
import json
import sys

from occlab.errors import OcclabError

PRESETS = ("smoke", "study", "paper")
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
    writer = {"carlasc": export.export_carlasc, "occ3d_nuscenes": export.export_occ3d_nuscenes}[args.layout]
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
    e.add_argument("layout", choices=["carlasc", "occ3d_nuscenes"])
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=2)
    e.add_argument("--frames", type=int, default=16)
    e.add_argument("--geometry", choices=["carlasc", "occ3d"], default=None)
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

    ev = sub.add_parser("eval", help="evaluate predictions")
    esub = ev.add_subparsers(dest="eval_command", required=True, parser_class=Parser)
    er = esub.add_parser("recon", help="mIoU, IoU and per-class IoU of predicted labels")
    er.add_argument("--pred", required=True)
    er.add_argument("--gt", required=True)
    er.add_argument("--mask", default=None)
    er.add_argument("--json", action="store_true")
    er.set_defaults(func=_eval_recon)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `occlab` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "geometry", "") is None and args.func is _data_export:
        args.geometry = "carlasc" if args.layout == "carlasc" else "occ3d"
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
