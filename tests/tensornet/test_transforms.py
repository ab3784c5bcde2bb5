"""The tt / kron / svd / asvd transforms on a model: sizes, budgets, allocation, composition."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.calib import Calibration, collect_input_stats
from jaxcomp.checkpoint import load_checkpoint, save_checkpoint
from jaxcomp.core import CompressedLeaf, chain, get_transform, tree_size
from jaxcomp.core.rules import leaves_by_path, replace_leaves
from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model
from jaxcomp.models.loading import load_model
from jaxcomp.pipeline import main
from jaxcomp.quant import QArray
from jaxcomp.tensornet import KronMatrix, LowRank, TTMatrix, non_embedding_params
from jaxcomp.tensornet.sensitivity import MatrixProfile, allocate

CALIB_TOKENS = np.random.default_rng(0).integers(3, 64, (6, 24))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def stats(tiny):
    return collect_input_stats(build_model(tiny.config), tiny.params, CALIB_TOKENS,
                               batch_size=4, progress=False)


def _forward(config, params, tokens):
    return jax.jit(lambda p, t: build_model(config).apply({"params": p}, t))(params, tokens)


def _materialized(params):
    return jax.tree_util.tree_map(
        lambda x: x.materialize() if isinstance(x, CompressedLeaf) else x, params,
        is_leaf=lambda x: isinstance(x, CompressedLeaf))


CASES = {
    "tt": ({"param_ratio": 0.5}, TTMatrix),
    "kron": ({"rank": 2, "permute_iters": 1}, KronMatrix),
    "svd": ({"rank": 8}, LowRank),
    "asvd": ({"param_ratio": 0.5}, LowRank),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_model_runs_on_factorized_leaves(tiny, stats, name):
    args, leaf_type = CASES[name]
    transform = get_transform(name)(**args)
    before = jax.tree_util.tree_map(np.array, tiny.params)
    out = transform(tiny.params, stats) if transform.needs_calibration else transform(tiny.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tiny.params, before)  # pure
    up = out["layers_1"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(up, leaf_type) and up.shape == (64, 96)
    assert isinstance(out["embed_tokens"]["embedding"], jax.Array)  # not targeted
    assert non_embedding_params(out) < non_embedding_params(tiny.params)
    tokens = jnp.asarray(np.arange(40).reshape(2, 20) % 64)
    got = _forward(tiny.config, out, tokens)
    want = _forward(tiny.config, _materialized(out), tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_asvd_without_statistics_is_refused(tiny):
    with pytest.raises(JaxcompError, match="needs calibration statistics"):
        get_transform("asvd")(rank=4)(tiny.params)


def test_tt_refinement_fits_each_layer_on_the_inputs_the_fitted_ones_produce(tiny, stats):
    """Block by block, and inside a block in forward order (q/k/v, o, gate/up, down): each
    kernel is refined on the inputs of the model whose earlier layers are already factorized.
    The reported errors are checked from the statistics of exactly that hybrid model."""
    from jaxcomp.models import LLAMA_LINEARS

    fits = []
    refined = get_transform("tt")(param_ratio=0.5, refine_steps=20,
                                  report_sink=lambda kind, v: fits.append((kind, v)))
    assert refined.needs_calibration == "blocks"
    with pytest.raises(JaxcompError, match="tt with refinement needs calibration data: call "
                                           r"it as transform\(params, Calibration"):
        refined(tiny.params)
    model = build_model(tiny.config)
    out = refined(tiny.params, Calibration(model, CALIB_TOKENS, batch_size=4, progress=False))
    plain = get_transform("tt")(param_ratio=0.5)(tiny.params)
    assert non_embedding_params(out) == non_embedding_params(plain)
    ((kind, log),) = fits
    assert kind == "fits" and len(log) == 14  # 7 kernels in each of the 2 layers
    orig, new = leaves_by_path(tiny.params), leaves_by_path(out)
    old = leaves_by_path(plain)
    for block in ("layers_0", "layers_1"):
        done: dict = {}  # this block's kernels fitted before the current group
        for group in LLAMA_LINEARS:
            hybrid = {**out, block: replace_leaves(tiny.params[block], done)}
            hybrid_stats = collect_input_stats(model, hybrid, CALIB_TOKENS, batch_size=4,
                                               progress=False)
            for p in group:
                path = f"{block}/{p}"
                before, after = log[path]["output_error"]
                st = hybrid_stats[path]
                assert st.output_error(orig[path], new[path].materialize()) == \
                    pytest.approx(after, rel=1e-3, abs=1e-6)
                assert st.output_error(orig[path], old[path].materialize()) == \
                    pytest.approx(before, rel=1e-3, abs=1e-6)
                assert after < before
                if block == "layers_1" or group is not LLAMA_LINEARS[0]:
                    # inputs changed by the fitted layers: not those of the original model
                    assert not np.allclose(st.gram, stats[path].gram, rtol=1e-3)
            done.update({p: new[f"{block}/{p}"] for p in group})


def test_tt_refinement_refuses_kernels_outside_the_blocks(tiny):
    refined = get_transform("tt")(param_ratio=0.5, refine_steps=5,
                                  targets=[r"lm_head|layers_0/mlp/up_proj/kernel"])
    model = build_model(tiny.config)
    params = {**tiny.params, "lm_head": {"kernel": tiny.params["embed_tokens"]["embedding"].T}}
    with pytest.raises(JaxcompError, match="lm_head/kernel: tt refinement fits the decoder "
                                           "blocks' kernels"):
        refined(params, Calibration(model, CALIB_TOKENS, progress=False))


@pytest.mark.parametrize("steps", [-1, 2.5, "abc", True])
def test_bad_refine_steps_are_refused_before_any_work(steps):
    with pytest.raises(JaxcompError, match="refine_steps must be a whole number >= 0"):
        get_transform("tt")(target_reduction=0.3, refine_steps=steps)
    with pytest.raises(JaxcompError, match="refine_steps must be a whole number >= 0"):
        get_transform("tt")(param_ratio=0.5, rules=[{"pattern": "q_proj",
                                                     "args": {"refine_steps": steps}}])


@pytest.mark.parametrize("name", ["tt", "svd", "asvd", "kron"])
def test_unknown_arguments_are_refused_when_the_transform_is_made(name):
    # a typo used to pass here and fail (TypeError) at the first fit, after loading the model
    with pytest.raises(JaxcompError, match=f"{name} does not take refine_step "):
        get_transform(name)(param_ratio=0.5, refine_step=5)
    with pytest.raises(JaxcompError, match=f"{name}: rule 'q_proj' sets rnk, which {name} does "
                                           "not take"):
        get_transform(name)(param_ratio=0.5, rules=[{"pattern": "q_proj",
                                                     "args": {"rnk": 4}}])
    knob = "max_bond_dim" if name == "tt" else "rank"
    get_transform(name)(param_ratio=0.5, rules=[{"pattern": "q_proj",
                                                 "args": {knob: 4, "param_ratio": 0.2}}])


@pytest.mark.parametrize("arg, needle", [
    ("stages.0.args.refine_steps=many", "refine_steps must be a whole number >= 0, got 'many'"),
    ("stages.0.args.refine_step=50", "tt does not take refine_step"),
])
def test_cli_bad_tt_argument_is_one_line_and_writes_nothing(tiny_llama_dir, tiny_text_file,
                                                            tmp_path, capsys, arg, needle):
    out = tmp_path / "bad"
    assert main(["recipe=smollm2_tt", f"model={tiny_llama_dir}",
                 f"eval.corpus=text:{tiny_text_file}", "eval.seq_len=32", arg,
                 f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".bad*"))


def test_the_profile_ranks_the_unrefined_fit(tiny, stats):
    """Refinement only runs on the allocated sizes: the profile and allocation are unchanged."""
    profiles = []
    sink = lambda kind, v: profiles.append(v) if kind == "profile" else None  # noqa: E731
    get_transform("tt")(target_reduction=0.3, allocation="output_error",
                        report_sink=sink)(tiny.params, stats)
    get_transform("tt")(target_reduction=0.3, allocation="output_error", report_sink=sink,
                        refine_steps=5)(tiny.params, Calibration(
                            build_model(tiny.config), CALIB_TOKENS, batch_size=4, progress=False))
    plain, refined = profiles
    assert refined.to_json() == plain.to_json()


@pytest.mark.parametrize("allocation", ["uniform", "weight_error", "output_error"])
def test_target_reduction_is_met(tiny, stats, allocation):
    base = non_embedding_params(tiny.params)
    profiles = []
    transform = get_transform("tt")(target_reduction=0.3, allocation=allocation,
                                    report_sink=lambda kind, v: profiles.append(v))
    out = transform(tiny.params, stats)
    reduction = 1 - non_embedding_params(out) / base
    assert 0.3 <= reduction < 0.45, reduction
    (profile,) = profiles
    assert profile.removed == base - non_embedding_params(out) >= profile.budget
    if allocation != "uniform":
        assert all(m.probe_error is not None for m in profile.matrices.values())


def test_allocator_beats_uniform_on_summed_error(tiny, stats):
    """Same budget: the allocator's summed squared output error is below the uniform split's."""
    def summed_error(params):
        flat = dict(jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, CompressedLeaf))[0])
        total = 0.0
        for keypath, leaf in flat.items():
            path = "/".join(k.key for k in keypath)
            if isinstance(leaf, CompressedLeaf):
                w = tiny.params
                for k in path.split("/"):
                    w = w[k]
                total += stats[path].output_error(w, leaf.materialize()) ** 2
        return total

    base = non_embedding_params(tiny.params)
    uniform = get_transform("svd")(target_reduction=0.3)(tiny.params)
    removed = 1 - non_embedding_params(uniform) / base  # a little over 0.3: sizes are discrete
    allocated = get_transform("svd")(target_reduction=removed, allocation="output_error")(
        tiny.params, stats)
    assert non_embedding_params(allocated) <= non_embedding_params(uniform)
    assert summed_error(allocated) < summed_error(uniform)


def test_allocate_matches_brute_force():
    rng = np.random.default_rng(0)
    mats = {}
    for i in range(4):
        sizes = np.sort(rng.choice(np.arange(10, 100), 3, replace=False))
        errs = np.sort(rng.uniform(0.05, 1.0, 3))[::-1]
        mats[f"m{i}"] = MatrixProfile((10, 10), [(int(k), int(s), float(e)) for k, (s, e)
                                                 in enumerate(zip(sizes, errs, strict=True))])
    options = {p: [(None, 100, 0.0)] + m.candidates for p, m in mats.items()}
    for budget in (50, 150, 250):
        got = allocate(mats, budget)
        chosen = [next(o for o in options[p] if o[0] == k) for p, k in got.items()]
        assert sum(100 - o[1] for o in chosen) >= budget
        best = min(sum(o[2] ** 2 for o in combo) for combo in itertools.product(*options.values())
                   if sum(100 - o[1] for o in combo) >= budget)
        assert sum(o[2] ** 2 for o in chosen) <= best * 1.25 + 1e-12


def test_impossible_budget_is_refused(tiny):
    with pytest.raises(JaxcompError, match="cannot be met"):
        get_transform("svd")(target_reduction=0.9, targets=[r"q_proj/kernel$"])(tiny.params)
    with pytest.raises(JaxcompError, match="target_reduction must be in"):
        get_transform("tt")(target_reduction=1.5)
    with pytest.raises(JaxcompError, match="not both"):
        get_transform("tt")(target_reduction=0.3, max_bond_dim=4)


def test_bad_sizes_name_the_parameter(tiny):
    with pytest.raises(JaxcompError, match="layers_0/mlp/down_proj/kernel: max_bond_dim must be"):
        get_transform("tt")(max_bond_dim=0)(tiny.params)
    with pytest.raises(JaxcompError, match="layers_0/input_layernorm/scale.*2-D"):
        get_transform("svd")(rank=2, targets=["input_layernorm"])(tiny.params)
    with pytest.raises(JaxcompError, match=r"in_factors \(3, 3\) multiply to 9"):
        get_transform("tt")(max_bond_dim=2, in_factors=[3, 3], out_factors=[8, 12],
                            targets=["up_proj/kernel$"])(tiny.params)
    with pytest.raises(JaxcompError, match="needs max_bond_dim, param_ratio or target_reduction"):
        get_transform("tt")()(tiny.params)


def test_quantized_cores_are_counted_and_run(tiny, tmp_path):
    compress = chain(get_transform("tt")(param_ratio=0.5),
                     get_transform("quantize")(bits=8, group_size=32))
    out = compress(tiny.params)
    up = out["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(up, TTMatrix) and all(isinstance(c, QArray) for c in up.cores)
    float_tt = get_transform("tt")(param_ratio=0.5)(tiny.params)["layers_0"]["mlp"]["up_proj"][
        "kernel"]
    assert up.num_params == float_tt.num_params + sum(
        c.scales.size + c.zeros.size for c in up.cores)
    assert up.nbytes == sum(c.nbytes for c in up.cores) < float_tt.nbytes / 3
    tokens = jnp.asarray(np.arange(20).reshape(2, 10) % 64)
    np.testing.assert_allclose(np.asarray(_forward(tiny.config, out, tokens)),
                               np.asarray(_forward(tiny.config, _materialized(out), tokens)),
                               rtol=1e-5, atol=1e-5)
    save_checkpoint(str(tmp_path / "ckpt"), out, tiny.config)
    back, _, _ = load_checkpoint(str(tmp_path / "ckpt"))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(out)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, out)
    assert tree_size(back) == tree_size(out)


def _tt_recipe_args(out, model, corpus, *extra):
    return ["recipe=smollm2_tt", f"model={model}", f"eval.corpus=text:{corpus}",
            f"calib.corpus=text:{corpus}", "eval.seq_len=32", "calib.seq_len=32",
            "calib.num_samples=4", "stages.0.args.refine_steps=5", "save_checkpoint=false",
            f"out_dir={out}", *extra]


def test_cli_default_tt_recipe_refines_every_kernel(tiny_llama_dir, tiny_text_file, tmp_path,
                                                    capsys):
    out = tmp_path / "tt"
    assert main(_tt_recipe_args(out, tiny_llama_dir, tiny_text_file, "heal.steps=0")) == 0
    report = json.loads((out / "report.json").read_text())
    # one ratio for all: no matrix left dense, every decoder kernel a TT fitted to its outputs
    summary = report["stages"]["stage0"]["sensitivity"]
    assert summary["metric"] == "uniform" and summary["matrices_left_dense"] == 0
    fits = report["stages"]["stage0"]["fits"]
    assert len(fits) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(0 <= e[1] < e[0] for e in (f["output_error"] for f in fits.values()))
    assert 0.6 <= report["non_embedding_reduction"] < 0.75
    assert "stage0: output error" in capsys.readouterr().out


def test_cli_tt_recipe_writes_profile(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "tt"
    code = main(_tt_recipe_args(out, tiny_llama_dir, tiny_text_file,
                                "stages.0.args.allocation=output_error"))
    assert code == 0
    assert "stage0: output error" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    summary = report["stages"]["stage0"]["sensitivity"]
    assert summary["removed_params"] >= summary["budget_params"]
    # int8 cores add their scales and zero points to the count: a little under 70% in the end
    assert report["non_embedding_reduction"] >= 0.6
    assert report["ppl_after"] > report["ppl_before"] * 0.5
    assert summary["metric"] == "output_error"
    for f in summary["files"]:
        assert os.path.getsize(out / f) > 0
    assert json.loads((out / summary["files"][0]).read_text())["matrices"]
    fits = report["stages"]["stage0"]["fits"]  # every allocated TT was refined
    assert fits and all(0 <= e[1] < e[0] for e in (f["output_error"] for f in fits.values()))


def test_cli_model_required_for_llama7b_recipe(capsys, tmp_path):
    assert main(["recipe=llama7b_tt", f"out_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model=" in err and "smollm2_tt" in err
    assert not (tmp_path / "x").exists()


def test_cli_kron_recipe_reports_permutation_errors(tiny_llama_dir, tiny_text_file, tmp_path):
    out = tmp_path / "kron"
    code = main(["recipe=smollm2_kron", f"model={tiny_llama_dir}",
                 f"eval.corpus=text:{tiny_text_file}", "eval.seq_len=32",
                 "stages.0.args.target_reduction=0.2", "save_checkpoint=false",
                 f"out_dir={out}"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    fits = report["stages"]["stage0"]["fits"]
    assert set(fits) == {f"layers_0/mlp/{n}_proj/kernel" for n in ("gate", "up", "down")}
    for info in fits.values():
        errors = info["rel_errors"]
        assert 0 < errors[-1] <= errors[0] < 1
        assert all(b <= a for a, b in zip(errors, errors[1:], strict=False))
    assert report["non_embedding_reduction"] >= 0.2
