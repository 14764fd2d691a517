import pytest
import torch

from exfm_ray.data.batching import WindowTensors
from exfm_ray.data.synthetic import SyntheticConfig, SyntheticStream
from exfm_ray.fm.learner import FMLearner, head_logit
from exfm_ray.fm.model import FMConfig, build_fm, count_parameters
from exfm_ray.students.config import StudentConfig, variant
from exfm_ray.students.model import ServingStudent, build_student

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def stream():
    return SyntheticStream(SyntheticConfig(num_windows=3, rows_per_window=800, num_tenants=2)).stream()


def test_fm_outputs_one_logit_per_tenant_head_and_a_hidden_vector(stream):
    fm = build_fm(stream.spec, FMConfig(size=2))
    rows = WindowTensors(stream.windows[0], stream.spec)
    b = rows.batch(0, 10, fm.feature_names)
    out = fm(b.sparse, b.dense)
    assert out.logits.shape == (10, len(stream.spec.tenants))
    assert out.hidden.shape == (10, fm.hidden_dim)
    assert torch.isfinite(out.logits).all()


def test_fm_size_dial_grows_the_model_and_builds_on_meta(stream):
    sizes = [count_parameters(build_fm(stream.spec, FMConfig(size=s), device="meta")) for s in (1, 3, 6)]
    assert sizes[0] < sizes[1] < sizes[2]
    big = build_fm(stream.spec, FMConfig(size=6), device="meta")
    assert all(p.is_meta for p in big.parameters())


def test_fm_tables_are_sized_from_the_data(stream):
    fm = build_fm(stream.spec, FMConfig(size=1))
    rows = {c.feature_names[0]: c.num_embeddings for c in fm.ebc.embedding_bag_configs()}
    assert rows == {f.name: f.cardinality for f in stream.spec.sparse}


def test_fm_training_lowers_its_loss(stream):
    torch.manual_seed(0)
    cfg = FMConfig(size=2, epochs_per_window=3)
    learner = FMLearner(build_fm(stream.spec, cfg), cfg)
    rows = WindowTensors(stream.windows[0], stream.spec)
    first = learner.train_window(rows)
    for _ in range(3):
        last = learner.train_window(rows)
    assert last < first * 0.9
    logits, hidden = learner.predict(rows)
    assert logits.shape == (rows.num_rows, 2) and hidden.shape[0] == rows.num_rows


def test_head_logit_picks_the_row_tenant_head():
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert head_logit(logits, torch.tensor([1, 0, 1])).tolist() == [2.0, 3.0, 6.0]


@pytest.mark.parametrize("name", ["ah_sa", "kd_sa@fm_gate_young_aux=0.1"])  # the young FM's head (aux_young)
def test_serving_model_has_only_the_serving_path_and_same_prediction(stream, name):
    spec = stream.spec
    student = build_student(spec, "stories", StudentConfig(), variant(name))
    serving = student.serving_model()
    assert isinstance(serving, ServingStudent)
    names = {n for n, _ in serving.named_modules()}
    assert not any(n.startswith(("aux_", "adapter")) for n in names)
    heads = [m for m in (student.aux_fm, student.aux_sa, student.aux_young, student.adapter) if m is not None]
    assert len(heads) == (3 if name == "ah_sa" else 2)
    dropped = sum(p.numel() for m in heads for p in m.parameters())
    assert count_parameters(serving) == count_parameters(student) - dropped
    t = spec.tenant("stories")
    rows = WindowTensors(stream.tenant_rows(1, "stories"), spec)
    b = rows.batch(0, 16, t.features, t.dense)
    student.eval()
    assert torch.allclose(serving(b.sparse, b.dense), torch.sigmoid(student(b.sparse, b.dense).s))


def test_serving_graph_is_identical_with_and_without_distillation(stream):
    spec = stream.spec
    plain = build_student(spec, "feed", StudentConfig(), variant("vm_only")).serving_model()
    distilled = build_student(spec, "feed", StudentConfig(), variant("ah_sa")).serving_model()
    shapes = {n: p.shape for n, p in plain.named_parameters()}
    assert shapes == {n: p.shape for n, p in distilled.named_parameters()}


def test_student_is_smaller_than_the_fm(stream):
    fm = build_fm(stream.spec, FMConfig())
    student = build_student(stream.spec, "feed", StudentConfig(), variant("ah_sa"))
    assert count_parameters(student.serving_model()) * 3 < count_parameters(fm)


def test_student_checkpoint_round_trip_gives_the_same_probabilities(stream, tmp_path):
    from exfm_ray.students.checkpoint import load_serving, save_student
    from exfm_ray.students.meta import read_meta, student_meta

    spec = stream.spec
    cfg = StudentConfig()
    student = build_student(spec, "feed", cfg, variant("ah_sa"))
    meta = student_meta(spec, "feed", cfg, version="v1", window=2, fm_versions=["fm-3"])
    path = save_student(student, meta, tmp_path / "feed" / "v1")
    state = torch.load(path / "serving.pt", weights_only=True)
    assert not any(k.startswith(("aux_", "adapter")) for k in state)
    served, meta2 = load_serving(path)
    assert meta2 == meta and read_meta(path).schema_hash() == meta.schema_hash()
    t = spec.tenant("feed")
    rows = WindowTensors(stream.tenant_rows(2, "feed"), spec)
    b = rows.batch(0, 32, t.features, t.dense)
    student.eval()
    assert torch.allclose(served(b.sparse, b.dense), torch.sigmoid(student(b.sparse, b.dense).s))


