"""Student (vertical model): small EBC over the tenant's features + MLP backbone + serving head,
plus training-only parts: auxiliary head(s) for the FM target and the Student Adapter.

Only `ebc`, `dense_proj`, `backbone`, `serving_head` (and the LoopFM tower `loop`, when the variant
reads FM histories) make the serving path (`ServingStudent`); the aux heads and the adapter never
leave training.
Shape letters: B batch, F tenant features, D embedding dim, Z backbone output width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.mlp import MLP

from exfm_ray.fm.model import pairwise_dots
from exfm_ray.loopfm.features import LoopTower
from exfm_ray.priors import prior_logit
from exfm_ray.schema import StreamSpec
from exfm_ray.students.config import DistillConfig, StudentConfig
from exfm_ray.students.guard import blend
from exfm_ray.students.losses import grad_scale

# LoopFM input: (histories [B, keys, K, Dfm], counts [B, keys]) for the tower, or the tower's
# output [B, keys, D] already looked up (Serve precomputes it per entity); None: all unseen.
History = tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None


class StudentAdapter(nn.Module):
    """Maps a stale FM prediction to a fresher logit (section 6): sa = f + MLP(x), x = f or p_F.

    The 1 -> h -> 1 MLP learns a correction on top of the FM logit f; its last layer starts at
    zero, so before the adapter has seen a label its target is the FM's own prediction rather
    than the noise of a random MLP.
    """

    def __init__(self, hidden: int, use_logit: bool):
        super().__init__()
        self.use_logit = use_logit
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @torch.no_grad()
    def start_at_offset(self, offset: float) -> None:
        """Start as f + offset: a constant log-odds correction of the FM (its last layer is 0)."""
        self.net[-1].bias.fill_(offset)

    def forward(self, fm_logit: torch.Tensor) -> torch.Tensor:
        x = fm_logit if self.use_logit else torch.sigmoid(fm_logit)
        return fm_logit + self.net(x.unsqueeze(1)).squeeze(1)


class ServingStudent(nn.Module):
    """The exported serving model: features -> probability. No aux head, no adapter, no FM."""

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        dense_proj: nn.Module,
        backbone: nn.Module,
        head: nn.Module,
        loop: LoopTower | None = None,
    ):
        super().__init__()
        self.ebc = ebc
        self.dense_proj = dense_proj
        self.backbone = backbone
        self.serving_head = head
        self.loop = loop
        self.feature_names = [n for c in ebc.embedding_bag_configs() for n in c.feature_names]

    def logit(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, history: History = None) -> torch.Tensor:
        return self.serving_head(_backbone(self, sparse, dense, history)).squeeze(1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, history: History = None) -> torch.Tensor:
        return torch.sigmoid(self.logit(sparse, dense, history))


@dataclass
class StudentOutput:
    """s: serving logit [B]; d: FM aux logit [B] or None; d2: SA aux logit [B] or None; young: the young
    FM's aux logit [B] or None (fm_gate_young_aux)."""

    s: torch.Tensor
    d: torch.Tensor | None
    d2: torch.Tensor | None
    young: torch.Tensor | None = None


class Student(nn.Module):
    """A tenant's student.

    Args:
        features: sparse features the tenant's student sees (in input order).
        cardinalities: table size per feature.
        multi_valued: features pooled by mean.
        num_dense: number of dense features.
        cfg: StudentConfig (size dial).
        distill: DistillConfig deciding which training-only parts exist.
    """

    def __init__(
        self,
        features: list[str],
        cardinalities: dict[str, int],
        multi_valued: set[str],
        num_dense: int,
        cfg: StudentConfig,
        distill: DistillConfig,
        fm_dim: int = 0,
    ):
        super().__init__()
        self.feature_names = list(features)
        self.num_dense = num_dense
        self.ebc, self.dense_proj, self.backbone, self.serving_head, self.loop = serving_parts(
            features, cardinalities, multi_valued, num_dense, cfg, fm_dim if distill.loopfm else 0
        )
        z = cfg.hidden[-1]
        self.distill = distill
        self.aux_fm = nn.Linear(z, 1) if distill.mode == "aux_head" else None
        separate = distill.adapter and distill.sa_head == "separate" and distill.mode == "aux_head"
        self.aux_sa = nn.Linear(z, 1) if separate else None
        self.adapter = StudentAdapter(distill.sa_hidden, distill.sa_input == "logit") if distill.adapter else None
        # Registered last, so a checkpoint from before this head lacks only the last dense parameters; drawn on a
        # forked RNG, so every other weight starts as without it (seed-for-seed comparable arms).
        self.aux_young = None
        if distill.fm_gate and distill.fm_gate_young_aux > 0 and distill.mode != "none":
            with torch.random.fork_rng():
                self.aux_young = nn.Linear(z, 1)

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, history: History = None) -> StudentOutput:
        z = _backbone(self, sparse, dense, history)  # [B, Z]
        s = self.serving_head(z).squeeze(1)
        d = d2 = None
        if self.aux_fm is not None:
            # Aux heads reach the backbone only through beta-scaled gradients; the serving
            # head never sees the FM target.
            zg = grad_scale(z, self.distill.beta)
            d = self.aux_fm(zg).squeeze(1)
            if self.adapter is not None:
                d2 = (self.aux_sa or self.aux_fm)(zg).squeeze(1)
        young = self.aux_young(grad_scale(z, self.distill.beta)).squeeze(1) if self.aux_young is not None else None
        return StudentOutput(s, d, d2, young)

    @torch.no_grad()
    def start_at_base_rate(self, rate: float) -> None:
        """Every head's bias at logit(rate), so a fresh student predicts about the base rate.

        Random heads start near 0.5 (NE 2 at 10% positives, 14 at 1%) and a rare-positive
        student spends its first windows walking the bias down. The weights stay random: zeroed
        head weights were tried and cost 5-10% NE on Frappe (docs/results.md).
        """
        for head in (self.serving_head, self.aux_fm, self.aux_sa, self.aux_young):
            if head is not None:
                head.bias.fill_(prior_logit(rate))

    def serving_model(self) -> ServingStudent:
        """The serving path only, sharing weights with this student."""
        return ServingStudent(self.ebc, self.dense_proj, self.backbone, self.serving_head, self.loop)

    def training_only_parameters(self) -> list[nn.Parameter]:
        parts = [m for m in (self.aux_fm, self.aux_sa, self.aux_young) if m is not None]
        return [p for m in parts for p in m.parameters()]


