"""`sdxl-broker`: one console script, one subcommand per job.

Each subcommand lives in a module exposing `add_arguments(parser, command)` and
`run(args) -> int` (`args.command` names the command). Only the module of the command being run
is imported: `sdxl-broker --help` imports none, and `translate` or `broker` never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("broker.service", "broker plus one worker process per device, in one command"),
    "broker": ("broker.service", "the broker alone (workers connect to --backend)"),
    "worker": ("gpu_worker.main", "one worker process bound to one device"),
    "demo-models": ("gpu_worker.demo_models", "build the tiny random-weight SDXL model kit"),
    "translate": ("protocol.translate_cli", "validate one request body and print its translation"),
    "generate": ("clients.cli_generate", "generate images from a prompt, with a progress bar"),
    "status": ("clients.cli_manage", "broker and per-worker status as a table"),
    "load": ("clients.cli_manage", "load a model onto a worker"),
    "cleanup": ("clients.cli_manage", "unload models and free device memory"),
    "cancel": ("clients.cli_manage", "cancel a queued or running job"),
    "models": ("clients.cli_manage", "every model the workers can load, by kind"),
    "queue": ("clients.cli_manage", "running and queued jobs"),
    "history": ("clients.cli_manage", "recent finished jobs"),
    "keys": ("runtime.curve", "make CURVE key pairs"),
    "gateway": ("gateway.cli", "HTTP/WebSocket gateway: the A1111 API, /v1, live dashboard"),
}


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdxl-broker",
        description="Serve Stable Diffusion XL over ZeroMQ from a pool of per-device workers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen_command(argv)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p, name)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