def test_a_loopfm_student_checkpoint_loads_back_with_its_tower(stream, tmp_path):
    """The checkpoint records the histories' size (meta.fm_dim), so serving rebuilds the LoopFM
    tower: same probabilities with histories, and with none (every entity unseen)."""
    from exfm_ray.students.checkpoint import load_serving, save_student
    from exfm_ray.students.meta import student_meta

    spec, cfg, fm_dim = stream.spec, StudentConfig(), 6
    torch.manual_seed(0)
    student = build_student(spec, "feed", cfg, variant("loopfm"), fm_dim=fm_dim)
    with torch.no_grad():  # the tower starts at zero: give it weights that show in the output
        for p in student.loop.parameters():
            p.normal_()
    path = save_student(student, student_meta(spec, "feed", cfg, version="v1", window=2), tmp_path / "v1")
    served, meta = load_serving(path)
    assert meta.fm_dim == fm_dim and served.loop is not None
    t = spec.tenant("feed")
    b = WindowTensors(stream.tenant_rows(2, "feed"), spec).batch(0, 32, t.features, t.dense)
    keys = len(cfg.loopfm.store.keys)
    history = (torch.randn(32, keys, 3, fm_dim), torch.randint(0, 4, (32, keys)))
    student.eval()
    for h in (history, None):
        assert torch.allclose(served(b.sparse, b.dense, h), torch.sigmoid(student(b.sparse, b.dense, h).s))
    assert not torch.allclose(served(b.sparse, b.dense, history), served(b.sparse, b.dense))


def test_student_store_publishes_atomically_and_serves_the_latest(stream, tmp_path):
    from exfm_ray.errors import ConfigError
    from exfm_ray.students.meta import student_meta
    from exfm_ray.students.store import StudentStore

    spec, cfg = stream.spec, StudentConfig()
    store = StudentStore(tmp_path)
    assert store.tenants() == [] and store.latest("feed") is None
    a = build_student(spec, "feed", cfg, variant("vm_only"))
    b = build_student(spec, "feed", cfg, variant("vm_only"))
    store.publish(a, student_meta(spec, "feed", cfg, version="w0001", window=1))
    store.publish(b, student_meta(spec, "feed", cfg, version="w0002", window=2))
    assert store.tenants() == ["feed"] and store.latest("feed").version == "w0002"
    served, meta = store.load_latest("feed")
    assert meta.window == 2
    assert all(torch.equal(served.state_dict()[k], v) for k, v in b.serving_model().state_dict().items())
    with pytest.raises(ConfigError, match="tenant"):
        store.publish(a, student_meta(spec, "feed", cfg, version="v1", window=1).replace(tenant="../evil"))


def test_fm_built_on_meta_and_materialized_gets_finite_weights_from_reset(stream):
    fm = build_fm(stream.spec, FMConfig(size=1), device="meta")
    fm.to_empty(device="cpu")  # what sharding does to dense meta weights: uninitialized memory
    torch.manual_seed(0)
    fm.reset_dense_parameters()
    for w in fm.cross.W_kernels:
        assert torch.isfinite(w).all() and 0.01 < w.std() < 1.0
    assert all(torch.count_nonzero(b) == 0 for b in fm.cross.bias)
    assert torch.isfinite(fm.heads.weight).all()


def test_a_blend_checkpoint_serves_the_mean_of_both_students(stream, tmp_path):
    """The guard's blend: a LoopFM ExFM student and its twin (no tower) in one checkpoint; it loads
    back to the mean of their probabilities, the histories reaching only the ExFM student."""
    from exfm_ray.students.checkpoint import load_serving, save_student
    from exfm_ray.students.meta import student_meta
    from exfm_ray.students.model import BlendServing

    spec, cfg, fm_dim = stream.spec, StudentConfig(), 6
    torch.manual_seed(0)
    exfm = build_student(spec, "feed", cfg, variant("kd_sa+loopfm"), fm_dim=fm_dim)
    with torch.no_grad():
        for p in exfm.loop.parameters():
            p.normal_()
    twin = build_student(spec, "feed", cfg, variant("vm_only"))
    blend = BlendServing(exfm.serving_model(), twin.serving_model())
    meta = student_meta(spec, "feed", cfg, version="v1", window=2, served="blend")
    served, meta2 = load_serving(save_student(blend, meta, tmp_path / "v1"))
    assert isinstance(served, BlendServing) and meta2.fm_dim == fm_dim and served.control.loop is None
    t = spec.tenant("feed")
    b = WindowTensors(stream.tenant_rows(2, "feed"), spec).batch(0, 32, t.features, t.dense)
    keys = len(cfg.loopfm.store.keys)
    history = (torch.randn(32, keys, 3, fm_dim), torch.randint(0, 4, (32, keys)))
    exfm.eval(), twin.eval()
    mean = 0.5 * (torch.sigmoid(exfm(b.sparse, b.dense, history).s) + torch.sigmoid(twin(b.sparse, b.dense).s))
    torch.testing.assert_close(served(b.sparse, b.dense, history), mean)
    assert not torch.allclose(mean, torch.sigmoid(exfm(b.sparse, b.dense, history).s))
