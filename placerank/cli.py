"""The ``placerank`` command line. Each sub-command lives in ``placerank/commands/<name>.py``
and is found by name: a module there defines ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from placerank.errors import PlaceRankError


def build_parser() -> argparse.ArgumentParser:
    import placerank.commands as commands

    parser = argparse.ArgumentParser(prog="placerank", description="Visual place recognition: retrieve + re-rank.")
    parser.add_argument("--version", action="version", version=f"placerank {__import__('placerank').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"placerank.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def _close_progress_bars() -> None:
    """Clear unfinished progress bars so the error starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.leave = False
        bar.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except PlaceRankError as e:
        _close_progress_bars()
        print(f"placerank: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print("placerank: interrupted; finished work is saved and a re-run resumes", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
