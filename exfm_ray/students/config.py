"""Student (vertical model) size and distillation knobs (exfm-method.md sections 5-7)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from exfm_ray.configbase import Config
from exfm_ray.loopfm.config import LoopFMConfig

# Each named variant is a switch setting of DistillConfig; knobs (w, beta, alpha, ...) come on top.
BASE_VARIANTS: dict[str, dict] = {
    "vm_only": {"mode": "none", "adapter": False},
    "kd_single_head": {"mode": "single_head", "adapter": False},
    "kd_sa": {"mode": "single_head", "adapter": True},
    "ah": {"mode": "aux_head", "adapter": False},
    "ah_sa": {"mode": "aux_head", "adapter": True},
}
LOOPFM = "+loopfm"  # '<variant>+loopfm': that variant, reading LoopFM histories; 'loopfm' alone: vm_only's
VARIANTS = (*BASE_VARIANTS, "loopfm", f"kd_sa{LOOPFM}")
# The variant a tenant, `exfm run` and the experiment's guard use unless told otherwise: the
# serving head distills the Student Adapter's label (the FM mapped onto fresh labels), at full
# weight while the FM beats the base rate (fm_gate) and at half weight while it does not
# (fm_gate_floor), once the gate has 3 windows of record. Before that, a distrusted FM's labels,
# recalibrated on the labels so far (fm_gate_young_target), teach the backbone through a
# training-only head at half of w (fm_gate_young_aux), and the serving head distills the constant
# that beat them while the student does not beat it either (fm_gate_young_prior); both only while the
# young FM out-ranks the students across tenants on its first labeled window (fm_gate_young_z). Why not
# ah_sa: docs/results.md, "Rare positives and the default variant"; why the floor: "A floor under the FM
# gate"; the young FM: "The constant that beat the young FM", "The young FM's ranking, recalibrated" and
# "Judging the young FM across tenants".
DEFAULT_VARIANT = "kd_sa"
# Knob defaults a variant brings; the paper's variants keep DistillConfig's. Own knobs after '@'
# override them ('kd_sa@fm_gate=false').
VARIANT_KNOBS: dict[str, dict] = {
    "kd_sa": {
        "fm_gate": True,
        "fm_gate_floor": 0.5,
        "fm_gate_young_aux": 0.5,
        "fm_gate_young_target": "calibrated",
        "fm_gate_young_prior": 1.0,
        "fm_gate_young_z": 1.5,
    }
}


class StudentConfig(Config):
    size: int = Field(1, ge=1, le=6, description="Capacity dial: embedding dim 4 * 2**size, MLP [32*size, 16*size].")
    lr: float = Field(3e-3, gt=0, description="Adam learning rate of the dense layers (backbone and heads).")
    embedding_lr: float = Field(0.1, gt=0, description="Adagrad learning rate of the embedding tables.")
    batch_size: int = Field(128, gt=0, description="Training batch size.")
    base_rate_start: bool = Field(
        True, description="Every head's bias starts at the first window's positive rate (False: PyTorch's init)."
    )
    loopfm: LoopFMConfig = Field(
        default_factory=LoopFMConfig,
        description="The FM histories a LoopFM variant reads (entity keys, K, pooling); unused by other variants.",
    )

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
    adapter: bool = Field(
        True,
        description="Train a Student Adapter on fresh labels and distill its output: through a second aux head "
        "(aux_head mode) or as the serving head's distillation target (single_head mode).",
    )
    w: float = Field(1.0, ge=0, description="Loss weight of the FM distillation term.")
    beta: float = Field(1.0, ge=0, description="Gradient scale from aux head(s) into the backbone (GS).")
    alpha: float = Field(1.0, gt=0, description="Label scaling of the FM target: min(1, alpha * p_F) (LS).")
    w_sa: float = Field(1.0, ge=0, description="Loss weight of the adapted-label term L_sa.")
    w_serving: float = Field(
        0.0,
        ge=0,
        description="aux_head mode: weight of a distillation term on the serving head itself, toward the "
        "adapted label (the FM label without an adapter).",
    )
    sa_head: Literal["separate", "shared"] = Field(
        "separate", description="A second aux head for the SA target, or share the FM aux head."
    )
    sa_input: Literal["logit", "prob"] = Field("logit", description="Adapter input: FM logit or probability.")
    sa_hidden: int = Field(8, gt=0, description="Hidden width of the adapter MLP (1 -> h -> 1).")
    sa_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the adapter (its own optimizer).")
    sa_start: bool = Field(
        False,
        description="The adapter starts at the log-odds gap between the first FM-labeled window's positive rate "
        "and the FM's mean prediction there, shrunk by n_pos / (n_pos + sa_start_prior) (False: the identity).",
    )
    sa_start_prior: float = Field(
        20.0, ge=0, description="Positives' worth of trust in the identity when the adapter starts (sa_start)."
    )
    sa_order: Literal["before", "after"] = Field(
        "before",
        description="Algorithm 1 updates the adapter on a batch 'before' computing that batch's adapted label "
        "(the paper's order); 'after' labels the batch first, so the target never holds its own batch's labels.",
    )
    fm_gate: bool = Field(
        False,
        description="Distill only while the FM's labels beat a constant (within fm_gate_z standard errors): the "
        "tenant's positive rate before each window, by log loss pooled over this window and the 2 before it "
        "(labels the trainer has when it trains). "
        "Otherwise the student learns from labels alone, as on rows the FM could not label; the adapter keeps "
        "learning. On in the default variant kd_sa.",
    )
    fm_calibrate: bool | Literal["fallback"] = Field(
        False,
        description="Distill the FM's labels recalibrated: a * logit + b, a Platt fit on the labels of this window "
        "and the 2 before (labels the trainer has), shrunk towards the identity by fm_calibrate_prior. "
        "'fallback': only in windows where the FM as it is loses to the constant (the gate's judgement).",
    )
    fm_calibrate_prior: float = Field(
        5.0, ge=0, description="Nats per unit pulling the Platt fit (a, b) towards the FM as it is (1, 0)."
    )
    fm_gate_positives: float = Field(
        math.inf,
        ge=0,
        description="The gate pools the newest windows that together hold this many positives (up to 8 windows); "
        "inf: always this window and the 2 before it.",
    )
    fm_gate_z: float = Field(
        0.0,
        ge=0,
        description="The gate distrusts the FM only when its pooled log loss exceeds the constant's by more than "
        "this many standard errors of the difference, once it has 3 windows of record (0, the default: by any "
        "amount). With a handful of positives a window, losing by log loss is mostly noise while the FM's "
        "ranking still teaches; off by default (docs/results.md, 'The FM gate').",
    )
    fm_gate_floor: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of the FM terms' weights (w, w_sa, w_serving) kept in windows the FM gate distrusts: "
        "0 learns from labels alone there; 0.5 halves the distillation instead. Like fm_gate_z's margin, only once "
        "the gate has 3 windows of record (docs/results.md, 'A floor under the FM gate').",
    )
    fm_gate_young_aux: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of w at which, in a window the FM gate distrusts before it has 3 windows of record "
        "(where no floor applies), a training-only auxiliary head learns the FM's label (fm_gate_young_target), "
        "reaching the backbone through beta-scaled gradients; the serving head gets no FM term there. 0: the FM's "
        "labels are dropped in those windows. kd_sa: 0.5, recalibrated (1 puts frappe-rare's 6-window form above "
        "the student alone; the adapted label already at 0.15; docs/results.md, 'The young FM's ranking, "
        "recalibrated').",
    )
    fm_gate_young_prior: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of w at which, in those same windows, the serving head distills the tenant's constant "
        "rate (the kind of predictor that beat the FM's labels; its rows and positives so far, this window's "
        "included): label smoothing towards the prior while the FM is young and distrusted. 0: off. kd_sa: 1, "
        "at the FM's own weight (docs/results.md, 'The constant that beat the young FM').",
    )
    fm_gate_young_prior_when: Literal["always", "student_behind"] = Field(
        "student_behind",
        description="When fm_gate_young_prior applies: in every such window, or only while the student's own "
        "scores of its last 3 windows (before training on them) do not beat the constant's by log loss.",
    )
    fm_gate_young_z: float | None = Field(
        None,
        description="fm_gate_young_aux and fm_gate_young_prior apply only if, on the FM's first labeled window, the "
        "FM out-ranks the students (their scores before training on it) by more than this many standard errors "
        "of the AUC gap pooled over all tenants (exfm_ray/students/young_fm.py); the trainers pool it, a learner "
        "never told applies them. None ('none' in a variant's knobs): always. kd_sa: 1.5 (docs/results.md, "
        "'Judging the young FM across tenants').",
    )
    fm_gate_young_target: Literal["adapted", "calibrated"] = Field(
        "adapted",
        description="What fm_gate_young_aux's head learns: the (adapted) FM label, or the FM's label after a Platt "
        "fit on the labels of the FM's windows so far (its first one or two, while the head learns; shrunk towards "
        "the FM as it is by fm_calibrate_prior): "
        "its ranking, without the calibration the gate found wanting (a young FM's first labels can be far "
        "overconfident). kd_sa: calibrated.",
    )
    fm_gate_target: Literal["fm", "adapted", "calibrated"] = Field(
        "fm",
        description="What the FM gate judges: the FM's own label, the adapted label (as the adapter stands before "
        "the window) where there is an adapter, or the FM's label after the best Platt recalibration (its ranking).",
    )
    fm_gate_against: Literal["constant", "student"] = Field(
        "constant",
        description="What the FM gate's target must beat: the tenant's constant rate, or the student itself "
        "(its predictions on the window before training on it), by the log loss of the mix the distillation "
        "term pulls towards, (p_student + w * p_target) / (1 + w).",
    )
    loopfm: bool = Field(
        False,
        description="The student reads the FM's past embeddings of the row's entities as input features (LoopFM), "
        "from the representation store as of the window before. Variants 'loopfm' and '<variant>+loopfm'.",
    )
    mask_norm: Literal["mask", "batch"] = Field(
        "mask", description="Normalize masked distillation means by mask count or by batch size."
    )

    @field_validator("fm_gate_young_z", mode="before")
    @classmethod
    def _never(cls, v):
        # a knob on the command line ('kd_sa@fm_gate_young_z=none') arrives as a string
        return None if isinstance(v, str) and v.strip().lower() in ("none", "null") else v

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        if self.adapter and self.mode == "none":
            raise ValueError("adapter needs mode 'single_head' or 'aux_head' (a head must learn its label)")
        return self


def split_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'ah_sa@w=2,beta=0.5' -> ('ah_sa', {'w': '2', 'beta': '0.5'}): a named variant with its own knobs
    (how a knob grid names its arms)."""
    name, _, rest = spec.partition("@")
    knobs = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            from exfm_ray.errors import ConfigError

            raise ConfigError(f"variant {spec!r}: expected knob=value after '@', got {part!r}")
        knobs[key.strip()] = value.strip()
    return name, knobs


def split_variants(text: str) -> list[str]:
    """'vm_only,kd_sa@w=2,beta=0.5,ah' -> ['vm_only', 'kd_sa@w=2,beta=0.5', 'ah']: a comma-separated list
    where a part holding '=' but no '@' is one more knob of the variant before it."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part and out and "=" in part and "@" not in part:
            out[-1] += "," + part
        elif part:
            out.append(part)
    return out


def variant(name: str, **knobs: float | str) -> DistillConfig:
    """Named recipes of the experiment; knobs (w, beta, alpha, w_sa, sa_head, ...) apply where used.

    `name` may carry its own knobs after '@' ('ah_sa@w=2,beta=0.5'); they override `knobs`."""
    name, own = split_variant(name)
    loop = name == "loopfm" or name.endswith(LOOPFM)
    name = "vm_only" if name == "loopfm" else name.removesuffix(LOOPFM)
    if loop:
        own = {**own, "loopfm": True}
    if name not in BASE_VARIANTS:
        from exfm_ray.errors import ConfigError

        raise ConfigError(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
    return DistillConfig.parse(
        {**knobs, **VARIANT_KNOBS.get(name, {}), **own, **BASE_VARIANTS[name]}, source=f"variant {name}"
    )
