"""Nothing reloaded per job, for real on the tiny kit: LoRAs stay loaded between jobs
(gpu_worker/resident_loras.py) and schedulers are copied from one built once.

What a client sees must not depend on what ran before: every image here is compared byte for
byte (sha256 of the saved PNG) with the same request on a model that never had a LoRA, or had
only that request's LoRAs loaded fresh. Reuse itself is checked by counting the calls that load
a LoRA into the modules."""

from __future__ import annotations

import pytest

from gpu_worker import resident_loras
from protocol.errors import JobError
from protocol.job import Job

pytestmark = pytest.mark.slow

A = {"name": "tiny-lora-a", "weight": 1.0}
B = {"name": "tiny-lora-b", "weight": 0.7}


@pytest.fixture(scope="module")
def own_executor(demo_models_dir, tmp_path_factory):
    """An executor of this module only: the tests below depend on its history."""
    from gpu_worker.executor import DiffusersExecutor

    root = tmp_path_factory.mktemp("lora-reuse")
    return DiffusersExecutor("cpu", models_dir=demo_models_dir, output_dir=str(root / "out"),
                             input_dir=str(root), worker_id="lora-reuse")


@pytest.fixture
def lora_loads(monkeypatch):
    """Counts load_lora_weights calls (the expensive part reuse avoids) on every SDXL pipeline."""
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

    calls = []
    original = StableDiffusionXLLoraLoaderMixin.load_lora_weights

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("adapter_name"))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(StableDiffusionXLLoraLoaderMixin, "load_lora_weights", counting)
    return calls


def sha(executor, **fields) -> str:
    return generate(executor, **fields)["sha256"]


def pixels(executor, **fields):
    """Decoded pixels (the PNG's parameters text names the LoRAs, so bytes differ with them)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(generate(executor, **fields)["path"]).convert("RGB"))


def generate(executor, **fields) -> dict:
    job = dict(request_id="r", prompt="a photo of a cat", models={"base": "tiny-sdxl"}, width=256, height=256,
               steps=2, seed=11, precision={"dtype": "float32"}, scheduler="EulerDiscreteScheduler")
    job.update(fields)
    result = executor.run(Job.model_validate(job), lambda *a: None, lambda: False)
    return result["generated_images"][0]


def fresh(executor) -> None:
    """Drop every cached model: the next job loads the base from disk, with no LoRA on it."""
    executor.cleanup()


def base_entry_mb(executor) -> float:
    return next(m["size_mb"] for m in executor.cache.snapshot()["models_loaded"] if m["name"] == "tiny-sdxl")


def test_same_set_is_not_loaded_again_and_history_never_changes_an_image(own_executor, lora_loads,
                                                                        structured_image):
    fresh(own_executor)
    plain = sha(own_executor)
    img2img = dict(init_image=structured_image, strength=0.8)
    plain_img2img = sha(own_executor, **img2img)
    only_a = sha(own_executor, loras=[A])
    assert only_a != plain and len(lora_loads) == 1
    plain_size_mb = base_entry_mb(own_executor)

    assert sha(own_executor, loras=[A]) == only_a
    assert len(lora_loads) == 1  # same set: nothing loaded again
    assert sha(own_executor) == plain  # no LoRA after LoRA: the plain model's bytes
    assert sha(own_executor, **img2img) == plain_img2img  # another from_pipe variant, same modules
    assert sha(own_executor, loras=[A]) == only_a  # back on after a job without
    assert len(lora_loads) == 1

    a_and_b = sha(own_executor, loras=[A, B])
    assert len(lora_loads) == 2  # only B was new
    # weight 0 while B stays resident and unused: the plain model's pixels
    assert (pixels(own_executor, loras=[{**A, "weight": 0.0}]) == pixels(own_executor)).all()
    assert len(lora_loads) == 2
    # the adapters' weights count against the cache budget with the base they sit on, and the
    # heartbeat says which LoRAs are resident; both go when the base is evicted
    assert base_entry_mb(own_executor) > plain_size_mb
    assert own_executor.telemetry()["loras_cached"] == ["tiny-lora-a", "tiny-lora-b"]

    # the same requests on a base that never saw another LoRA give the same bytes
    fresh(own_executor)
    assert own_executor.telemetry()["loras_cached"] == []
    assert sha(own_executor, loras=[A]) == only_a
    fresh(own_executor)
    assert sha(own_executor, loras=[A, B]) == a_and_b
    assert sha(own_executor) == plain


def test_more_sets_than_fit_drop_the_least_recently_used_adapter(own_executor, lora_loads, monkeypatch):
    monkeypatch.setattr(resident_loras, "MAX_RESIDENT", 1)
    fresh(own_executor)
    only_a = sha(own_executor, loras=[A])
    only_b = sha(own_executor, loras=[B])
    assert resident_adapters(own_executor) == [(lora_path(own_executor, "tiny-lora-b"), 0)]
    assert sha(own_executor, loras=[A]) == only_a  # loaded again, A replaced B
    assert len(lora_loads) == 3
    a_and_b = sha(own_executor, loras=[A, B])  # a set larger than the cap still runs whole
    assert len(resident_adapters(own_executor)) == 2
    assert sha(own_executor, loras=[B]) == only_b
    assert resident_adapters(own_executor) == [(lora_path(own_executor, "tiny-lora-b"), 0)]
    fresh(own_executor)
    assert sha(own_executor, loras=[A, B]) == a_and_b


def lora_path(executor, name: str) -> str:
    return executor.resolver.lora(name, None).path


def resident_adapters(executor) -> list:
    """Keys of the adapters on the cached base's UNet, least recently used first."""
    from gpu_worker.pipeline_cache import BASE

    base = next(entry.value for entry in executor.cache._entries.values() if entry.kind == BASE)
    return list(resident_loras.resident(base).adapters)


