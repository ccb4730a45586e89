"""kohya/A1111 LoRAs (UNet + both text encoders, with alphas) for real on the tiny kit. The kit's
kohya file was written by diffusers' `convert_state_dict_to_kohya` from a peft LoRA, so these
tests are not the product checking its own writer. LyCORIS files are refused by name."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

pytestmark = pytest.mark.slow
KOHYA = "tiny-lora-kohya"


@pytest.fixture(scope="module")
def models(demo_models_dir, tmp_path_factory):
    """A copy of the kit with variants of the kohya LoRA next to it (the kit stays read-only)."""
    root = tmp_path_factory.mktemp("lora-kit") / "models"
    shutil.copytree(demo_models_dir, root)
    tensors = load_file(str(root / "loras" / f"{KOHYA}.safetensors"))
    assert any(k.startswith("lora_unet_") for k in tensors)
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert any(k.endswith(".alpha") for k in tensors)

    def variant(name, keep=lambda key: True, change=lambda key, value: value):
        save_file({k: change(k, v).contiguous() for k, v in tensors.items() if keep(k)},
                  str(root / "loras" / f"{name}.safetensors"))

    variant("no-te1", keep=lambda k: not k.startswith("lora_te1_"))
    variant("no-te2", keep=lambda k: not k.startswith("lora_te2_"))
    # the same delta written another way: alpha halved, up weights doubled
    variant("half-alpha-double-up", change=lambda k, v: v / 2 if k.endswith(".alpha") else
            (v * 2 if "lora_up" in k else v))
    variant("half-alpha", change=lambda k, v: v / 2 if k.endswith(".alpha") else v)
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 4),
               "lora_unet_down_blocks_1_attentions_0_proj_in.hada_w1_b": torch.zeros(4, 4),
               "lora_unet_down_blocks_1_attentions_0_proj_in.alpha": torch.tensor(4.0)},
              str(root / "loras" / "loha.safetensors"))
    save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w1": torch.zeros(4, 4),
               "lora_unet_down_blocks_1_attentions_0_proj_in.lokr_w2": torch.zeros(4, 4)},
              str(root / "loras" / "lokr.safetensors"))
    return str(root)


@pytest.fixture(scope="module")
def lora_executor(models, tmp_path_factory):
    from gpu_worker.executor import DiffusersExecutor

    out = tmp_path_factory.mktemp("lora-out")
    return DiffusersExecutor("cpu", models_dir=models, output_dir=str(out), input_dir=str(out))


def run(executor, *loras) -> dict:
    job = Job.model_validate(dict(
        request_id="lora", prompt="a photo of a cat", models={"base": "tiny-sdxl"}, width=128, height=128,
        steps=2, seed=9, precision={"dtype": "float32"}, scheduler="EulerDiscreteScheduler",
        loras=[{"name": name, "weight": weight} for name, weight in loras]))
    return executor.run(job, lambda *a: None, lambda: False)


def pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result["generated_images"][0]["path"]).convert("RGB"), dtype=np.int16)


def sha(result) -> str:
    return result["generated_images"][0]["sha256"]


def test_kohya_lora_changes_the_output_and_leaves_nothing_behind(lora_executor):
    plain = run(lora_executor)
    kohya = run(lora_executor, (KOHYA, 1.0))
    assert np.abs(pixels(kohya) - pixels(plain)).mean() > 2.0
    info = kohya["processing_metrics"]["model_info"]["loras"][0]
    assert info["format"] == "kohya" and info["name"] == KOHYA
    assert sha(run(lora_executor)) == sha(plain)  # same bytes as before any LoRA


def test_both_text_encoder_parts_apply(lora_executor):
    full = pixels(run(lora_executor, (KOHYA, 1.0)))
    for variant in ("no-te1", "no-te2"):
        assert np.abs(pixels(run(lora_executor, (variant, 1.0))) - full).mean() > 0.5, variant


def test_alphas_are_honoured(lora_executor):
    full = pixels(run(lora_executor, (KOHYA, 1.0)))
    # alpha/2 with up*2 is the same delta: only equal if the alpha is applied
    assert np.abs(pixels(run(lora_executor, ("half-alpha-double-up", 1.0))) - full).max() <= 1
    assert np.abs(pixels(run(lora_executor, ("half-alpha", 1.0))) - full).mean() > 0.5


def test_weights_are_honoured(lora_executor):
    plain = pixels(run(lora_executor))
    full = pixels(run(lora_executor, (KOHYA, 1.0)))
    zero = pixels(run(lora_executor, (KOHYA, 0.0)))
    half = pixels(run(lora_executor, (KOHYA, 0.5)))
    assert np.abs(zero - plain).max() <= 1
    assert np.abs(half - plain).mean() > 0.5 and np.abs(half - full).mean() > 0.5
    # a weight is the same scale as an alpha: weight 0.5 == half-alpha at weight 1
    assert np.abs(pixels(run(lora_executor, ("half-alpha", 1.0))) - half).max() <= 1


@pytest.mark.parametrize("name,algorithm", [("loha", "LoHa"), ("lokr", "LoKr")])
def test_lycoris_is_refused_naming_the_format(lora_executor, name, algorithm):
    plain = run(lora_executor)
    with pytest.raises(JobError) as info:
        run(lora_executor, (name, 1.0))
    assert info.value.code == C.UNSUPPORTED_FEATURE and algorithm in info.value.message
    assert sha(run(lora_executor)) == sha(plain)  # the refusal left nothing behind
