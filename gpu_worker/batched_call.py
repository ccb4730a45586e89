"""Dynamic batching on the real executor: compatible jobs (protocol.batching.batch_key) in one
diffusers call, each keeping its own prompts, seeds, files, progress, metrics and reply.

The shared part (models, LoRAs, scheduler, memory switches, input images) is set up once, from
the first job; each job's prompts are encoded on their own (as a lone run would encode them)
and the embeddings concatenated, so image i of the call is made from its own job's prompt and
its own seed's generator (diffusers draws each image's noise from its own generator). A batched
image therefore equals the lone job's image up to float noise of the batched UNet/VAE maths
(tests/serve/test_batching.py states the tolerance).

Failures stay with their job: a job that does not validate is answered on its own before the
call; a job aborted during the call is dropped from it (the call goes on for the others, and
stops only when every job is aborted); a failure while saving one job's files fails only that
job. An error in the shared part (a model that cannot load) is every job's error. Out of memory
in the batched call: the cache is evicted and each job runs again alone (with the lone run's
own retry). Embeddings of different lengths (long weighted prompts) or weighted prompts with a
refiner: the jobs run one after another instead.
"""

from __future__ import annotations

import copy
import logging
import time

import torch

from gpu_worker.executor_api import BatchMember, Outcome
from protocol import constants as C
from protocol.errors import JobError
from protocol.job import Job

log = logging.getLogger(__name__)


class _RunAlone(Exception):
    """The jobs cannot share this call after all: run each one alone."""


def _copy_error(exc: JobError, job: Job) -> JobError:
    """One job's copy of a shared error, its fields named as that job's form spells them."""
    own = JobError(exc.code, exc.message, copy.deepcopy(exc.details))
    own.name_fields(job.client_path)
    return own


def run_batch(executor, members: list[BatchMember]) -> list[Outcome]:
    """Run `members` (compatible jobs) as one call; one outcome per member, in order."""
    from gpu_worker.executor import _JobState, _is_oom

    outcomes: list[Outcome | None] = [None] * len(members)
    own_states = [_JobState() for _ in members]
    plans = {}
    for index, member in enumerate(members):   # validate before batching: bad input fails alone
        try:
            executor._validate(member.job)
            plans[index] = executor._prompt_plan(member.job, own_states[index])
        except JobError as exc:
            exc.name_fields(member.job.client_path)
            outcomes[index] = exc
    live = [i for i in plans if not members[i].should_abort()]
    for index in plans:
        if index not in live:
            outcomes[index] = JobError(C.CANCELLED, "aborted before it started")
    if len(live) == 1:
        outcomes[live[0]] = _alone(executor, members[live[0]])
        return outcomes
    if live:
        try:
            _run_shared(executor, members, live, plans, own_states, outcomes)
        except _RunAlone as why:
            log.info("batch of %d jobs runs one by one: %s", len(live), why)
            for index in live:
                outcomes[index] = _alone(executor, members[index])
        except Exception as exc:
            if not _is_oom(exc):
                raise
            log.warning("batch of %d jobs: out of memory (%s); each job runs again alone", len(live), exc)
            executor.cache.evict(reason="out of memory")
            from gpu_worker.pipeline_cache import free_device_memory
            free_device_memory()
            for index in live:
                outcomes[index] = _alone(executor, members[index], oom_note=True)
    return outcomes


def _alone(executor, member: BatchMember, oom_note: bool = False) -> Outcome:
    try:
        data = executor.run(member.job, member.progress, member.should_abort)
    except JobError as exc:
        return exc
    if oom_note:
        data.setdefault("warnings", []).append(
            "out of memory in a batched call with other jobs: ran again alone")
    return data


