"""Build an IQA dataset from its official release, or list what is built.

    python -m qponder_jax.data.datasets build koniq10k --manual_dir=/data/koniq10k --data_dir=/data/tfds
    python -m qponder_jax.data.datasets build spaq --manual_dir=/data/SPAQ --data_dir=/data/tfds --max_short_side=512
    python -m qponder_jax.data.datasets info koniq10k --data_dir=/data/tfds

`manual_dir` holds the release in its official layout (see each builder's docstring); nothing is downloaded.
Skipped images (missing or corrupt) are counted and listed with their paths in the summary; `--strict` raises on
the first one instead.
"""

from __future__ import annotations

import argparse
import sys

from qponder_jax.data import datasets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qponder_jax.data.datasets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build a dataset into array_record files")
    build.add_argument("name", choices=sorted(datasets.BUILDERS))
    build.add_argument("--manual_dir", default=None, help="the official release (not needed for synthetic_iqa)")
    build.add_argument("--data_dir", required=True, help="where the built dataset goes")
    build.add_argument("--strict", action="store_true", help="raise on a missing or corrupt image")
    build.add_argument("--max_short_side", type=int, default=None, help="resize larger images at build time")
    info = sub.add_parser("info", help="splits and record counts of a built dataset")
    info.add_argument("name", choices=sorted(datasets.BUILDERS))
    info.add_argument("--data_dir", required=True)
    info.add_argument("--max_short_side", type=int, default=None)
    args = parser.parse_args(argv)

    if args.command == "build":
        if args.manual_dir is None and args.name not in datasets.NO_MANUAL_DIR:
            parser.error(f"{args.name} needs --manual_dir (the official release in its original layout)")
        try:
            datasets.build(
                args.name, args.manual_dir, args.data_dir, strict=args.strict, max_short_side=args.max_short_side
            )
        except (FileNotFoundError, ValueError, datasets.ImageError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    builder = datasets.get_builder(args.name, args.data_dir, max_short_side=args.max_short_side)
    for split, split_info in sorted(builder.info.splits.items()):
        print(f"{args.name} {split}: {split_info.num_examples} records")
    print(f"data_dir: {builder.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
