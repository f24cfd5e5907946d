"""The parameters of one inversion: every one declared once, here.

Each field of `InversionParams` carries its name, type, default, bounds, description and
example. The gateway's form and JSON bodies (service/bodies.py), the CLI's flags
(ddim_inversion_cli/flags.py), the Python client's check of its keyword arguments and the
README's parameter table (scripts/params_doc.py) are derived from it; none redeclares a
parameter. `SubmissionOptions` declares, the same way, what a submission asks of the
service beyond the inversion itself.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from ddim_inversion.errors import InvalidParameter
from ddim_inversion.scheduler_config import (
    DPMSOLVER_OVERRIDES,
    SCHEDULER_OVERRIDES,
    check_override,
)
from ddim_inversion.sizes import SDXL_PARAMETERS, parse_pair, parse_resolution

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
"""What a served model's name may be: a word, a folder's name or a hub id (`owner/name`);
it becomes part of a queue's name and a metric label."""


NULL_TEXT_GUIDANCE_SCALE = 7.5
"""The usual guidance of null-text inversion: what the CLI uses with `--method null_text`
when no `--guidance-scale` is given (the contract itself needs any value above 1)."""


EDICT_MIXING = 0.93
"""EDICT's mixing coefficient p when none is given: the paper's."""

DDPM_ETA = 1.0
"""The ddpm sampler's eta when none is given: DDPM sampling, the paper's choice."""

DPMSOLVER_METHODS = ("ddim", "negative_prompt")
"""The methods inverse_scheduler dpmsolver runs: those whose steps are plain inversion
steps (EDICT and DDPM have their own; null-text optimises against DDIM sampling)."""