def _run_shared(executor, members, live, plans, own_states, outcomes) -> None:
    from gpu_worker.executor import PromptPlan, _JobState

    started = time.perf_counter()
    lead = members[live[0]].job
    jobs = [members[i].job for i in live]
    # the call's job: the lead's settings (equal for all by the batch key), streaming when any is
    call_job = lead.model_copy(update={"stream": any(job.stream for job in jobs)})
    shared = _JobState()
    # the shared call encodes no prompt of its own (each job's embeddings are passed in)
    shared.prompts = PromptPlan("", None, "", None, literal=True)
    executor._reset_peak_memory()

    def progress(stage: str, step: int, total_steps: int, eta_s=None, preview=None) -> None:
        for index in live:
            if not members[index].should_abort():
                members[index].progress(stage, step, total_steps, eta_s=eta_s)

    def should_abort() -> bool:
        return all(members[index].should_abort() for index in live)

    pipe = None
    try:
        try:
            dtype, _ = executor._dtype(lead.precision.dtype, shared.warnings)
            vae_dtype, _ = executor._dtype(lead.precision.vae_dtype, shared.warnings, field_name="vae_dtype")
            progress("loading", 0, 0)
            prep_started = time.perf_counter()
            inputs = executor._decode_inputs(lead, shared)
            pipe, refiner, vae, model_info = executor._assemble(lead, dtype, vae_dtype, inputs, shared)
            executor._attach_adapters(lead, pipe, shared, model_info)
            executor._apply_memory_switches(lead, pipe, shared)
            prompts = _concat([_embeddings(pipe, members[i].job, plans[i], own_states[i]) for i in live])
            refiner_prompts = _refiner_prompts(refiner, [(members[i].job, plans[i]) for i in live])
            preprocessing_time = time.perf_counter() - prep_started
            if should_abort():
                raise JobError(C.CANCELLED, "cancelled before denoising started")
            seeds = {index: executor._seeds(members[index].job) for index in live}
            all_seeds = [seed for index in live for seed in seeds[index]]
            infer_started = time.perf_counter()
            images = executor._infer(call_job, pipe, refiner, vae, inputs, all_seeds, progress, should_abort,
                                     shared, f"batch of {len(live)} jobs", prompts, refiner_prompts)
            inference_time = time.perf_counter() - infer_started
        except JobError as exc:
            for index in live:
                outcomes[index] = _copy_error(exc, members[index].job)
            return
        except (_RunAlone, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            from gpu_worker.executor import _is_oom
            if _is_oom(exc):
                raise
            log.exception("batch of %d jobs failed", len(live))
            for index in live:
                outcomes[index] = JobError(C.INTERNAL_ERROR, f"{exc.__class__.__name__}: {exc}")
            return
    finally:
        executor._detach_adapters(pipe, lead, shared)
        executor.cache.release(shared.pinned)

    offset, batch_info = 0, {"jobs": len(live), "images": len(all_seeds),
                             "request_ids": [members[i].job.request_id for i in live]}
    for index in live:
        member, count = members[index], len(seeds[index])
        own_images, offset = images[offset:offset + count], offset + count
        if member.should_abort():   # dropped from the call; the others went on
            outcomes[index] = JobError(C.CANCELLED, "cancelled while running in a batch; the other "
                                                    "jobs of the batch went on")
            continue
        outcomes[index] = _finish_one(executor, member, own_images, seeds[index], inputs, model_info,
                                      shared, own_states[index], plans[index], started,
                                      preprocessing_time, inference_time, batch_info)


def _finish_one(executor, member, images, seeds, inputs, model_info, shared, own, plan, started,
                preprocessing_time, inference_time, batch_info) -> Outcome:
    """One job's files and reply data from its images of the batched call."""
    from gpu_worker.executor import _JobState

    job = member.job
    state = _JobState(features=[*own.features], warnings=[*own.warnings, *shared.warnings],
                      prompts=plan, memory_peak_mb=shared.memory_peak_mb,
                      steps_run=dict(shared.steps_run), karras_applied=shared.karras_applied)
    for name in shared.features:
        state.feature(name)
    state.feature("dynamic_batch")
    info = copy.deepcopy(model_info)
    info["prompt_weighting"] = plan.weighted
    try:
        member.progress("postprocessing", 0, len(images))
        post_started = time.perf_counter()
        generated = executor._finish(job, images, seeds, inputs, info, state)
        postprocessing_time = time.perf_counter() - post_started
    except JobError as exc:
        exc.name_fields(job.client_path)
        return exc
    except Exception as exc:
        log.exception("job %s (in a batch) failed while saving", job.request_id)
        return JobError(C.INTERNAL_ERROR, f"{exc.__class__.__name__}: {exc}")
    # the call this job shared (how many jobs and images, which requests) goes in its metrics
    return executor._job_result(generated, state, info, started, preprocessing_time,
                                inference_time, postprocessing_time, batch=batch_info)


def _repeat(tensor, count: int):
    return tensor.repeat(count, *([1] * (tensor.dim() - 1)))


def _embeddings(pipe, job: Job, plan, state) -> dict:
    """This job's prompt embeddings, one row per image, as a lone run of it would compute them."""
    if plan.route_long_prompts(pipe):
        state.feature("long_prompt")
    guidance = job.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
    if plan.weighted:   # compel (after the LoRAs: they act on the encoders too)
        return {name: _repeat(tensor, job.batch_size)
                for name, tensor in plan.embeddings(pipe, refiner=False).items()
                if guidance or not name.startswith("negative")}
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=plan.prompt, prompt_2=plan.prompt_2, device=pipe._execution_device,
        num_images_per_prompt=job.batch_size, do_classifier_free_guidance=guidance,
        negative_prompt=plan.negative_prompt or None, negative_prompt_2=plan.negative_prompt_2,
        clip_skip=job.clip_skip or None)
    out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    if guidance:
        out.update(negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
    return out


def _concat(parts: list[dict]) -> dict:
    lengths = {part["prompt_embeds"].shape[1] for part in parts} | \
              {part["negative_prompt_embeds"].shape[1] for part in parts if "negative_prompt_embeds" in part}
    if len(lengths) > 1:
        raise _RunAlone(f"prompt embeddings of different lengths {sorted(lengths)} (long weighted prompts)")
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _refiner_prompts(refiner, jobs_and_plans) -> dict | None:
    """The refiner's prompts, one per latent, in the order of the call's images."""
    if refiner is None:
        return None
    if any(plan.weighted for _, plan in jobs_and_plans):
        raise _RunAlone("weighted prompts with a refiner")
    prompts, negatives = [], []
    for job, plan in jobs_and_plans:
        prompts += [plan.prompt_2 or plan.prompt] * job.batch_size
        negatives += [plan.negative_prompt_2 or plan.negative_prompt] * job.batch_size
    return {"prompt": prompts, "negative_prompt": negatives}
