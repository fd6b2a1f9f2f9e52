"""Build an IQA dataset from its official release, or report what is built.

    python -m qponder_jax.data.datasets build koniq10k --manual_dir=/data/koniq10k --data_dir=/data/tfds
    python -m qponder_jax.data.datasets build spaq --manual_dir=/data/SPAQ --data_dir=/data/tfds --max_short_side=512
    python -m qponder_jax.data.datasets info koniq10k --data_dir=/data/tfds [--manual_dir=/data/koniq10k]

`manual_dir` holds the release in its official layout (see each builder's docstring); nothing is downloaded.
Skipped images (missing or corrupt) are counted and listed with their paths in the summary; `--strict` raises on
the first one instead. A build records what it was made from (annotation files' hashes, the image list, the builder
version and options); building again over a build whose release changed stops and says what changed, and
`--rebuild` builds it again. `info` prints the splits, the skipped images and that record (with `--manual_dir`, also
whether the release still matches); on a dataset that is not built it says so and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from qponder_jax.data import datasets
from qponder_jax.data.datasets import provenance

MAX_LISTED = 10  # skipped files listed in the summary (metadata.json has them all)


def summary(name: str, builder) -> list[str]:
    """The lines `build` and `info` print: splits, folder, skipped files, and what the build was made from."""
    lines = [
        f"{name} {split}: {split_info.num_examples} records"
        for split, split_info in sorted(builder.info.splits.items())
    ]
    lines.append(f"data_dir: {builder.data_dir}")
    meta = builder.info.metadata or {}
    if "skipped" in meta:
        skipped = meta["skipped"]
        lines.append(f"skipped: {len(skipped)} of {meta.get('num_annotations')} annotated files")
        lines += [f"  {s['path']}: {s['reason']}" for s in skipped[:MAX_LISTED]]
        if len(skipped) > MAX_LISTED:
            lines.append(f"  ... and {len(skipped) - MAX_LISTED} more (all in {builder.data_dir}/metadata.json)")
    if provenance.SOURCE_KEY in meta:
        lines += provenance.describe(meta[provenance.SOURCE_KEY])
    elif name not in ("synthetic_iqa",):
        lines.append("built from: not recorded (built by an older qponder_jax; --rebuild records it)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qponder_jax.data.datasets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a dataset into array_record files")
    build.add_argument("name", choices=sorted(datasets.BUILDERS))
    build.add_argument("--manual_dir", default=None, help="the official release (not needed for synthetic_iqa)")
    build.add_argument("--data_dir", required=True, help="where the built dataset goes")
    build.add_argument("--strict", action="store_true", help="raise on a missing or corrupt image")
    build.add_argument("--max_short_side", type=int, default=None, help="resize larger images at build time")
    build.add_argument(
        "--rebuild", action="store_true", help="build again over an existing build (its release changed)"
    )
    info = sub.add_parser("info", help="splits, record counts and source of a built dataset")
    info.add_argument("name", choices=sorted(datasets.BUILDERS))
    info.add_argument("--data_dir", required=True)
    info.add_argument("--max_short_side", type=int, default=None)
    info.add_argument("--manual_dir", default=None, help="also say whether this release still matches the build")
    args = parser.parse_args(argv)

    if args.command == "build":
        if args.manual_dir is None and args.name not in datasets.NO_MANUAL_DIR:
            parser.error(f"{args.name} needs --manual_dir (the official release in its original layout)")
        try:
            builder = datasets.build(
                args.name, args.manual_dir, args.data_dir, strict=args.strict, max_short_side=args.max_short_side,
                rebuild=args.rebuild,
            )  # fmt: skip
        except (FileNotFoundError, ValueError, datasets.ImageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    else:
        builder = datasets.get_builder(args.name, args.data_dir, max_short_side=args.max_short_side)
        if not builder.is_prepared():
            release = "" if args.name in datasets.NO_MANUAL_DIR else " --manual_dir=<the official release>"
            print(
                f"{args.name}: not built in {args.data_dir} (no {builder.data_path}); build it with: python -m "
                f"qponder_jax.data.datasets build {args.name}{release} --data_dir={args.data_dir}",
                file=sys.stderr,
            )
            return 1
    print("\n".join(summary(args.name, builder)))
    if args.command == "info" and args.manual_dir:
        recorded = (builder.info.metadata or {}).get(provenance.SOURCE_KEY)
        if recorded is None:
            print("source: cannot compare (not recorded)")
            return 0
        try:
            changes = provenance.source_changes(recorded, builder.read_source(args.manual_dir)[2])
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(
            f"source changed since the build: {'; '.join(changes)}" if changes else "source: unchanged since the build"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
