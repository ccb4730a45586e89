"""`generate`'s argument handling and progress bar, without a broker."""

import argparse
import io

import pytest
from rich.console import Console

from clients import cli_generate


def _parse(argv):
    parser = argparse.ArgumentParser()
    cli_generate.add_arguments(parser, "generate")
    return parser.parse_args(argv)


def test_flags_become_flat_request_fields(tmp_path):
    control = tmp_path / "edges.png"
    control.write_bytes(b"\x89PNG fake")
    args = _parse(["a fox", "--model", "tiny-sdxl", "--steps", "4", "--size", "512x256",
                   "--lora", "tiny-lora-a:0.8", "--lora", "tiny-lora-b", "--controlnet",
                   f"canny:{control}", "--controlnet", "depth:server/depth.png",
                   "--init-image", "server/in.png", "--strength", "0.5", "--refiner",
                   "tiny-sdxl-refiner", "--vae", "tiny-vae", "--batch", "2", "--out", "x"])
    f = cli_generate.build_fields(args)
    assert (f["width"], f["height"], f["steps"], f["model_base"]) == (512, 256, 4, "tiny-sdxl")
    assert f["lora_names"] == ["tiny-lora-a", "tiny-lora-b"] and f["lora_weights"] == [0.8, 1.0]
    assert f["controlnet_types"] == ["canny", "depth"]
    assert f["controlnet_images"] == [control, "server/depth.png"]  # local file vs server path
    assert f["init_image"] == "server/in.png" and f["strength"] == 0.5
    assert (f["model_refiner"], f["model_vae"], f["batch_size"]) == ("tiny-sdxl-refiner", "tiny-vae", 2)
    assert f["return_images"] is True


@pytest.mark.parametrize("argv", [["p", "--size", "big"], ["p", "--lora", "x:heavy"],
                                  ["p", "--controlnet", "canny"]])
def test_malformed_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[1]}" in err and "e.g." in err  # names the flag, shows the form


def test_progress_shows_queue_position_then_steps():
    out = io.StringIO()
    view = cli_generate._ProgressView(True, console=Console(file=out, force_terminal=True, width=100))
    with view:
        view.update({"stage": "queued", "queue_position": 2})
        view._progress.refresh()
        view.update({"stage": "denoising", "step": 3, "total_steps": 8, "worker_id": "cpu-1"})
        view._progress.refresh()
    text = out.getvalue()
    assert "queued (2 ahead)" in text
    assert "denoising on cpu-1" in text and "3/8" in text
