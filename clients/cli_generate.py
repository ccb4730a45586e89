"""`sdxl-broker generate PROMPT ...`: one generation from a terminal, with a progress bar.

The bar (on stderr) shows the queue position while the job waits, then the denoising steps.
When it is done, stdout lists where the images are: the paths the worker saved them under
(on the broker's host), or, with --out DIR, the files written here from the returned bytes.
The request id goes to stderr as soon as the request is sent. Ctrl-C cancels the job on the
broker (on the connection that submitted it: without CURVE the broker lets only that one cancel
it) and says whether that worked; a second Ctrl-C quits at once.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from clients.client import add_connection_arguments
from protocol import constants as C


def _size(text: str) -> tuple[int, int]:
    try:
        w, _, h = text.lower().partition("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1024x1024, not {text!r}")


def _name_weight(text: str) -> tuple[str, float]:
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME:WEIGHT, e.g. tiny-lora-a:0.8, not {text!r}")


def _type_image(text: str) -> tuple[str, str]:
    kind, sep, image = text.partition(":")
    if not sep or not image:
        raise argparse.ArgumentTypeError(f"expected TYPE:IMAGE, e.g. canny:edges.png, not {text!r}")
    return kind, image


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.epilog = ("Image arguments (--init-image, --mask, --controlnet) name a local file, "
                     "which is sent as bytes; a name that is not a local file is sent as a path "
                     "under the broker's --input-dir. Example: sdxl-broker generate 'a red fox' "
                     "--model tiny-sdxl --steps 4 --size 256x256 --out ./images")
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument("--negative", default=None, help="negative prompt")
    parser.add_argument("--model", default=None,
                        help="base model name under the models dir (default: the broker's)")
    parser.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {C.DEFAULT_STEPS})")
    parser.add_argument("--size", type=_size, default=None, metavar="WxH",
                        help=f"image size (default {C.DEFAULT_SIZE}x{C.DEFAULT_SIZE})")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random, reported)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale")
    parser.add_argument("--scheduler", default=None, help="scheduler, e.g. DDIM, 'Euler a', 'DPM++ 2M Karras'")
    parser.add_argument("--lora", type=_name_weight, action="append", default=[], metavar="NAME:WEIGHT",
                        help="apply a LoRA (repeatable)")
    parser.add_argument("--controlnet", type=_type_image, action="append", default=[],
                        metavar="TYPE:IMAGE", help="add a ControlNet, e.g. canny:photo.png (repeatable)")
    parser.add_argument("--controlnet-map", action="store_true",
                        help="the --controlnet images are ready control maps (edges, depth, ...): "
                             "use them as given, no preprocessing")
    parser.add_argument("--init-image", default=None, metavar="IMAGE", help="img2img source image")
    parser.add_argument("--mask", default=None, metavar="IMAGE", help="inpainting mask (white = repaint)")
    parser.add_argument("--strength", type=float, default=None, help="img2img/inpaint strength 0..1")
    parser.add_argument("--refiner", default=None, metavar="MODEL", help="refiner model name")
    parser.add_argument("--vae", default=None, metavar="MODEL", help="VAE model name")
    parser.add_argument("--batch", type=int, default=None, help="images per request (1-9)")
    parser.add_argument("--format", default=None, choices=C.OUTPUT_FORMATS, help="image format")
    parser.add_argument("--priority", default=None, choices=C.PRIORITIES, help="queue priority")
    parser.add_argument("--dtype", default=None, choices=C.DTYPES,
                        help="precision (default auto: float16 on accelerators, float32 on CPU)")
    parser.add_argument("--save-path", default=None, metavar="DIR",
                        help="folder under the broker's --output-dir for the worker's copy "
                             "(default: the output root itself)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="also write the images here (they are returned over the socket)")
    add_connection_arguments(parser)
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="once the broker has answered: silence after which the client asks "
                             "again (same request id); 3 unanswered tries give up")
    parser.add_argument("--json", action="store_true", help="print the final reply as JSON instead")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _image_arg(value: str | None):
    """A local file goes as bytes; anything else as a path under the broker's input root."""
    if value is None:
        return None
    path = Path(value)
    return path if path.is_file() else value


def build_fields(args: argparse.Namespace) -> dict:
    fields: dict = {"prompt": args.prompt, "negative_prompt": args.negative,
                    "model_base": args.model, "steps": args.steps, "seed": args.seed,
                    "guidance_scale": args.guidance, "scheduler": args.scheduler,
                    "strength": args.strength, "model_refiner": args.refiner,
                    "model_vae": args.vae, "batch_size": args.batch,
                    "output_format": args.format, "priority": args.priority,
                    "save_path": args.save_path, "dtype": args.dtype,
                    "init_image": _image_arg(args.init_image),
                    "mask_image": _image_arg(args.mask)}
    if args.size:
        fields["width"], fields["height"] = args.size
    if args.lora:
        fields["lora_names"] = [name for name, _ in args.lora]
        fields["lora_weights"] = [weight for _, weight in args.lora]
    if args.controlnet:
        fields["controlnet_types"] = [kind for kind, _ in args.controlnet]
        fields["controlnet_images"] = [_image_arg(image) for _, image in args.controlnet]
        if args.controlnet_map:
            fields["controlnet_preprocess"] = [False] * len(args.controlnet)
    if args.out:
        fields["return_images"] = True
    return fields


