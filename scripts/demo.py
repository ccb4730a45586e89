"""The demo's client half: one image each for txt2img, img2img, inpaint, LoRA, ControlNet and
refiner against a running `sdxl-broker serve` on the tiny local models, all six submitted at
once; prints paths and timings.

    python scripts/demo.py --endpoint tcp://127.0.0.1:5555 [--size 256] [--steps 4]

scripts/demo.sh does the rest (models, serve, stopping everything).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from PIL import Image, ImageDraw

from clients.client import BrokerClient, BrokerUnavailable, RequestFailed


def _input_images(size: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """A source picture, an inpainting mask (white = repaint) and a control image."""
    source = Image.new("RGB", (size, size), (40, 90, 160))
    draw = ImageDraw.Draw(source)
    draw.rectangle([size // 8, size // 2, size * 7 // 8, size * 7 // 8], fill=(60, 140, 60))
    draw.ellipse([size // 3, size // 8, size * 2 // 3, size * 3 // 8], fill=(240, 200, 40))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse([size // 4, size // 4, size * 3 // 4, size * 3 // 4], fill=255)
    control = Image.new("RGB", (size, size), "black")
    cdraw = ImageDraw.Draw(control)
    cdraw.rectangle([size // 6, size // 6, size * 5 // 6, size * 5 // 6], outline="white", width=4)
    cdraw.line([0, size, size, 0], fill="white", width=4)
    return source, mask, control


def jobs(size: int, steps: int) -> list[tuple[str, dict]]:
    source, mask, control = _input_images(size)
    common = {"model_base": "tiny-sdxl", "width": size, "height": size, "steps": steps,
              "seed": 42, "dtype": "float32", "guidance_scale": 5.0}
    return [
        ("txt2img", {"prompt": "a lighthouse at dusk", **common}),
        ("img2img", {"prompt": "a lighthouse at dawn", "init_image": source, "strength": 0.6, **common}),
        ("inpaint", {"prompt": "a full moon", "init_image": source, "mask_image": mask,
                     "strength": 0.8, **common}),
        ("lora", {"prompt": "a lighthouse, tiny style", "lora_names": ["tiny-lora-a"],
                  "lora_weights": [0.8], **common}),
        ("controlnet", {"prompt": "a house", "controlnet_types": ["canny"],
                        "controlnet_images": [control], "controlnet_weights": [1.0], **common}),
        ("refiner", {"prompt": "a lighthouse, refined", "model_refiner": "tiny-sdxl-refiner",
                     "refiner_switch": 0.75, **common}),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)

    # all six at once: the broker spreads them over the workers (two with demo.sh)
    started = time.perf_counter()
    failures = 0
    with BrokerClient(args.endpoint, timeout_s=60.0, retries=3) as client, \
            ThreadPoolExecutor(max_workers=6) as pool:
        futures = {pool.submit(client.generate, **fields): name
                   for name, fields in jobs(args.size, args.steps)}
        for future in as_completed(futures):
            name = futures[future]
            try:
                result = future.result()
            except (RequestFailed, BrokerUnavailable) as exc:
                failures += 1
                print(f"{name:<11} FAILED {exc}", flush=True)
                continue
            m = result.metrics
            for image in result.images:
                print(f"{name:<11} total {m.get('total_time', 0):6.2f}s  queue {m.get('queue_time', 0):6.2f}s"
                      f"  inference {m.get('inference_time', 0):6.2f}s  on {m.get('worker_id')}"
                      f"  {image.path}", flush=True)
    print(f"{6 - failures}/6 modes done in {time.perf_counter() - started:.1f}s")
    return 1 if failures else 0

if __name__ == "__main__":
    sys.exit(main())
