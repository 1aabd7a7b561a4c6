"""The generation pipeline: load the networks once, then plan, sample, decode, check and write samples."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from maisi.data.labelmap import resample_label
from maisi.data.preview import save_preview
from maisi.device import pick_device
from maisi.diffusion.guidance import ClassifierFreeGuidance, ConditionedDenoiser
from maisi.diffusion.sampling import make_generators, make_noise, sample
from maisi.diffusion.schedulers import make_scheduler
from maisi.io.formats import DicomIds, write_image, write_label
from maisi.io.volume import affine_from_spacing, spacing_from_affine
from maisi.labels import REGIONS, TUMOR_HOSTS, label_name, modality_code, region_one_hot, regions_in_mask
from maisi.maskgen.context import (
    AnatomySizeError,
    check_request,
    complete_context,
    load_condition_table,
    target_tumor,
)
from maisi.maskgen.postprocess import postprocess_mask
from maisi.maskgen.sampling import check_mask_sampler, generate_mask
from maisi.maskgen.sizes import measure_sizes
from maisi.networks.memory import MemoryPlan
from maisi.networks.precision import compute_dtype, for_inference, warn_if_slow
from maisi.pipeline import masks as M
from maisi.pipeline.models import Networks, load_networks
from maisi.pipeline.postprocess import check_quality, to_hu, to_int16
from maisi.pipeline.record import failed_organs, sample_record, write_record
from maisi.pipeline.validation import (
    GenerationRequest,
    Plan,
    SizeControl,
    anatomy_ids,
    attempt_seed,
    check_files,
    check_geometry,
    check_numbers,
    check_sampler,
    parse_regions,
    rules_for,
    sample_files,
    triple,
    tumor_ids,
    unused_fields,
)


@dataclass
class Sample:
    """One generated sample: HU volume (int16), its label map (or None), affine and written files."""

    index: int
    seed: int
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    record: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """The sample indices process `rank` of `world_size` generates (round robin: k % world_size == rank)."""
    return list(range(rank, num_samples, world_size))


def world_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class Pipeline:
    """`Pipeline.from_pretrained(weights)` then `pipe.generate(GenerationRequest(...), out=folder)`."""

    def __init__(self, networks: Networks, device: str = "cpu", progress: bool = True, precision: str = "fp32",
                 on_step: Callable[[int, int], None] | None = None) -> None:
        """`on_step(done, total)` is called after each sampling step (a service's progress; it may raise to stop
        the job between steps); `progress` shows tqdm bars."""
        self.nets = networks
        self.on_step = on_step
        self.config = networks.config
        self.device = torch.device(device)
        self.progress = progress
        self.precision = precision
        self.dtype = compute_dtype(precision, self.device)
        warn_if_slow(self.dtype, self.device)
        if self.dtype != torch.float32:  # UNet/ControlNet weights in dtype (GroupNorm fp32); the steps stay fp32
            for net in (networks.unet, networks.controlnet):
                if net is not None:
                    for_inference(net, self.dtype, channels_last=self.config.unet.spatial_dims == 3)

    @classmethod
    def from_pretrained(cls, weights: str | Path | Sequence[str | Path] | None = None, config: str | None = None,
                        device: str | None = None, progress: bool = True, precision: str = "fp32",
                        on_step: Callable[[int, int], None] | None = None) -> Pipeline:
        """weights: None (the shipped demo model), a model folder, or NVIDIA's files (.pt).
        precision: fp32 (default), bf16 (CPUs with AVX-512 BF16 or AMX, GPUs) or fp16 (GPU only)."""
        device = str(pick_device(device))
        compute_dtype(precision, torch.device(device))  # checked only: a bad precision fails before the weights load
        return cls(load_networks(weights, config, device), device, progress, precision, on_step)

    # -----------------------------------------------------------------------------------------
    # Planning: every default resolved and every rule checked before any compute
    # -----------------------------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> Plan:
        cfg, d = self.config, self.nets.defaults
        check_numbers(request, cfg.scheduler.num_train_timesteps)
        size_control = self.size_control(request)  # --anatomy-size: names, values, mask model, conditions
        size = triple(request.size if request.size is not None else d.get("size", 64), "size", int)
        spacing = triple(request.spacing if request.spacing is not None else d.get("spacing", 1.5), "spacing")
        anatomy, tumors = anatomy_ids(request.anatomy), tumor_ids(request.tumor)
        # no region given: the model's default, unless a mask decides or the anatomy asked for picks it
        picked = request.mask or anatomy or tumors or size_control
        default_region = () if picked else tuple(d.get("body_region", ()))
        regions = parse_regions(request.body_region or default_region)
        sampler = request.sampler or self.nets.trained_schedule
        check_sampler(sampler, self.nets.trained_schedule)
        modality = modality_code(request.modality if request.modality is not None else cfg.default_modality)
        use_mask = request.mask_source != "none" and (request.mask is not None or self.nets.controlnet is not None)
        if request.mask_source == "none" and (request.mask or anatomy or tumors):
            raise ValueError("mask, anatomy and tumor need a mask; they cannot be used with mask_source='none'")
        if use_mask and self.nets.controlnet is None:
            raise ValueError("this model has no ControlNet, so it cannot follow a mask (mask, anatomy, tumor); "
                             "give weights with a controlnet or generate without a mask (mask_source='none')")
        if request.mask is not None and not Path(request.mask).exists():
            raise FileNotFoundError(f"mask not found: {request.mask}")
        user = None
        if request.mask is not None and use_mask:  # read once: every sample and retry uses the same mask
            label, affine, info = M.load_user_mask(request.mask, request.mask_mapping)
            if request.size is None and request.spacing is None:
                size, spacing = self._mask_grid(label.shape, spacing_from_affine(affine))
            missing = [i for i in anatomy if not (label == i).any()]
            if missing:
                raise ValueError(f"the mask {request.mask} lacks the requested anatomy ids {missing}")
            homeless = [t for t in tumors if not np.isin(label, M.tumor_hosts(t)).any()]
            if homeless:
                raise ValueError(f"the mask {request.mask} has no organ to hold "
                                 f"{', '.join(label_name(t) for t in homeless)} (it needs "
                                 f"{' / '.join(label_name(h) for h in M.tumor_hosts(homeless[0])[:3])})")
            user = M.Mask(*resample_label(label, affine, size, spacing), info)
        warnings = check_geometry(size, spacing, regions or (1, 1), rules_for(cfg)) + unused_fields(request)
        steps = request.steps or cfg.scheduler.num_inference_steps
        guidance = cfg.guidance_scale if request.guidance is None else float(request.guidance)
        if guidance > 0 and cfg.unet.num_class_embeds is None:
            raise ValueError("classifier-free guidance needs a modality-conditioned UNet; this one has no "
                             "modality input: use guidance 0")
        if request.timesteps is not None and sampler != "rflow":
            raise ValueError(f"timesteps chooses rectified-flow timesteps; the {sampler} sampler has its own")
        timesteps = (request.timesteps or self.default_timesteps()) if sampler == "rflow" else None
        database = request.mask_database
        from_database = use_mask and request.mask is None and size_control is None
        if from_database and database is None and self.released:
            database = M.hub_database()  # NVIDIA's networks: NVIDIA's masks once `maisi download` brought them
        if from_database:  # a missing or malformed database, or one without a matching mask, fails before compute
            M.database_candidates(self._database(database, regions), size, spacing, regions,
                                  (*anatomy, *(TUMOR_HOSTS[t] for t in tumors)))
        return Plan(request, size, spacing, regions, modality, steps, sampler, guidance, anatomy, tumors,
                    use_mask, tuple(warnings), timesteps, None if database is None else str(database), user,
                    size_control)

    def size_control(self, request: GenerationRequest) -> SizeControl | None:
        """`request.anatomy_size` checked and completed before any compute: known names, sizes in [0, 1] or -1,
        at most 10 entries and one tumour; a mask model and a ControlNet; a conditions file; the mask sampler.
        Errors are AnatomySizeError (a ValueError) whose `field` names the entry, or "anatomy_size"."""
        if not request.anatomy_size:
            return None
        requested = check_request(request.anatomy_size)
        model = self.nets.mask
        if model is None:
            raise AnatomySizeError("anatomy_size", "needs a mask generation model, and these weights hold none: give "
                                   "weights with a model folder holding mask_autoencoder/ and mask_unet/ (`maisi "
                                   "train mask` writes them), NVIDIA's mask_generation_autoencoder.pt and "
                                   "mask_generation_diffusion_unet.pt, or the released set mask-ct")
        if request.mask_source == "none" or request.mask or request.mask_database or request.anatomy or request.tumor:
            raise AnatomySizeError("anatomy_size", "the mask is generated, so it cannot be combined with mask, "
                                   "mask_database, anatomy, tumor or mask_source='none'; name the structures (and "
                                   "at most one tumour) in anatomy_size")
        if self.nets.controlnet is None:
            raise AnatomySizeError("anatomy_size", "this model has no ControlNet, so it cannot follow a generated "
                                   "mask; give weights with a controlnet")
        path = request.anatomy_conditions or model.conditions
        if path is None:
            raise AnatomySizeError("anatomy_size", "needs a conditions file to complete the request and none lies "
                                   "beside the mask model: give anatomy_conditions, an all_anatomy_size_conditions.json "
                                   "(NVIDIA's, or one `maisi prepare --anatomy-conditions` wrote)")
        sizes, volumes = load_condition_table(path)
        sampler = check_mask_sampler(model.config, request.mask_sampler, "mask_sampler")
        steps = model.config.scheduler.num_inference_steps if request.mask_steps is None else request.mask_steps
        if not 1 <= steps <= model.config.scheduler.num_train_timesteps:
            raise ValueError(f"mask_steps must be in 1..{model.config.scheduler.num_train_timesteps}, got {steps}")
        guidance = model.config.guidance_scale if request.mask_guidance is None else request.mask_guidance
        if not 0 <= guidance <= 20:
            raise ValueError(f"mask_guidance must be in 0..20 (0: no guidance), got {guidance}")
        return SizeControl(requested, complete_context(requested, sizes), str(path), volumes, sampler, steps, guidance)

    @property
    def released(self) -> bool:
        """Whether the diffusion UNet comes from NVIDIA's released files (not a maisi checkpoint)."""
        return self.nets.sources["unet"].get("format") == "released"

    def default_timesteps(self) -> str:
        """Rectified-flow timesteps without a request: NVIDIA's (float16, int()) for NVIDIA's networks, so that
        they reproduce NVIDIA's outputs; the config's choice for the project's own models."""
        return "reference" if self.released or self.config.scheduler.reference_timesteps else "clean"

    def _mask_grid(self, shape: Sequence[int], spacing: Sequence[float]) -> tuple[tuple, tuple]:
        """A user mask without --size/--spacing: its own grid, rounded to sizes the model accepts."""
        div = self.config.image_divisor
        fov = np.asarray(shape[:3]) * np.asarray(spacing)
        new_size = tuple(int(max(div, round(n / div) * div)) for n in shape[:3])
        return new_size, tuple(float(f / n) for f, n in zip(fov, new_size))

    # -----------------------------------------------------------------------------------------
    # Masks
    # -----------------------------------------------------------------------------------------

    def mask_for(self, plan: Plan, seed: int, attempt: int) -> M.Mask | None:
        """The mask of one sample (user mask, or the `attempt`-th database match), tumours inpainted."""
        r = plan.request
        if not plan.use_mask:
            return None
        if plan.size_control is not None:
            return self.generated_mask(plan, seed, attempt)
        if r.mask is not None:
            mask = plan.user_mask
        else:
            folder = self._database(plan.mask_database, plan.regions)
            hosts = tuple(TUMOR_HOSTS[t] for t in plan.tumors)  # a tumour needs its host organ in the mask
            mask = M.database_mask(folder, plan.size, plan.spacing, plan.regions, (*plan.anatomy, *hosts), attempt)
        if plan.tumors:
            rng = np.random.default_rng([seed, attempt])
            label = mask.label
            for t in plan.tumors:
                label = M.insert_tumor(label, t, plan.spacing, rng)
            mask = M.Mask(label, mask.affine, {**mask.source, "tumors": list(plan.tumors)})
        return mask

    @staticmethod
    def _database(database: str | Path | None, regions: tuple[int, int] | None) -> str | Path:
        """The mask database a plan draws from: the one given, else the built-in phantoms of its region span."""
        return database or M.phantom_database(spans=None if regions is None else [regions])

    def generated_mask(self, plan: Plan, seed: int, attempt: int) -> M.Mask:
        """A new label map from the mask model for the plan's size vector (the attempt's seed): post-processed,
        its ten structures measured, then resampled (nearest) and padded or cropped to the output grid."""
        sc, model = plan.size_control, self.nets.mask
        mask_seed = attempt_seed(seed, attempt)
        raw = generate_mask(model.autoencoder, model.unet, sc.context, model.config, mask_seed, sampler=sc.sampler,
                            steps=sc.steps, guidance=sc.guidance, scale_factor=model.scale_factor,
                            memory_gb=plan.request.memory_gb, dtype=self.dtype, device=self.device)
        label = postprocess_mask(raw[0, 0].cpu().numpy(), target_tumor(sc.context, sc.requested))
        grid = (model.config.spacing_mm,) * 3
        measured = measure_sizes(label, grid, sc.reference_volumes)
        label, affine = resample_label(label, affine_from_spacing(grid, label.shape), plan.size, plan.spacing)
        sizes = {"requested": sc.requested, "completed": list(sc.context), "measured": measured,
                 "conditions": sc.conditions}
        return M.Mask(label, affine, {"kind": "generated", "seed": mask_seed, "sampler": sc.sampler, "steps": sc.steps,
                                      "guidance": sc.guidance, "spacing": grid, "anatomy_size": sizes})

    # -----------------------------------------------------------------------------------------
    # Sampling and decoding
    # -----------------------------------------------------------------------------------------

    def _conditions(self, plan: Plan, n: int, regions: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        cfg, dev = self.config.unet, self.device
        cond: dict[str, torch.Tensor] = {}
        if cfg.include_spacing_input:
            cond["spacing"] = torch.tensor([plan.spacing] * n, dtype=torch.float32, device=dev)
        if cfg.include_region_input:
            cond["top_region"] = torch.tensor([region_one_hot(a) for a, _ in regions], device=dev)
            cond["bottom_region"] = torch.tensor([region_one_hot(b) for _, b in regions], device=dev)
        if cfg.num_class_embeds is not None:
            cond["modality"] = torch.full((n,), plan.modality, dtype=torch.long, device=dev)
        return cond

    def _denoiser(self, plan: Plan, cond: dict[str, torch.Tensor], mask: torch.Tensor | None):
        den = ConditionedDenoiser(self.nets.unet, self.nets.controlnet if mask is not None else None, mask=mask, **cond)
        if plan.guidance > 0:  # unconditional branch: modality 0 (REFERENCE §2)
            den = ClassifierFreeGuidance(den, den.with_modality(torch.zeros_like(cond["modality"])), plan.guidance)
        return den

    def latent_shape(self, plan: Plan) -> tuple[int, ...]:
        f = self.config.autoencoder.downsample_factor
        return (self.config.autoencoder.latent_channels, *(s // f for s in plan.size))

    def scheduler(self, plan: Plan):
        """The plan's sampler with its timesteps set (rectified flow: reference or clean, as the plan says)."""
        cfg = replace(self.config.scheduler, kind=plan.sampler, num_inference_steps=plan.steps,
                      reference_timesteps=plan.timesteps == "reference")
        scheduler = make_scheduler(cfg, self.config.unet.spatial_dims)
        scheduler.set_timesteps(plan.steps, self.latent_shape(plan))
        return scheduler

    @torch.inference_mode()
    def sample_latents(self, plan: Plan, seeds: Sequence[int], masks: Sequence[M.Mask | None],
                       regions: Sequence[tuple[int, int]], desc: str = "") -> torch.Tensor:
        """Latents of one batch: noise (and DDPM step noise) from each sample's own seed, then the sampler."""
        gens = make_generators(seeds)
        noise = make_noise(self.latent_shape(plan), seeds, device=self.device, generators=gens)
        scheduler = self.scheduler(plan)
        mask = None
        if masks and masks[0] is not None:
            mask = torch.stack([torch.from_numpy(m.label.astype(np.int64)) for m in masks])[:, None].to(self.device)
        den = self._denoiser(plan, self._conditions(plan, len(seeds), regions), mask)
        total = len(scheduler.timesteps)
        bar = tqdm(total=total, desc=f"sampling {len(seeds)} sample(s){desc}", disable=not self.progress, leave=False)

        def step(i: int, t: float, x: torch.Tensor) -> None:
            bar.update(1)
            if self.on_step is not None:
                self.on_step(i + 1, total)

        try:
            return sample(den, scheduler, noise, generator=gens, callback=step)
        finally:
            bar.close()

    def decode_plan(self, plan: Plan, dtype: torch.dtype | None = None) -> MemoryPlan:
        """How one sample of `plan` will be decoded within `request.memory_gb` (networks.memory), in `dtype`
        (default: the pipeline's)."""
        shape = (1, *self.latent_shape(plan))
        return self.nets.autoencoder.plan_within("decode", shape, plan.request.memory_gb, dtype=dtype or self.dtype)

    @torch.inference_mode()
    def decode(self, z: torch.Tensor, memory: MemoryPlan, desc: str = "") -> np.ndarray:
        """Latents → images in [0, 1] through the VAE with the decode plan `memory`, one sample at a time."""
        out = []
        for i in self._bar_iter(range(z.shape[0]), f"decoding{desc}"):
            x = self.nets.autoencoder.decode_within(z[i:i + 1] / self.nets.scale_factor, dtype=self.dtype,
                                                    plan=memory)
            out.append(x[0, 0].float().cpu().numpy())
        return np.stack(out)

    def _bar_iter(self, it, desc: str):
        return tqdm(it, desc=desc, disable=not self.progress or len(it) < 2, leave=False)

    # -----------------------------------------------------------------------------------------
    # The whole job
    # -----------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest, out: str | Path | None = None, rank: int | None = None,
                 world_size: int | None = None, plan: Plan | None = None,
                 on_event: Callable[[str], None] | None = None) -> list[Sample]:
        """Generate this process's share of the samples (torchrun: RANK/WORLD_SIZE), writing them to
        `out` when given; sample k uses seed `request.seed + k` whatever the batch size or process count.

        A sample that fails the quality check is made again, up to `request.quality_retries` times: attempt a
        uses seed `attempt_seed(seed, a)` = seed + a·2^28 (attempt 0: the sample's seed), which no other sample
        or attempt can have, and the a-th ranked database mask (a user mask stays). `on_event` receives one line
        per failed attempt (the library itself prints nothing)."""
        check_files(request, out)  # a bad `out` or mask fails here, before any compute
        plan = plan or self.plan(request)
        memory = self.decode_plan(plan)  # before any sampling: a budget nothing fits fails here
        if request.memory_gb is not None:  # the plan the budget chose (always in the record)
            _emit(on_event, f"decoder: {memory.describe()}")
        env_rank, env_world = world_from_env()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
        mine = shard(request.num_samples, rank, world_size)
        samples: list[Sample] = []
        for start in range(0, len(mine), request.batch_size):
            batch = mine[start:start + request.batch_size]
            samples += self._batch(plan, memory, batch, out, on_event)
        return samples

    def _attempt(self, plan: Plan, k: int, attempt: int) -> tuple[int, int, M.Mask | None]:
        """(sample, seed, mask) of one attempt: both follow from (sample seed, attempt) alone, and the seed is
        different for every attempt, so no attempt can repeat an earlier one."""
        seed = plan.request.seed + k
        return k, attempt_seed(seed, attempt), self.mask_for(plan, seed, attempt)

    def _batch(self, plan: Plan, memory: MemoryPlan, indices: list[int], out: str | Path | None,
               on_event: Callable[[str], None] | None) -> list[Sample]:
        t0 = time.perf_counter()
        r = plan.request
        total = r.quality_retries + 1 if r.quality_check else 1
        history: dict[int, list[dict]] = {k: [] for k in indices}
        kept: dict[int, tuple] = {}
        todo = [self._attempt(plan, k, 0) for k in indices]
        for attempt in range(total):
            if not todo:
                break
            desc = f", attempt {attempt + 1}/{total}" if total > 1 else ""
            masks = [m for _, _, m in todo]
            z = self.sample_latents(plan, [s for _, s, _ in todo], masks, [self._regions(plan, m) for m in masks], desc)
            retry = []
            for (k, s, m), img in zip(todo, self.decode(z, memory, desc)):
                label = None if m is None else m.label
                hu = to_hu(img, label)
                quality = check_quality(hu, label) if r.quality_check else {
                    "passed": None, "reason": "quality check turned off", "organs": {}}
                failed = failed_organs(quality)
                history[k].append({"attempt": attempt, "seed": s, "mask": None if m is None else m.source,
                                   "quality_passed": quality.get("passed"), "failed": failed})
                kept[k] = (s, m, hu, quality)
                if quality.get("passed") is not False:
                    continue
                head = f"sample {k} (seed {r.seed + k}): attempt {attempt + 1}/{total} failed — {describe_failed(failed)}"
                if attempt + 1 < total:
                    retry.append(self._attempt(plan, k, attempt + 1))
                    _, s2, m2 = retry[-1]
                    _emit(on_event, f"{head}; retrying (attempt {attempt + 2}/{total}) with seed {s2} and {mask_name(m2)}")
                else:
                    _emit(on_event, f"{head}; no attempts left, keeping it (see the record)")
            todo = retry
        seconds = (time.perf_counter() - t0) / len(indices)
        return [self._finish(plan, memory, k, *kept[k], history[k], out, seconds) for k in indices]

    def _regions(self, plan: Plan, mask: M.Mask | None) -> tuple[int, int]:
        if plan.regions is not None:
            return plan.regions
        found = regions_in_mask(np.unique(mask.label).tolist()) if mask is not None else None
        return found or (REGIONS.index("chest"),) * 2

    def _finish(self, plan: Plan, memory: MemoryPlan, k: int, image_seed: int, mask: M.Mask | None, hu: np.ndarray, quality: dict,
                attempts: list[dict], out: str | Path | None, seconds: float) -> Sample:
        seed = plan.request.seed + k
        affine = mask.affine if mask is not None else affine_from_spacing(plan.spacing, plan.size)
        image = to_int16(hu)
        label = None if mask is None else mask.label
        model = {"config": self.config.name, "scale_factor": self.nets.scale_factor, "weights": self.nets.sources,
                 "precision": self.precision,
                 "decode_plan": memory.as_dict()}
        files = {} if out is None else sample_files(out, seed, plan.request)
        rec = sample_record(index=k, seed=seed, image_seed=image_seed, plan=replace(plan, regions=self._regions(plan, mask)), model=model,
                            mask=None if mask is None else mask.source, quality=quality, attempts=attempts,
                            files={n: p.name for n, p in files.items()}, device=str(self.device), seconds=seconds)
        sample = Sample(k, seed, image, label, affine, rec, files)
        if out is not None:
            write_sample(sample, plan.spacing)
        return sample


def mask_name(mask: M.Mask | None) -> str:
    """How a retry line names a mask: its file (database entry or user file), or that there is none."""
    if mask is None:
        return "no mask"
    return f"mask {Path(str(mask.source.get('file', mask.source.get('kind', '?')))).name}"


def describe_failed(failed: dict[str, dict]) -> str:
    """'bone median -13.0 HU outside [71.4, 1000.0], ...' from failed_organs(); one decimal, so that a median just
    outside a bound never reads as equal to it."""
    return ", ".join(f"{organ} median {o['median_hu']:.1f} HU outside [{o['range'][0]:.1f}, {o['range'][1]:.1f}]"
                     for organ, o in failed.items()) or "quality check failed"


def _emit(on_event: Callable[[str], None] | None, line: str) -> None:
    if on_event is not None:
        on_event(line)


def write_sample(sample: Sample, spacing: Sequence[float]) -> None:
    """Image (int16 HU), label (uint8), preview PNG and record JSON, each written atomically, the image and label
    in the format their file names give (io.formats: NIfTI, NRRD, a DICOM CT series and a DICOM SEG)."""
    f = sample.files
    f["image"].parent.mkdir(parents=True, exist_ok=True)
    ids = DicomIds.new()  # DICOM: the image series and its SEG share one study and frame of reference
    write_image(f["image"], sample.image, sample.affine, ids)
    if sample.label is not None:
        write_label(f["label"], sample.label, sample.affine, ids)
    else:
        f.pop("label")
        sample.record["files"].pop("label", None)
    save_preview(f["preview"], sample.image, sample.label, spacing, with_plain=sample.label is not None)
    write_record(f["record"], sample.record)
