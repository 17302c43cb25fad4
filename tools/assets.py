"""`templar assets`: fetch (or re-verify) the real tokenizers and chat templates (templar.assets)."""

from __future__ import annotations

from templar.assets import TOKENIZERS, cache_home, fetch_all


def add_arguments(parser) -> None:
    parser.add_argument("families", nargs="*", help=f"tokenizer families (default: all of {', '.join(TOKENIZERS)})")
    parser.add_argument("--force", action="store_true", help="download again even when the cache verifies")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    report = fetch_all(args.families or None, force=args.force, progress=not args.quiet)
    for name, what in report.items():
        where = cache_home() / ("templates" if name == "templates" else f"tokenizers/{name}")
        print(f"{name:14s} {what:9s} {where}")
    return 0
