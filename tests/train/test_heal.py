"""QAT leaves, the trainable split, data order, losses, sharding rules and the heal loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcomp.core import chain, get_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model
from jaxcomp.models.loading import load_model
from jaxcomp.parallel import make_mesh, partition_specs
from jaxcomp.quant import QArray, int4, int_format, nf4, quantize_array
from jaxcomp.quant.qat import QATArray, finalize_qat, prepare_qat, to_qat
from jaxcomp.tensornet import KronMatrix, TTMatrix
from jaxcomp.train import (
    HealConfig,
    MeshConfig,
    TokenBatches,
    distill_loss,
    heal,
    trainable_partition,
)
from jaxcomp.train.heal import make_optimizer

FORMATS = [int4(16), int_format(4, 16, symmetric=True), int_format(2, 16), nf4(16),
           int_format(8, "channel", symmetric=True)]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("lsq", [False, True])
def test_qat_forward_is_the_packed_result(fmt, lsq):
    w = jax.random.normal(jax.random.key(0), (40, 24)) * 0.1  # 40 rows: a short last group
    q = to_qat(quantize_array(w, fmt), lsq, master=w)
    if lsq:  # move the master weights and scales off the RTN grid
        q = QATArray(q.w * 1.03, q.scales * 0.9, q.zeros, q.fmt)
    np.testing.assert_allclose(q.materialize(), q.to_qarray().materialize(), atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS[:4], ids=lambda f: f.name)
def test_qat_from_originals_starts_at_rtn(fmt):
    w = jax.random.normal(jax.random.key(1), (48, 16))
    params = {"a": {"kernel": quantize_array(w, fmt)}, "b": jnp.ones(3)}
    qat = prepare_qat(params, originals={"a": {"kernel": w}, "b": jnp.ones(3)})
    assert isinstance(qat["a"]["kernel"], QATArray)
    np.testing.assert_array_equal(qat["a"]["kernel"].w, w)  # master = the float weights
    np.testing.assert_allclose(qat["a"]["kernel"].materialize(),
                               params["a"]["kernel"].materialize(), atol=1e-6)
    back = finalize_qat(qat)["a"]["kernel"]
    assert isinstance(back, QArray)
    np.testing.assert_array_equal(back.packed, params["a"]["kernel"].packed)


def test_ste_gradient_and_lsq_scale_gradient():
    fmt = int_format(4, 8, symmetric=True)
    w = jnp.linspace(-1.2, 1.0, 16).reshape(8, 2)
    q = to_qat(quantize_array(w, fmt), lsq=True, master=w)
    scales = q.scales * 0.5  # some weights now fall outside the range: clipped
    g_w, g_s = jax.grad(lambda w, s: QATArray(w, s, None, fmt).materialize().sum(),
                        argnums=(0, 1))(w, scales)
    s = np.asarray(scales.astype(jnp.bfloat16).astype(jnp.float32))[0]
    u = np.asarray(w) / s
    inside = (u >= -8) & (u <= 7)
    np.testing.assert_array_equal(g_w, inside.astype(np.float32))  # STE inside, 0 outside
    # LSQ: d(w_hat)/ds = round(u) - u inside, the clipping bound outside; times 1/sqrt(8 * 8).
    expect = np.where(inside, np.round(np.clip(u, -8, 7)) - u, np.clip(u, -8, 7)).sum(0)
    np.testing.assert_allclose(g_s[0], expect / np.sqrt(8 * 8), rtol=1e-5)
    # Without LSQ the scales follow w and only w gets a gradient.
    g = jax.grad(lambda w: QATArray(w, None, None, fmt).materialize().sum())(w)
    np.testing.assert_array_equal(g, jnp.ones_like(w))


def _tree():
    w = jax.random.normal(jax.random.key(2), (16, 24))
    tt = get_transform("tt")(param_ratio=0.6, targets=[r"."], progress=False)({"k": w})["k"]
    kron = get_transform("kron")(param_ratio=0.6, permute_iters=1, targets=[r"."],
                                   progress=False)({"k": w})["k"]
    tt_q = get_transform("quantize")(bits=8, group_size=8, progress=False,
                                     targets=[r"."])({"k": tt})["k"]
    return {"tt": {"kernel": tt}, "kron": {"kernel": kron}, "q": {"kernel": quantize_array(w,
            int4(16))}, "ttq": {"kernel": tt_q}, "dense": {"kernel": w}, "norm": jnp.ones(24)}


def test_trainable_partition_selects_float_factors_only():
    tree = _tree()
    assert isinstance(tree["tt"]["kernel"], TTMatrix)
    assert isinstance(tree["kron"]["kernel"], KronMatrix)
    part = trainable_partition(tree)
    train, frozen = part.split(tree)
    n_cores = len(tree["tt"]["kernel"].cores)
    kron_float = [x for x in jax.tree_util.tree_leaves(tree["kron"]["kernel"])
                  if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(train) == n_cores + len(kron_float)  # no QArray field, no dense, no perms
    assert all("['dense']" not in p and "['norm']" not in p for p in train)
    assert all(jnp.issubdtype(v.dtype, jnp.floating) for v in train.values())
    merged = part.merge(train, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(tree)
    # QAT turns the packed leaves (also TT cores quantized to int8) into trainable weights.
    qat = prepare_qat(tree)
    train_qat, _ = trainable_partition(qat).split(qat)
    assert len(train_qat) == len(train) + 1 + n_cores
    # Rules: only the TT leaf; plain arrays when a target names them (ordinary fine-tuning).
    only_tt, _ = trainable_partition(tree, targets=[r"^tt/"]).split(tree)
    assert len(only_tt) == n_cores
    with_norm, _ = trainable_partition(tree, targets=[r"^tt/", r"^norm$"]).split(tree)
    assert len(with_norm) == n_cores + 1
    with pytest.raises(JaxcompError, match="nothing to train"):
        trainable_partition({"dense": {"kernel": jnp.ones((4, 4))}})
    # A misspelt pattern warns, whether it targets or ignores.
    with pytest.warns(UserWarning, match=re.escape("heal.ignore: '^kron_typo/' matched no")):
        trainable_partition(tree, ignore=[r"^kron_typo/"])
    with pytest.warns(UserWarning, match=re.escape("heal.targets: '^nrom$' matched no")):
        trainable_partition(tree, targets=[r"^tt/", r"^nrom$"])


def test_frozen_params_have_no_optimizer_state():
    tree = _tree()
    train, frozen = trainable_partition(tree).split(tree)
    state = make_optimizer(HealConfig(steps=10)).init(train)
    n_state = sum(x.size for x in jax.tree_util.tree_leaves(state))
    n_train = sum(x.size for x in train.values())
    assert n_state == 2 * n_train + 2  # Adam's two moments, its step count, the schedule's


def test_token_batches_are_deterministic_epochs():
    tokens = np.arange(10 * 9)  # 10 windows of 8 + 1
    b = TokenBatches(tokens, seq_len=8, batch_size=2, grad_accum=1, seed=3)
    assert b.batch(7).shape == (1, 2, 9)
    np.testing.assert_array_equal(b.batch(7), TokenBatches(tokens, 8, 2, 1, 3).batch(7))
    first_epoch = np.concatenate([b.batch(s)[0, :, 0] // 9 for s in range(5)])
    assert sorted(first_epoch) == list(range(10))  # every window once per epoch
    assert not np.array_equal(b.batch(0), TokenBatches(tokens, 8, 2, 1, 4).batch(0))
    with pytest.raises(JaxcompError, match="fewer than heal.batch_size"):
        TokenBatches(tokens, seq_len=8, batch_size=6, grad_accum=2)


def test_distill_loss_terms():
    cfg = HealConfig(kd_temperature=2.0, kd_weight=1.0, ce_weight=0.5, hidden_mse_weight=2.0)
    t = jax.random.normal(jax.random.key(3), (2, 5, 11))
    labels = jnp.zeros((2, 5), jnp.int32)
    h = [jnp.ones((2, 5, 4))]
    total, m = distill_loss(t, t, labels, h, h, cfg)
    assert float(m["kd"]) == pytest.approx(0.0, abs=1e-6)
    assert float(m["hidden_mse"]) == 0.0
    s = t + jax.random.normal(jax.random.key(4), t.shape)
    _, m2 = distill_loss(s, t, labels, [h[0] * 2], h, cfg)
    pt, ps = jax.nn.softmax(t / 2), jax.nn.log_softmax(s / 2)
    kl = (pt * (jnp.log(pt) - ps)).sum(-1).mean() * 4
    assert float(m2["kd"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(m2["hidden_mse"]) == pytest.approx(1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(s, labels).mean()
    assert float(m2["loss"]) == pytest.approx(float(kl + 0.5 * ce + 2.0), rel=1e-5)


def test_partition_rules_and_mesh_errors():
    mesh = make_mesh(data=1, fsdp=1, tensor=1)
    arrays = {"['a']['kernel']": jnp.ones((8, 6)), "['b']": jnp.ones(5)}
    specs = partition_specs(arrays, mesh, [[r"\['a'\]", ["fsdp", None]]])
    assert tuple(specs["['a']['kernel']"]) == ("fsdp", None)
    assert tuple(specs["['b']"]) == (None,)
    with pytest.raises(JaxcompError, match="unknown mesh axis"):
        partition_specs(arrays, mesh, [[r"a", ["model", None]]])
    with pytest.raises(JaxcompError, match="has 1 entries"):
        partition_specs(arrays, mesh, [[r"a", ["fsdp"]]])
    with pytest.raises(JaxcompError, match="'\\(' is not a valid regex"):
        partition_specs(arrays, mesh, [[r"(", [None, None]]])
    with pytest.raises(JaxcompError, match="entries are \\[regex, \\[axis or null"):
        partition_specs(arrays, mesh, [[r"a", "fsdp"]])
    with pytest.raises(JaxcompError, match="devices"):
        make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(JaxcompError, match="at most one -1"):
        make_mesh(data=-1, fsdp=-1)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def test_heal_lowers_the_distillation_loss_and_returns_packed_leaves(tiny):
    teacher = jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, tiny.params)  # sharper
    student = chain(get_transform("tt")(param_ratio=0.4, targets=[r"mlp/.*kernel$"],
                                        progress=False),
                    get_transform("quantize")(bits=3, group_size=16, progress=False,
                                              targets=[r"self_attn/.*kernel$"]))(teacher)
    tokens = np.random.default_rng(0).integers(3, 64, 4 * 33)  # one batch: the same each step
    cfg = HealConfig(steps=25, lr=3e-3, warmup_steps=2, batch_size=4, seq_len=32)
    result = heal(build_model(tiny.config), student, teacher, tokens, cfg)
    kd = [m["kd"] for _, m in result.losses]
    assert kd[-1] < 0.5 * kd[0], kd  # measured: 0.136 -> 0.041
    assert isinstance(result.params["layers_0"]["self_attn"]["q_proj"]["kernel"], QArray)
    assert isinstance(result.params["layers_0"]["mlp"]["up_proj"]["kernel"], TTMatrix)
    np.testing.assert_array_equal(result.params["embed_tokens"]["embedding"],
                                  teacher["embed_tokens"]["embedding"])  # frozen
    with pytest.raises(JaxcompError, match="2 but there are 1 devices"):
        heal(build_model(tiny.config), student, teacher, tokens,
             HealConfig(steps=1, batch_size=4, seq_len=32, mesh=MeshConfig(data=2)))
    with pytest.warns(UserWarning, match="heal.mesh.rules: 'emb_tokens' matched no array"):
        heal(build_model(tiny.config), student, teacher, tokens,
             HealConfig(steps=1, batch_size=4, seq_len=32,
                        mesh=MeshConfig(rules=[["emb_tokens", [None, None]]])))


def _tiny_student(tiny):
    teacher = jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, tiny.params)
    student = get_transform("tt")(param_ratio=0.5, progress=False)(teacher)
    return teacher, student


def test_grad_accumulation_equals_the_large_batch(tiny):
    teacher, student = _tiny_student(tiny)
    tokens = np.random.default_rng(1).integers(3, 64, 40 * 17)
    model = build_model(tiny.config)
    base = dict(steps=3, lr=3e-3, warmup_steps=1, seq_len=16, ce_weight=0.5)
    big = heal(model, student, teacher, tokens, HealConfig(batch_size=8, **base))
    accum = heal(model, student, teacher, tokens, HealConfig(batch_size=4, grad_accum=2,
                                                             **base))
    np.testing.assert_allclose([m["loss"] for _, m in accum.losses],
                               [m["loss"] for _, m in big.losses], rtol=1e-5)


def test_bfloat16_compute_keeps_float32_master_weights(tiny):
    teacher, student = _tiny_student(tiny)
    tokens = np.random.default_rng(1).integers(3, 64, 40 * 17)
    cfg = HealConfig(steps=2, lr=3e-3, warmup_steps=1, batch_size=4, seq_len=16)
    f32 = heal(build_model(tiny.config), student, teacher, tokens, cfg)
    bf16 = heal(build_model(tiny.config, dtype=jnp.bfloat16), student, teacher, tokens, cfg)
    core = bf16.params["layers_0"]["mlp"]["up_proj"]["kernel"].cores[0]
    assert core.dtype == jnp.float32
    assert bf16.losses[0][1]["loss"] == pytest.approx(f32.losses[0][1]["loss"], rel=0.1)


def test_remat_gives_the_same_training(tiny):
    teacher, student = _tiny_student(tiny)
    tokens = np.random.default_rng(1).integers(3, 64, 40 * 17)
    cfg = HealConfig(steps=2, lr=3e-3, warmup_steps=1, batch_size=4, seq_len=16,
                     hidden_mse_weight=1.0)
    plain = heal(build_model(tiny.config), student, teacher, tokens, cfg)
    remat = heal(build_model(tiny.config, remat=True), student, teacher, tokens, cfg)
    assert plain.losses[0][1]["hidden_mse"] > 0  # block outputs are captured under remat too
    np.testing.assert_allclose([m["loss"] for _, m in remat.losses],
                               [m["loss"] for _, m in plain.losses], rtol=1e-5)
