"""`sdxl-broker`: one console script, one subcommand per job.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their command runs, so `--help` is fast and `translate` never
imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("broker.serve", "broker plus one worker process per device, in one command"),
    "broker": ("broker.server", "the broker alone (workers connect to --backend)"),
    "worker": ("gpu_worker.main", "one worker process bound to one device"),
    "demo-models": ("gpu_worker.demo_models", "build the tiny random-weight SDXL model kit"),
    "translate": ("protocol.translate_cli", "validate one request body and print its translation"),
    "generate": ("clients.cli_generate", "generate images from a prompt, with a progress bar"),
    "status": ("clients.cli_manage", "broker and per-worker status as a table"),
    "load": ("clients.cli_manage", "load a model onto a worker"),
    "cleanup": ("clients.cli_manage", "unload models and free device memory"),
    "cancel": ("clients.cli_manage", "cancel a queued or running job"),
    "keys": ("broker.curve", "make CURVE key pairs"),
}


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-broker",
        description="Serve Stable Diffusion XL over ZeroMQ from a pool of per-device workers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            if not _module_available(module_name):
                continue
        except ModuleNotFoundError:  # the parent package is not there
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        # a module serving several commands takes the command name
        try:
            module.add_arguments(p, name)
        except TypeError:
            module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
