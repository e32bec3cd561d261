"""The ``difflab`` command line: parse arguments, then call the library (nothing else lives here).

Each subcommand is a pair: ``_add_NAME(subparsers)`` declares its arguments and sets
``func=_run_NAME``; ``_run_NAME(args) -> int`` calls the library. To add a subcommand, write the
pair and list ``_add_NAME`` in ``_SUBCOMMANDS``. Bad input (ValueError, FileNotFoundError) prints
``difflab: error: <message>`` on one line to stderr and exits 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert an official OpenAI checkpoint (.pt) into a difflab checkpoint folder",
        description="Convert an official improved-diffusion / guided-diffusion state dict into "
        "DIR/model.safetensors + DIR/config.yaml, checking every key and shape.",
    )
    p.add_argument("src", metavar="SRC.pt", help="the official checkpoint (loaded with weights_only=True)")
    p.add_argument("--preset", required=True, metavar="NAME",
                   help="network preset, e.g. guided-diffusion/256x256_diffusion (see docs/networks.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from difflab.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.preset, args.out)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.yaml'}")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from difflab.eval.report import add_eval_arguments

    p = sub.add_parser(
        "eval",
        help="FD, precision/recall, IS (and accuracy) of samples against a reference; prints JSON",
        description="Evaluate SAMPLES.npz (arr_0 = uint8 NHWC images, optional arr_1 = labels) against a "
        "reference in difflab's MNIST-classifier features or the FID InceptionV3 (docs/evaluation.md).",
    )
    add_eval_arguments(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from difflab.eval.report import run_eval_command

    return run_eval_command(args)


_SUBCOMMANDS = [_add_convert, _add_eval]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="difflab", description="Pixel-space diffusion models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``difflab``; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line
        print(f"difflab: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