def constant_serving(student: Student, rate: float) -> ServingStudent:
    """A serving model with the student's inputs that answers `rate` for every row: the guard's
    base-rate fallback, loadable wherever the student is."""
    import copy

    model = copy.deepcopy(student.serving_model())
    with torch.no_grad():
        model.serving_head.weight.zero_()
        model.serving_head.bias.fill_(prior_logit(rate))
    return model


class BlendServing(nn.Module):
    """The guard's `blend`: the mean of the ExFM student's and its control twin's probabilities.

    Duck-types ServingStudent (feature_names, loop, forward): only the ExFM student may read LoopFM
    histories (`loop`), the twin never does.
    """

    def __init__(self, exfm: ServingStudent, control: ServingStudent):
        super().__init__()
        self.exfm = exfm
        self.control = control
        self.loop = exfm.loop
        self.feature_names = exfm.feature_names

    def forward(self, sparse: KeyedJaggedTensor, dense: torch.Tensor, history: History = None) -> torch.Tensor:
        return blend(self.exfm(sparse, dense, history), self.control(sparse, dense))


def serving_parts(
    features: list[str],
    cardinalities: dict[str, int],
    multi_valued: set[str],
    num_dense: int,
    cfg: StudentConfig,
    fm_dim: int = 0,
) -> tuple[EmbeddingBagCollection, nn.Linear, MLP, nn.Linear, LoopTower | None]:
    """The modules of the serving path, shared by Student (training) and ServingStudent (export).
    `fm_dim` > 0: the student reads LoopFM histories of that embedding size (cfg.loopfm)."""
    d = cfg.embedding_dim
    tables = [
        EmbeddingBagConfig(
            name=f"t_{f}",
            embedding_dim=d,
            num_embeddings=cardinalities[f],
            feature_names=[f],
            pooling=PoolingType.MEAN if f in multi_valued else PoolingType.SUM,
        )
        for f in features
    ]
    loop_keys = len(cfg.loopfm.store.keys) if fm_dim else 0
    num_vectors = len(features) + 1 + loop_keys
    # Creation order fixes the random init: keep ebc, dense_proj, backbone, head (the tower last).
    ebc = EmbeddingBagCollection(tables=tables)
    dense_proj = nn.Linear(max(num_dense, 1), d)
    backbone = MLP(num_vectors * d + num_vectors * (num_vectors - 1) // 2, cfg.hidden)
    head = nn.Linear(cfg.hidden[-1], 1)
    loop = LoopTower(loop_keys, fm_dim, d, cfg.loopfm.pooling) if fm_dim else None
    return ebc, dense_proj, backbone, head, loop


def _backbone(
    m: Student | ServingStudent, sparse: KeyedJaggedTensor, dense: torch.Tensor, history: History = None
) -> torch.Tensor:
    pooled = m.ebc(sparse)
    if dense.shape[1] == 0:
        dense = torch.zeros(dense.shape[0], 1, device=dense.device)
    vectors = [*(pooled[n] for n in m.feature_names), m.dense_proj(dense)]
    stacked = torch.stack(vectors, dim=1)  # [B, F+1, D]
    if m.loop is not None:
        if history is None:  # no store at hand: every entity reads as unseen
            b, keys, fm_dim = dense.shape[0], len(m.loop.proj), m.loop.proj[0].in_features
            history = (torch.zeros(b, keys, 1, fm_dim), torch.zeros(b, keys, dtype=torch.long))
        looped = history if isinstance(history, torch.Tensor) else m.loop(*history)
        stacked = torch.cat([stacked, looped], dim=1)  # [B, F+1+keys, D]
    return m.backbone(torch.cat([stacked.flatten(1), pairwise_dots(stacked)], dim=1))


def build_student(
    spec: StreamSpec, tenant: str, cfg: StudentConfig, distill: DistillConfig, fm_dim: int = 0
) -> Student:
    """`fm_dim`: the FM embedding size, needed by variants that read LoopFM histories."""
    t = spec.tenant(tenant)
    cards = {f.name: f.cardinality for f in spec.sparse}
    multi = {f.name for f in spec.sparse if f.multi_valued}
    if distill.loopfm and fm_dim <= 0:
        from exfm_ray.errors import ConfigError

        raise ConfigError(f"tenant {tenant!r}: a LoopFM variant needs the FM embedding size (fm_dim)")
    return Student(t.features, cards, multi, len(t.dense), cfg, distill, fm_dim)
