"""The ``placerank`` command line. Each sub-command lives in ``placerank/commands/<name>.py``
and is found by name: a module there defines ``register(subparsers)``.

Every failure ends in one line, ``placerank: error: ...``, and exit status 2: bad flags (the
parser below prints one line instead of argparse's usage block), input errors
(:class:`~placerank.errors.PlaceRankError`), environment faults (``OSError``: disk full,
permission denied, read-only file system; named with the file) and, as a last resort, any other
exception. ``--debug`` (anywhere on the line, or ``PLACERANK_DEBUG=1``) adds the traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback
from typing import NoReturn

from placerank.errors import PlaceRankError, describe_os_error

DEBUG_HINT = "(--debug for the traceback)"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``placerank: error: ...`` line (exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        where = f"; see placerank {command} --help" if command else "; see placerank --help"
        self.exit(2, f"placerank: error: {message}{where}\n")


def build_parser() -> argparse.ArgumentParser:
    import placerank.commands as commands

    parser = OneLineParser(prog="placerank", description="Visual place recognition: retrieve + re-rank.")
    parser.add_argument("--version", action="version", version=f"placerank {__import__('placerank').__version__}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (any position)")
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


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _fail(message: str, debug: bool) -> int:
    _close_progress_bars()
    if debug:
        traceback.print_exc()
    print(f"placerank: error: {_one_line(message)}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PLACERANK_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from placerank.descriptors.memory import memory_budget

    try:
        with memory_budget(getattr(args, "max_memory_gb", None)):  # --max-memory-gb, where a command has it
            result = args.func(args)
    except PlaceRankError as e:
        return _fail(str(e), debug)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("placerank: interrupted; finished work is saved and a re-run resumes", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, read-only file system, ...
        return _fail(describe_os_error(e), debug)
    except MemoryError:
        return _fail("out of memory; use a smaller --batch-size or --image-size", debug)
    except Exception as e:  # a bug or an unforeseen fault: still one line
        text = _one_line(str(e)) or "(no message)"
        return _fail(f"{type(e).__name__}: {text}" + ("" if debug else f" {DEBUG_HINT}"), debug)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
