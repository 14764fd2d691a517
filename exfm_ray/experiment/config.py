"""Config of the streaming ExFM experiment (exfm-method.md section 8)."""

from __future__ import annotations

from pydantic import Field, field_validator

from exfm_ray.configbase import Config
from exfm_ray.data.sources import SourceConfig
from exfm_ray.fm.config import FMConfig
from exfm_ray.students.config import BASE_VARIANTS, LOOPFM, VARIANTS, StudentConfig, split_variant, variant

SWEEPS = ("delay", "fm_bias", "fm_size", "knobs")  # `exfm experiment --sweep`, see experiment/sweeps.py


class KnobsConfig(Config):
    """Distillation knobs shared by the variants that use them (defaults: identity)."""

    w: float = Field(1.0, ge=0, description="Loss weight of the FM term.")
    beta: float = Field(1.0, ge=0, description="Gradient scale from aux heads into the backbone.")
    alpha: float = Field(1.0, gt=0, description="FM label scaling: min(1, alpha * p_F).")
    w_sa: float = Field(1.0, ge=0, description="Loss weight of the adapted-label term.")
    w_serving: float = Field(0.0, ge=0, description="Weight of a serving-head term toward the adapted label.")
    sa_head: str = Field("separate", description="'separate' or 'shared' aux head for the SA target.")


class ExperimentConfig(Config):
    source: SourceConfig = Field(default_factory=SourceConfig, description="Which stream to replay.")
    fm: FMConfig = Field(default_factory=FMConfig, description="Foundation model size and training.")
    student: StudentConfig = Field(default_factory=StudentConfig, description="Student size and training.")
    knobs: KnobsConfig = Field(default_factory=KnobsConfig, description="Distillation knobs.")
    variants: list[str] = Field(
        default_factory=lambda: list(BASE_VARIANTS),
        description="Variants to compare (the paper's five by default; 'loopfm' and '<variant>+loopfm' on request).",
    )
    seeds: int = Field(3, ge=1, description="Number of seeds (model init and batch order); data is fixed.")
    fm_delay: int = Field(1, ge=0, description="FM delay: window t is labeled by the FM trained through t-delay.")
    warmup: int | None = Field(None, ge=0, description="Windows left out of averages; default fm_delay + 1.")
    fm_bias: dict[str, float] = Field(
        default_factory=dict,
        description="Diagnostic: a logit offset added to the FM's labels of a tenant (the FM systematically "
        "wrong on it), by tenant name.",
    )
    guard_windows: int = Field(
        3, ge=1, description="Trailing windows the do-no-harm guard pools (the tenants' default)."
    )

    @field_validator("variants")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if split_variant(x)[0].removesuffix(LOOPFM) not in (*VARIANTS, *BASE_VARIANTS)]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)} (knobs after '@')")
        for x in v:
            variant(x)  # knobs after '@' must be valid DistillConfig fields
        return v

    @property
    def warmup_windows(self) -> int:
        return self.fm_delay + 1 if self.warmup is None else self.warmup

    @property
    def leaky(self) -> bool:
        """fm_delay 0 labels a window with an FM already trained on it: a diagnostic, never a result."""
        return self.fm_delay == 0