class _ProgressView:
    """rich progress bar: 'queued (N ahead)' while waiting, then steps per stage."""

    def __init__(self, enabled: bool, console=None):
        self.enabled = enabled
        self._console = console
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=self._console or Console(stderr=True),
                                      transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("sending", total=None)
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def update(self, event: dict) -> None:
        if self._progress is None:
            return
        stage = event.get("stage") or "?"
        if stage == "queued":
            position = event.get("queue_position")  # 0-based: jobs served before this one
            if position is None:
                text = "queued"
            else:
                text = "queued (next)" if position == 0 else f"queued ({position} ahead)"
            self._progress.update(self._task, description=text, total=None, completed=0)
            return
        worker = event.get("worker_id")
        text = f"{stage}" + (f" on {worker}" if worker else "")
        total = event.get("total_steps") or None
        self._progress.update(self._task, description=text, total=total,
                              completed=event.get("step") or 0)

    def finish(self) -> None:
        if self._progress is not None:
            task = self._progress.tasks[0]
            self._progress.update(self._task, description="done", total=task.total or 1,
                                  completed=task.total or 1)


CANCEL_WAIT_S = 5.0   # how long Ctrl-C waits for the broker to confirm the cancel


def _cancel_after_interrupt(submission) -> int:
    """Ctrl-C: cancel the job on the broker (else it runs to the end unseen) on the socket that
    submitted it, say what happened; a second Ctrl-C leaves at once. Exit code 130, as for any
    interrupted command."""
    from clients.client import BrokerUnavailable, ClientError

    request_id = submission.request_id
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    print(f"\ninterrupted: cancelling request {request_id} (Ctrl-C again to quit at once)",
          file=sys.stderr, flush=True)
    try:
        reply = submission.cancel(timeout_s=CANCEL_WAIT_S)
    except (BrokerUnavailable, ClientError) as exc:
        print(f"could not cancel request {request_id}: {exc}\n"
              f"  it may still run until its timeout", file=sys.stderr)
        return 130
    if reply.get("success"):
        state = (reply.get("data") or {}).get("state", "?")
        print(f"cancelled request {request_id} (it was {state})", file=sys.stderr)
    else:   # e.g. it had just finished
        print(f"request {request_id} was not cancelled: {reply.get('error')}", file=sys.stderr)
    return 130


def run(args: argparse.Namespace) -> int:
    from clients.client import BrokerUnavailable, GenerationResult, client_from_args, generation_body

    try:
        body = generation_body(**build_fields(args))
        client = client_from_args(args, timeout_s=args.timeout_s)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request_id = body["request_id"]
    show_bar = not (args.no_progress or args.json) and sys.stderr.isatty()
    with client, client.generation(body) as submission:
        print(f"request {request_id} -> {client.endpoint}", file=sys.stderr, flush=True)
        view = _ProgressView(show_bar)
        try:
            with view:
                for message in submission:
                    if message.get("message_type") == C.PROGRESS:
                        view.update(message)
                view.finish()
        except KeyboardInterrupt:
            return _cancel_after_interrupt(submission)
        except BrokerUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
    result = GenerationResult.from_reply(submission.final)
    reply = result.reply
    if args.json:
        printable = json.loads(json.dumps(reply, default=lambda b: f"<{len(b)} bytes>"))
        print(json.dumps(printable, indent=2))
        return 0 if reply.get("success") else 1
    if not reply.get("success"):
        print(f"error ({reply.get('error_code')}): {reply.get('error')}", file=sys.stderr)
        for problem in reply.get("errors") or []:
            print(f"  {problem.get('field')}: {problem.get('message')}", file=sys.stderr)
        return 1
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for image in result.images:
        if out_dir is not None and image.data is not None:
            name = Path(image.path).name if image.path else \
                f"{result.request_id}_{image.index}.{image.format or 'png'}"
            target = out_dir / name
            target.write_bytes(image.data)
            print(f"{target}  (seed {image.seed}, {image.width}x{image.height})")
        else:
            print(f"{image.path}  (seed {image.seed}, {image.width}x{image.height})")
    metrics = result.metrics
    if metrics:
        print(f"done in {metrics.get('total_time', 0):.2f}s on {metrics.get('worker_id')} "
              f"({metrics.get('device_name')})", file=sys.stderr)
    return 0