class InversionParams(BaseModel):
    """Everything a caller may choose about one inversion; names follow diffusers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(
        description="The text the image is inverted under.", examples=["a photo of a cat"]
    )
    negative_prompt: str = Field(
        "", description="The unconditional prompt of classifier-free guidance (guidance_scale > 1)."
    )
    num_inference_steps: int = Field(
        50, ge=1, le=1000, description="DDIM inversion steps.", examples=[50]
    )
    guidance_scale: float = Field(
        1.0,
        ge=0.0,
        le=50.0,
        description=(
            "1.0: one conditional UNet pass per step; above: classifier-free guidance with "
            "the negative prompt."
        ),
        examples=[1.0],
    )
    resolution: tuple[int, int] | None = Field(
        None,
        description=(
            "The size the image is inverted at, width and height in pixels, multiples of 64: "
            "N or WxH (e.g. 512 or 768x512); absent: the model's native size."
        ),
        examples=["768x512"],
    )
    resize_mode: Literal["center_crop", "stretch"] = Field(
        "center_crop",
        description="How the image reaches that size: center_crop keeps its aspect ratio.",
    )
    encode_mode: Literal["mean", "sample"] = Field(
        "mean", description="The VAE latent: its distribution's mean, or a sample (needs seed)."
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**63 - 1,
        description="The seed of encode_mode sample and of method ddpm's noise (absent: 0).",
        examples=[7],
    )
    return_trajectory: bool = Field(
        False,
        description=(
            "Also keep every step's latent: `trajectory`, steps + 1 latents, index 0 the "
            "clean latent."
        ),
    )
    result_dtype: Literal["float32", "float16"] = Field(
        "float32", description="The dtype of the stored latents."
    )
    inverse_scheduler: Literal["ddim", "dpmsolver"] = Field(
        "ddim",
        description=(
            "ddim: DDIMInverseScheduler. dpmsolver: DPM-Solver++ multistep inversion "
            "(DPMSolverMultistepInverseScheduler; methods ddim and negative_prompt, no "
            "refinement), closer to the sampling path at few steps; sample back with "
            "DPMSolverMultistepScheduler."
        ),
    )
    scheduler: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Inverse scheduler overrides, by parameter name. inverse_scheduler ddim: "
            f"{', '.join(SCHEDULER_OVERRIDES)}. dpmsolver: {', '.join(DPMSOLVER_OVERRIDES)}."
        ),
        examples=[{"timestep_spacing": "trailing"}],
    )
    refine_iterations: int = Field(
        0,
        ge=0,
        le=50,
        description=(
            "Fixed-point iterations per step (Anderson-accelerated, as AIDI, Pan et al. "
            "2023) making the step the exact inverse of DDIM sampling; each costs one more "
            "UNet call per step. 0: plain DDIM inversion."
        ),
    )
    refine_tolerance: float = Field(
        1e-4,
        gt=0,
        le=1,
        description=(
            "A step's refinement stops once the residual ||g(z) - z|| / ||g(z)|| of its "
            "iterate z (g: one plain fixed-point iteration) falls below this; steps still "
            "above it after refine_iterations are listed in refine_unconverged_steps."
        ),
    )
    method: Literal["ddim", "null_text", "negative_prompt", "edict", "ddpm"] = Field(
        "ddim",
        description=(
            "ddim: (refined) DDIM inversion. null_text: null-text inversion (Mokady et al. "
            "2022): a DDIM inversion at guidance 1 is the pivot, then an unconditional "
            "embedding per step is optimised so that guided DDIM sampling at guidance_scale "
            "(> 1) follows the pivot; the result adds `null_embeddings`. negative_prompt: "
            "DDIM inversion at guidance 1 whose `null_embeddings` are the prompt's own "
            "embedding at every step: guided sampling with them reconstructs without "
            "optimisation. edict: EDICT (Wallace et al. 2022), exact coupled inversion; the "
            "result adds `latents_pair`, which sampling needs too. ddpm: edit-friendly DDPM "
            "inversion (Huberman-Spiegelglas et al. 2023): noisy latents drawn from seed, "
            "the result adds the `noise_maps` a DDIM sampler at eta adds back, and the "
            "`noisy_latents`."
        ),
    )
    edict_mixing: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            f"edict: the mixing coefficient p of the coupled latents; absent: {EDICT_MIXING}."
        ),
        examples=[EDICT_MIXING],
    )
    eta: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "ddpm: the sampler's noise weight (DDIMScheduler eta), the same when sampling "
            f"back; absent: {DDPM_ETA}, DDPM sampling."
        ),
        examples=[DDPM_ETA],
    )
    null_text_inner_steps: int = Field(
        10, ge=1, le=100, description="null_text: Adam iterations per step (UNet forward+backward)."
    )
    null_text_learning_rate: float = Field(
        1e-2, gt=0, le=1, description="null_text: Adam learning rate of the null embedding."
    )
    null_text_early_stop: float = Field(
        1e-5,
        ge=0,
        allow_inf_nan=False,
        description="null_text: a step's optimisation stops once its latent MSE is below this.",
    )
    verify: bool = Field(
        False,
        description=(
            "Sample back from the latents with the method's sampler (DDIMScheduler, same "
            "prompt and guidance, the null embeddings for null_text and negative_prompt; "
            "EDICT's; DDPM's with the noise maps; DPMSolverMultistepScheduler for dpmsolver) "
            "and decode: reports reconstruction_latent_error and reconstruction_psnr and "
            "stores a reconstruction PNG. Costs one more pass of num_inference_steps UNet "
            "calls (two per step for edict) and a VAE decode."
        ),
    )

    prompt_2: str | None = Field(
        None,
        description="SDXL models only: the prompt of the second text encoder; absent: prompt.",
        examples=["a photo of a cat, film grain"],
    )
    negative_prompt_2: str | None = Field(
        None,
        description=(
            "SDXL models only: the negative prompt of the second text encoder; absent: "
            "negative_prompt."
        ),
        examples=["blurry"],
    )
    original_size: tuple[int, int] | None = Field(
        None,
        description=(
            "SDXL models only: the size conditioning's original image size, height,width "
            "(the SDXL pipeline's order); absent: the job's resolution."
        ),
        examples=["1024,1024"],
    )
    crops_coords_top_left: tuple[int, int] | None = Field(
        None,
        description="SDXL models only: the size conditioning's crop, top,left; absent: 0,0.",
        examples=["0,0"],
    )
    target_size: tuple[int, int] | None = Field(
        None,
        description=(
            "SDXL models only: the size conditioning's target size, height,width; absent: the "
            "job's resolution."
        ),
        examples=["1024,1024"],
    )

    model: str | None = Field(
        None,
        pattern=MODEL_NAME_PATTERN,
        description=(
            "The model the job runs on: one GET /v1/models lists; absent: the pool's default model."
        ),
        examples=["tiny"],
    )

    @field_validator("resolution", mode="before")
    @classmethod
    def _parse_resolution(cls, value: Any) -> Any:
        if value is None or value == "":
            return None
        try:
            return parse_resolution(value)
        except InvalidParameter as exc:
            raise ValueError(exc.message) from None

    @field_validator("original_size", "crops_coords_top_left", "target_size", mode="before")
    @classmethod
    def _parse_pair(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value == "":
            return None
        try:
            return parse_pair(
                value, info.field_name or "", allow_zero=info.field_name == "crops_coords_top_left"
            )
        except InvalidParameter as exc:
            raise ValueError(exc.message) from None

    @field_validator("model", mode="before")
    @classmethod
    def _empty_model_is_default(cls, value: Any) -> Any:
        # A form's empty choice: the pool's default, as when the field is absent.
        return None if value == "" else value

    @field_validator("guidance_scale")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_overrides(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        # inverse_scheduler is declared before scheduler: validated already (absent if invalid).
        inverse_scheduler = info.data.get("inverse_scheduler", "ddim")
        for name, item in value.items():
            try:
                check_override(name, item, inverse_scheduler)
            except InvalidParameter as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _seed_needs_sample(self) -> InversionParams:
        if self.encode_mode == "sample" and self.seed is None:
            raise ValueError(
                "encode_mode 'sample' needs a seed, so that the result is reproducible"
            )
        return self

    @model_validator(mode="after")
    def _null_text_needs_guidance(self) -> InversionParams:
        if self.method == "null_text" and not self.guidance_scale > 1.0:
            raise ValueError(
                f"method 'null_text' needs guidance_scale > 1 (e.g. {NULL_TEXT_GUIDANCE_SCALE}, "
                "the usual value): "
                "it optimises the unconditional embedding of classifier-free guidance, "
                f"which guidance_scale {self.guidance_scale} does not use"
            )
        return self

    @model_validator(mode="after")
    def _method_combinations(self) -> InversionParams:
        """Refuses what a method cannot do, rather than ignoring a parameter given."""
        for name, method in (("eta", "ddpm"), ("edict_mixing", "edict")):
            if getattr(self, name) is not None and self.method != method:
                raise ValueError(f"{name} applies to method '{method}' only, not '{self.method}'")
        if self.inverse_scheduler == "dpmsolver" and self.method not in DPMSOLVER_METHODS:
            raise ValueError(
                f"inverse_scheduler 'dpmsolver' runs methods {', '.join(DPMSOLVER_METHODS)}; "
                f"method '{self.method}' has its own steps"
            )
        if self.refine_iterations and (
            self.method in ("edict", "ddpm") or self.inverse_scheduler == "dpmsolver"
        ):
            which = (
                f"method '{self.method}'"
                if self.method in ("edict", "ddpm")
                else "inverse_scheduler 'dpmsolver'"
            )
            raise ValueError(f"refine_iterations refines DDIM inversion steps, not {which}")
        if self.method == "negative_prompt" and self.negative_prompt:
            raise ValueError(
                "method 'negative_prompt' inverts under the prompt, which is the negative "
                "prompt for sampling: a negative_prompt would not be used"
            )
        return self

    @property
    def mixing(self) -> float:
        """edict's p: edict_mixing, or the paper's when absent."""
        return EDICT_MIXING if self.edict_mixing is None else self.edict_mixing

    @property
    def ddpm_eta(self) -> float:
        """ddpm's eta: the one given, or DDPM sampling's when absent."""
        return DDPM_ETA if self.eta is None else self.eta

    @property
    def sdxl_parameters(self) -> list[str]:
        """The SDXL-only parameters given (refused for other models)."""
        return [name for name in SDXL_PARAMETERS if getattr(self, name) is not None]

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs two UNet passes per step; 1.0 runs one."""
        return self.guidance_scale != 1.0


class SubmissionOptions(BaseModel):
    """What a submission asks of the service beyond the inversion: not an engine parameter,
    so not part of `InversionParams`, but declared once here for every body and client."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook_url: str | None = Field(
        None,
        description=(
            "POSTed the job's end (an allowed host only: INVERSION_WEBHOOK_ALLOWED_HOSTS)."
        ),
        examples=["https://example.com/hooks/inversion"],
    )


def submission_fields() -> dict[str, FieldInfo]:
    """Every field a submission may carry besides its image: the inversion's parameters,
    then the submission's options, by name."""
    return {**InversionParams.model_fields, **SubmissionOptions.model_fields}


def outer_type(info: FieldInfo) -> tuple[Any, tuple[Any, ...]]:
    """(outer type, its arguments) of a field, `X | None` read as X: `(Literal, ("mean",
    "sample"))`, `(int, ())`, `(tuple, (int, int))`, `(dict, (str, Any))`. Each surface
    derives its own form from it: a flag's type, a body's field, a table's cell."""
    annotation = info.annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1:
            annotation = rest[0]
            origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    return origin or annotation, args
