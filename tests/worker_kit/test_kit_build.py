"""The demo kit: every contract name exists, shapes follow SDXL where it matters, builds are
reproducible byte for byte, and the CLI reports what it built."""

from __future__ import annotations

import json
import os
import pytest

from gpu_worker import demo_models as kit

pytestmark = pytest.mark.slow

CONTRACT_NAMES = [  # CONTRACT.md "Commands", demo-models
    "tiny-sdxl/model_index.json", "tiny-sdxl.safetensors", "tiny-sdxl-refiner/model_index.json",
    "tiny-vae/config.json", "controlnet/tiny-canny/config.json", "controlnet/tiny-depth/config.json",
    "loras/tiny-lora-a.safetensors", "loras/tiny-lora-b.safetensors", "embeddings/tiny-ti.safetensors",
]


def _config(root, *parts):
    with open(os.path.join(root, *parts), encoding="utf-8") as fh:
        return json.load(fh)


def _all_files(root):
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            full = os.path.join(directory, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = fh.read()
    return out


def test_every_contract_name_exists(demo_models_dir):
    missing = [n for n in CONTRACT_NAMES if not os.path.isfile(os.path.join(demo_models_dir, n))]
    assert missing == []
    # nothing left behind by the staged writes
    assert not [e for e in os.listdir(demo_models_dir) if e.startswith(".building-")]


def test_shapes_follow_sdxl(demo_models_dir):
    base = _config(demo_models_dir, "tiny-sdxl", "model_index.json")
    assert base["_class_name"] == "StableDiffusionXLPipeline"
    te1 = _config(demo_models_dir, "tiny-sdxl", "text_encoder", "config.json")
    te2 = _config(demo_models_dir, "tiny-sdxl", "text_encoder_2", "config.json")
    assert te1["hidden_size"] != te2["hidden_size"]  # else single-file loading mixes them up
    unet = _config(demo_models_dir, "tiny-sdxl", "unet", "config.json")
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["addition_embed_type"] == "text_time"
    assert unet["projection_class_embeddings_input_dim"] == 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    vae = _config(demo_models_dir, "tiny-sdxl", "vae", "config.json")
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8  # latent = image / 8

    refiner = _config(demo_models_dir, "tiny-sdxl-refiner", "model_index.json")
    assert refiner["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert refiner["text_encoder"] == [None, None] and refiner["requires_aesthetics_score"] is True
    r_unet = _config(demo_models_dir, "tiny-sdxl-refiner", "unet", "config.json")
    assert r_unet["cross_attention_dim"] == te2["hidden_size"]
    assert r_unet["projection_class_embeddings_input_dim"] == 5 * r_unet["addition_time_embed_dim"] + te2["projection_dim"]


def test_tokenizer_loads_offline_and_matches_the_vocab(demo_models_dir):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(demo_models_dir, "tiny-sdxl", "tokenizer"), local_files_only=True)
    te1 = _config(demo_models_dir, "tiny-sdxl", "text_encoder", "config.json")
    assert len(tok) == te1["vocab_size"]
    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id
    # merged words are single tokens: "photo" and "cat" do not fall apart into characters
    assert len(tok("a photo of a cat").input_ids) == 2 + 5


def test_single_file_has_the_original_layout(demo_models_dir):
    from gpu_worker.model_resolver import _read_safetensors_shapes

    shapes = _read_safetensors_shapes(os.path.join(demo_models_dir, "tiny-sdxl.safetensors"))
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in shapes}
    assert prefixes == {"model.diffusion_model", "first_stage_model.encoder", "first_stage_model.decoder",
                        "first_stage_model.quant_conv", "first_stage_model.post_quant_conv",
                        "conditioner.embedders"}
    assert "conditioner.embedders.1.model.positional_embedding" in shapes
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in shapes


def test_two_builds_are_byte_identical(demo_models_dir, tmp_path):
    second = tmp_path / "again"
    paths = kit.build_demo_models(str(second))
    assert set(paths) == {"tiny-sdxl", "tiny-sdxl.safetensors", "tiny-sdxl-refiner", "tiny-vae", "tiny-canny",
                          "tiny-depth", "tiny-lora-a", "tiny-lora-b", "tiny-ti", "tiny-esrgan", "tiny-lora-kohya",
                          "tiny-canny-original"}
    first_files, second_files = _all_files(demo_models_dir), _all_files(str(second))
    assert sorted(first_files) == sorted(second_files)
    differing = [name for name in first_files if first_files[name] != second_files[name]]
    assert differing == []


def test_cli_prints_a_line_per_model_and_the_total(tmp_path, capsys):
    # in-process through the real argument parser (a subprocess would re-import diffusers)
    from broker.cli import main

    out = tmp_path / "cli-kit"
    (out / "tiny-sdxl").mkdir(parents=True)
    (out / "tiny-sdxl" / "stale.txt").write_text("from an older kit")
    assert main(["demo-models", "--out", str(out), "--log-level", "WARNING"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ("tiny-sdxl", "tiny-sdxl.safetensors", "tiny-sdxl-refiner", "tiny-vae", "tiny-canny",
                 "tiny-depth", "tiny-lora-a", "tiny-lora-b", "tiny-ti", "tiny-esrgan", "tiny-lora-kohya",
                 "tiny-canny-original"):
        assert any(line.split()[:1] == [name] and line.rstrip().endswith(" s") for line in lines), name
    assert lines[-1].startswith("built 12 models in ")
    assert (out / "tiny-sdxl.safetensors").is_file()
    assert not (out / "tiny-sdxl" / "stale.txt").exists()  # a rebuild replaces, never mixes


def test_cli_reports_an_unwritable_target(tmp_path, capsys):
    import argparse

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code = kit.run(argparse.Namespace(out=str(blocker / "kit"), log_level="WARNING"))
    assert code == 1
    assert "cannot write the kit" in capsys.readouterr().out


def test_check_loads_both_layouts_and_compares_images(demo_models_dir):
    result = kit.check_demo_models(demo_models_dir, size=128, steps=2)
    assert result["identical"] is True
    assert result["generate_s"] > 0 and result["load_s"] > 0 and result["single_file_load_s"] > 0
