"""Command-line entry point and composition root: ``magi-server download`` (more commands join as they land).

This is the one place that reads environment variables; everything below it takes explicit arguments.
"""
from __future__ import annotations

import argparse
import os
import sys


def _cmd_download(args: argparse.Namespace) -> int:
    from magi_server.download import HF_ENDPOINT, DownloadError, download

    endpoint = args.endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT
    try:
        download(args.variant, args.dir, endpoint=endpoint, include_t5=not args.skip_t5, probe_timeout=args.timeout)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    from magi_server.download import variant_names

    parser = argparse.ArgumentParser(prog="magi-server", description="Self-hosted MAGI-1 video generation server.")
    sub = parser.add_subparsers(dest="command", required=True)

    dl = sub.add_parser("download", help="download one MAGI-1 variant (plus the shared VAE, T5 and special tokens)")
    dl.add_argument("variant", help=f"one of: {', '.join(variant_names())}")
    dl.add_argument("--dir", default="weights", help="weights folder (default: weights)")
    dl.add_argument("--endpoint", default=None, help="Hugging Face endpoint (default: $HF_ENDPOINT or huggingface.co)")
    dl.add_argument("--skip-t5", action="store_true", help="do not download the 19 GB T5-XXL encoder")
    dl.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the hub before giving up")
    dl.set_defaults(func=_cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
