"""The loss-based sensitivity: the diagonal Fisher and the ``fisher`` allocation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.calib import Calibration, fisher_diagonal
from jaxcomp.core import get_transform
from jaxcomp.core.rules import replace_leaves
from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model
from jaxcomp.models.loading import load_model
from jaxcomp.tensornet import non_embedding_params
from jaxcomp.tensornet.sensitivity import profile_and_allocate
from jaxcomp.tensornet.transform import METHODS

WINDOWS = np.random.default_rng(0).integers(3, 64, (4, 20))
PATH = "layers_1/mlp/down_proj/kernel"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def test_fisher_diagonal_is_the_mean_squared_gradient_of_each_windows_loss(tiny):
    # checked entry by entry against forward-mode derivatives (jvp along one weight) of each
    # window's mean cross-entropy, at the entries with the largest Fisher and a random one
    model = build_model(tiny.config)
    fisher = fisher_diagonal(model, tiny.params, WINDOWS, [PATH], progress=False)[PATH]
    w = tiny.params["layers_1"]["mlp"]["down_proj"]["kernel"]

    def window_loss(kernel, tokens):
        p = replace_leaves(tiny.params, {PATH: kernel})
        logp = jax.nn.log_softmax(model.apply({"params": p}, tokens[None, :-1]), -1)
        return -jnp.take_along_axis(logp, tokens[None, 1:, None], -1).mean()

    top = np.unravel_index(np.argsort(fisher, axis=None)[-2:], fisher.shape)
    for i, j in [*zip(*top, strict=True), (5, 7)]:
        unit = jnp.zeros_like(w).at[i, j].set(1.0)
        grads = [float(jax.jvp(lambda k, t=t: window_loss(k, t), (w,), (unit,))[1])
                 for t in jnp.asarray(WINDOWS)]
        assert fisher[i, j] == pytest.approx(np.mean(np.square(grads)), rel=1e-4)
    assert fisher.shape == w.shape and fisher.dtype == np.float32 and (fisher >= 0).all()


def test_the_fisher_allocation_keeps_what_the_loss_cares_about():
    # two equal matrices; the loss is 100x more sensitive to the first: the weight-error
    # allocation splits the cut evenly, the Fisher allocation cuts the second more
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    mats = {"a/kernel": w, "b/kernel": w.copy()}
    fisher = {"a/kernel": np.full(w.shape, 100.0, np.float32),
              "b/kernel": np.ones(w.shape, np.float32)}
    args = {p: {"num_cores": 2} for p in mats}
    budget = int(0.8 * w.size)
    by_weight = profile_and_allocate(METHODS["tt"], mats, args, budget, "weight_error", 0.3)
    by_fisher = profile_and_allocate(METHODS["tt"], mats, args, budget, "fisher", 0.3,
                                     fisher=fisher)
    def kept(profile, p):
        knob, m = profile.allocation[p], profile.matrices[p]
        return m.dense_params if knob is None else next(c[1] for c in m.candidates
                                                        if c[0] == knob)

    assert kept(by_weight, "a/kernel") == kept(by_weight, "b/kernel")
    assert kept(by_fisher, "a/kernel") > kept(by_fisher, "b/kernel")
    assert by_fisher.removed >= budget
    # the error is the Fisher-weighted norm: 10x for the same fit under a 100x Fisher
    a, b = (by_fisher.matrices[p].probe_error for p in ("a/kernel", "b/kernel"))
    assert a == pytest.approx(10 * b, rel=1e-6)
    with pytest.raises(JaxcompError, match="no Fisher diagonal"):
        profile_and_allocate(METHODS["tt"], mats, args, budget, "fisher", 0.3)


def test_the_fisher_allocation_meets_the_target_on_a_model(tiny):
    model = build_model(tiny.config)
    profiles = []
    transform = get_transform("tt")(target_reduction=0.3, allocation="fisher",
                                    report_sink=lambda kind, v: profiles.append(v))
    assert transform.needs_calibration == "blocks"  # it is handed the model and windows
    with pytest.raises(JaxcompError, match="allocation=fisher needs calibration data"):
        transform(tiny.params)
    out = transform(tiny.params, Calibration(model, WINDOWS, 2, progress=False))
    base = non_embedding_params(tiny.params)
    assert 0.3 <= 1 - non_embedding_params(out) / base < 0.45
    (profile,) = profiles
    assert profile.metric == "fisher" and profile.removed >= profile.budget
    assert all(m.probe_error is not None and m.probe_error >= 0
               for m in profile.matrices.values())


def test_an_unknown_allocation_names_the_choices():
    with pytest.raises(JaxcompError, match="uniform, weight_error, output_error, fisher"):
        get_transform("tt")(target_reduction=0.3, allocation="loss")
