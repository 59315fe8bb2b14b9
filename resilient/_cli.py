"""Command line: ``python -m resilient <command>``.

Commands::

    policies                         list the presets with their descriptions
    policies check FILE_OR_NAME      validate a policy and print its ladders (exit 2 if invalid)
    policies show NAME               print a policy's ladders
    policies steps                   list the registered steps
    report RUN_DIR [-o FILE]         write the run's self-contained HTML report (needs the ``report`` extra)
    resume RUN_DIR [options]         continue a run to its end from its directory alone
    demo [--faults SPEC] [...]       train a small CNN on scikit-learn's digits through rehearsed faults

A command is a function that adds its subparser and sets ``handler``; add one to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import TextIO

from ._errors import InvalidPolicyError

#: Exit status for an invalid policy or bad usage (argparse uses 2 as well).
EXIT_INVALID = 2


def _add_policies(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("policies", help="list, check and show degradation policies")
    parser.set_defaults(handler=_policies_list)
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    listing = actions.add_parser("list", help="list the presets (the default)")
    listing.set_defaults(handler=_policies_list)

    check = actions.add_parser("check", help="validate a policy file or preset and print its ladders")
    check.add_argument("policy", metavar="FILE_OR_NAME", help="a preset name or a path to a TOML file")
    check.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first, so the custom steps it registers are known (repeatable)",
    )
    check.set_defaults(handler=_policies_check)

    show = actions.add_parser("show", help="print a policy's ladders")
    show.add_argument("policy", metavar="NAME", help="a preset name or a path to a TOML file")
    show.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (repeatable)",
    )
    show.set_defaults(handler=_policies_show)

    steps = actions.add_parser("steps", help="list the registered steps")
    steps.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (repeatable)",
    )
    steps.set_defaults(handler=_policies_steps)


#: Each adds one top-level subcommand; its parser sets ``handler(args, out, err) -> int``.
def _add_status(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ._status import add_command

    add_command(subparsers)


def _add_report(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "report", help="write a self-contained HTML report of a run directory",
        description="Write one self-contained HTML file (curves, memory, checkpoints, attempts, incidents) built "
                    "from the run directory alone, and the curves as a PNG beside it. Needs matplotlib: "
                    "pip install 'resilient[report]'.")
    parser.add_argument("run_dir", help="the run_dir passed to resilient.fit")
    parser.add_argument("-o", "--output", metavar="FILE", default=None,
                        help="where to write the HTML (default: RUN_DIR/report.html); the PNG goes beside it")
    parser.set_defaults(handler=_report)


def _add_resume(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "resume", help="continue a run to its end from its directory alone",
        description="Continue the run in RUN_DIR from its newest verified checkpoint, with the plan, data and "
                    "callbacks stored there, as resilient.fit with the same arguments would (for instance on a "
                    "new VM, or after the notebook that started it is gone). Exit status: 0 completed, 1 failed "
                    "(the root-cause report is printed), 2 refused (nothing was written), 130 interrupted.")
    parser.add_argument("run_dir", help="the run_dir passed to resilient.fit")
    parser.add_argument("--policy", default=None, metavar="NAME_OR_FILE",
                        help="a preset or a TOML file (default: the policy the run was started with)")
    parser.add_argument("--max-restarts", type=int, default=None, metavar="N",
                        help="restarts allowed (default: the policy's)")
    parser.add_argument("--mirror-dir", default=None, metavar="DIR",
                        help="restore an empty or older RUN_DIR from this mirror first, and keep copying to it")
    parser.add_argument("--verbose", type=int, choices=(0, 1, 2), default=None,
                        help="0 silent, 1 live line, 2 a line per epoch (default: the run's own)")
    parser.add_argument("--trust-run-dir", action="store_true",
                        help="resume a directory another user owns or others can write (it holds code)")
    parser.set_defaults(handler=_resume)


def _add_demo(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ._demo import add_arguments

    parser = subparsers.add_parser(
        "demo", help="train a small CNN on scikit-learn's digits through rehearsed faults (needs the demo extra)",
        description="A small CNN on scikit-learn's handwritten digits meets a GPU OOM, a segfault, a preemption and "
                    "a hang, and finishes healed. Needs scikit-learn: pip install 'resilient[demo]'.")
    add_arguments(parser)
    parser.set_defaults(handler=_demo)


COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _add_policies, _add_status, _add_report, _add_resume, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m resilient`` parser with every command in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="python -m resilient", description="resilient: self-healing Keras training"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on usage errors; callers want a status
        return exc.code if isinstance(exc.code, int) else EXIT_INVALID
    return int(args.handler(args, out, err))


def _import_modules(args: argparse.Namespace, err: TextIO) -> bool:
    for module in getattr(args, "imports", []):
        try:
            importlib.import_module(module)
        except Exception as exc:
            print(f"error: cannot import {module!r} (--import): {type(exc).__name__}: {exc}", file=err)
            return False
    return True


def _policies_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .policy import PRESET_DIRS, list_presets

    presets = list_presets()
    if not presets:
        print("No presets found in: " + ", ".join(str(folder) for folder in PRESET_DIRS), file=err)
        return 1
    width = max(len(name) for name in presets)
    for name, description in presets.items():
        print(f"{name:<{width}}  {description}", file=out)
    return 0


def _load(args: argparse.Namespace, out: TextIO, err: TextIO, *, verb: str) -> int:
    from .policy import load_policy, resolve_policy_path

    if not _import_modules(args, err):
        return EXIT_INVALID
    try:
        path = resolve_policy_path(args.policy)
        policy = load_policy(args.policy)
    except InvalidPolicyError as exc:
        print(f"error: {exc}", file=err)
        return EXIT_INVALID
    if verb:
        print(f"{verb}: {path}", file=out)
    print(policy.describe(), file=out)
    return 0


def _policies_check(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return _load(args, out, err, verb="valid")


def _policies_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    return _load(args, out, err, verb="policy")


def _policies_steps(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .policy import list_steps

    if not _import_modules(args, err):
        return EXIT_INVALID
    steps = list_steps()
    width = max(len(name) for name in steps)
    for name, summary in steps.items():
        print(f"{name:<{width}}  {summary}", file=out)
    return 0


def _report(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._report import build_report

    try:
        path = build_report(args.run_dir, args.output)
    except FileNotFoundError as e:
        print(f"error: {e}", file=err)
        return EXIT_INVALID
    except ImportError as e:
        print(f"error: {e}", file=err)
        return 1
    print(f"report: {path}", file=out)
    if path.with_suffix(".png").exists():
        print(f"curves: {path.with_suffix('.png')}", file=out)
    return 0


def _resume(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._errors import ResilientError, TrainingFailedError, UserCodeError
    from ._resume import resume

    try:
        history = resume(args.run_dir, policy=args.policy, max_restarts=args.max_restarts,
                         verbose="auto" if args.verbose is None else args.verbose, mirror_dir=args.mirror_dir,
                         trust_run_dir=args.trust_run_dir)
    except KeyboardInterrupt:
        print("interrupted: the run directory keeps its last checkpoint; run the same command to continue", file=err)
        return 130
    except (TrainingFailedError, UserCodeError) as e:
        print(f"error: {e}", file=err)
        return 1
    except ResilientError as e:  # refused: nothing was written
        print(f"error: {e}", file=err)
        return EXIT_INVALID
    epochs = len(history.epoch)
    last = {k: v[-1] for k, v in history.history.items() if v}
    metrics = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    print(f"completed: {epochs} epoch{'s' if epochs != 1 else ''} in {history.run_dir}"
          + (f"; last epoch: {metrics}" if metrics else "")
          + (f"; {len(history.incidents)} incident(s) healed" if history.incidents else ""), file=out)
    return 0


def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ._demo import run

    try:
        return run(args)
    except ImportError as e:
        print(f"error: {e}", file=err)
        return 1
