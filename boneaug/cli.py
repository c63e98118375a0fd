"""The `boneaug` command: synth, preview, check-dicom, report.

Every subcommand is a thin wrapper over a library function; heavy imports happen inside the
subcommand so `boneaug --help` is instant. Exit codes: 0 done (check-dicom: even when some files
are rejected), 1 a boneaug error (message on stderr), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from boneaug.config import BODY_PARTS, PROFILES, load_config
from boneaug.errors import BoneaugError


def _cmd_synth(args: argparse.Namespace) -> int:
    from boneaug.synth.cohort import generate_cohort

    config = load_config(args.profile, args.config)
    parts = list(BODY_PARTS) if args.body_part == "all" else [args.body_part]
    fractures = args.fractures or args.body_part == "all"
    summary = generate_cohort(
        config.synth,
        parts,
        args.out,
        seed=config.synth.seed if args.seed is None else args.seed,
        scale=args.scale,
        fractures=fractures,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(summary.describe())
    return 0


def _cmd_preview(args: argparse.Namespace) -> int:
    from boneaug.synth.preview import contact_sheet

    contact_sheet(args.uri, args.out, n=args.n, body_part=args.body_part, seed=args.seed)
    print(f"wrote {args.out}")
    return 0


def _cmd_check_dicom(args: argparse.Namespace) -> int:
    from boneaug.io.dicom import check_uris

    rejected = total = 0
    for record in check_uris(args.paths):
        total += 1
        rejected += not record["ok"]
        print(json.dumps(record), flush=True)
    print(f"checked {total} files: {total - rejected} ok, {rejected} rejected", file=sys.stderr)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from boneaug.eval.report import render_report_from_predictions

    config = load_config(args.profile, args.config)
    print(render_report_from_predictions(args.run_uri, config.eval))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boneaug",
        description="Generative augmentation of bone lesion X-rays (Gupta et al., MIDL 2019).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_profile(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", choices=PROFILES, default="local", help="sizes (default local)")
        p.add_argument("--config", default=None, help="YAML file overriding the profile")

    p = sub.add_parser("synth", help="write a synthetic radiograph cohort (DICOM + annotations)")
    p.add_argument("--body-part", choices=[*BODY_PARTS, "all"], required=True)
    p.add_argument("--out", required=True, help="root URI: s3://bucket/prefix, file:// or a path")
    p.add_argument("--seed", type=int, default=None, help="default: the profile's seed")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the profile's counts")
    p.add_argument("--fractures", action="store_true",
                   help="also write the fracture corpus (always with --body-part all)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    with_profile(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("preview", help="contact sheet PNG of radiographs with lesion boxes")
    p.add_argument("uri", metavar="PATH_OR_URI", help="cohort root or annotations.parquet")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--n", type=int, default=24, help="radiographs on the sheet")
    p.add_argument("--body-part", choices=BODY_PARTS, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_preview)

    p = sub.add_parser("check-dicom",
                       help="one JSON line per file: can boneaug read it, and why not")
    p.add_argument("paths", nargs="+", metavar="PATH_OR_URI", help="files or prefixes")
    p.set_defaults(func=_cmd_check_dicom)

    p = sub.add_parser("report", help="re-render a run's report from its stored predictions")
    p.add_argument("run_uri", metavar="RUN_URI")
    with_profile(p)
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except BoneaugError as exc:
        print(f"boneaug {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