def test_a_load_that_fails_half_way_leaves_the_plain_model(own_executor, monkeypatch):
    from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin

    fresh(own_executor)
    plain = sha(own_executor)
    only_b = sha(own_executor, loras=[B])
    original = StableDiffusionXLLoraLoaderMixin.load_lora_weights

    def load_then_fail(self, *args, **kwargs):
        original(self, *args, **kwargs)  # the layers are in: a failure now leaves them half-set
        raise RuntimeError("simulated failure while loading a LoRA")
    monkeypatch.setattr(StableDiffusionXLLoraLoaderMixin, "load_lora_weights", load_then_fail)
    with pytest.raises(JobError):
        sha(own_executor, loras=[A])
    monkeypatch.setattr(StableDiffusionXLLoraLoaderMixin, "load_lora_weights", original)
    assert sha(own_executor) == plain
    assert sha(own_executor, loras=[B]) == only_b  # loaded again after the reset


def test_schedulers_are_built_once_and_every_job_gets_a_fresh_copy(own_executor, monkeypatch):
    import gpu_worker.executor as executor_module

    built = []
    original = executor_module.make_scheduler

    def counting(name, config, use_karras_sigmas=False):
        built.append((name, use_karras_sigmas))
        return original(name, config, use_karras_sigmas)
    monkeypatch.setattr(executor_module, "make_scheduler", counting)
    fresh(own_executor)
    own_executor._scheduler_prototypes.clear()
    kdpm2 = dict(scheduler="KDPM2DiscreteScheduler", use_karras_sigmas=True)  # ~1 s to build here
    first = sha(own_executor, **kdpm2)
    assert sha(own_executor, **{**kdpm2, "steps": 3}) != first  # the copy ran another schedule
    assert sha(own_executor, **kdpm2) == first  # ... and left nothing behind
    assert built == [("KDPM2DiscreteScheduler", True)]
    euler = sha(own_executor)
    assert built[-1] == ("EulerDiscreteScheduler", False)
    assert sha(own_executor, **kdpm2) == first and sha(own_executor) == euler
    assert len(built) == 2
