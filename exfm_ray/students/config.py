"""Student (vertical model) size and distillation knobs (exfm-method.md sections 5-7)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from exfm_ray.configbase import Config

VARIANTS = ("vm_only", "kd_single_head", "ah", "ah_sa")


class StudentConfig(Config):
    size: int = Field(1, ge=1, le=6, description="Capacity dial: embedding dim 4 * 2**size, MLP [32*size, 16*size].")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate of the dense layers (backbone and heads).")
    embedding_lr: float = Field(0.1, gt=0, description="Adagrad learning rate of the embedding tables.")
    batch_size: int = Field(128, gt=0, description="Training batch size.")

    @property
    def embedding_dim(self) -> int:
        return 4 * 2**self.size

    @property
    def hidden(self) -> list[int]:
        return [32 * self.size, 16 * self.size]


class DistillConfig(Config):
    """How the student learns from the FM; every ablation is a switch here."""

    mode: Literal["none", "single_head", "aux_head"] = Field(
        "aux_head",
        description="none = VM alone; single_head = FM target on the serving head (KD baseline); "
        "aux_head = FM target on an auxiliary head dropped at serving time.",
    )
    adapter: bool = Field(True, description="Train a Student Adapter on fresh labels and distill its output.")
    w: float = Field(1.0, ge=0, description="Loss weight of the FM distillation term.")
    beta: float = Field(1.0, ge=0, description="Gradient scale from aux head(s) into the backbone (GS).")
    alpha: float = Field(1.0, gt=0, description="Label scaling of the FM target: min(1, alpha * p_F) (LS).")
    w_sa: float = Field(1.0, ge=0, description="Loss weight of the adapted-label term L_sa.")
    sa_head: Literal["separate", "shared"] = Field(
        "separate", description="A second aux head for the SA target, or share the FM aux head."
    )
    sa_input: Literal["logit", "prob"] = Field("logit", description="Adapter input: FM logit or probability.")
    sa_hidden: int = Field(8, gt=0, description="Hidden width of the adapter MLP (1 -> h -> 1).")
    sa_lr: float = Field(1e-2, gt=0, description="Adam learning rate of the adapter (its own optimizer).")
    mask_norm: Literal["mask", "batch"] = Field(
        "mask", description="Normalize masked distillation means by mask count or by batch size."
    )

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.adapter and self.mode != "aux_head":
            raise ValueError("adapter needs mode 'aux_head' (its target is learned by an aux head)")
        return self


def variant(name: str, **knobs: float | str) -> DistillConfig:
    """Named recipes of the experiment; knobs (w, beta, alpha, w_sa, sa_head, ...) apply where used."""
    base = {
        "vm_only": {"mode": "none", "adapter": False},
        "kd_single_head": {"mode": "single_head", "adapter": False},
        "ah": {"mode": "aux_head", "adapter": False},
        "ah_sa": {"mode": "aux_head", "adapter": True},
    }
    if name not in base:
        from exfm_ray.errors import ConfigError

        raise ConfigError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    return DistillConfig.parse({**knobs, **base[name]}, source=f"variant {name}")
