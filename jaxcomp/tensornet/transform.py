"""The factorization transforms ``tt``, ``kron``, ``svd``, ``asvd``: wiring the math into pytrees.

Each method turns a rule-selected ``(m, n)`` kernel into a compressed leaf whose size is set by
one integer knob (TT bond dimension, Kronecker rank, SVD rank). The size is given per matrix
(the knob itself or ``param_ratio``), or for the whole model: ``target_reduction`` removes that
fraction of the model's non-embedding parameters, split over the selected matrices either
uniformly or by a budget allocator that minimizes the summed sensitivity
(:mod:`jaxcomp.tensornet.sensitivity`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import (
    Rule,
    check_rule_args,
    is_leaf,
    leaves_by_path,
    make_rules,
    path_str,
    replace_leaves,
    require_matrix,
    select,
)
from jaxcomp.core.transform import leaf_transform, register_transform, tree_size
from jaxcomp.errors import JaxcompError
from jaxcomp.tensornet import kron as kron_math
from jaxcomp.tensornet import lowrank, tt

DEFAULT_TARGETS = (r"^(layers|h)_\d+/.*kernel$",)
ALLOCATIONS = ("uniform", "weight_error", "output_error", "fisher")
# Parameters that are not counted as "non-embedding" (TQCompressor's and CompactifAI's unit).
EMBEDDING_PATTERN = r"(^|/)(embed_tokens|wte|wpe|lm_head)(/|$)"


@dataclasses.dataclass(frozen=True)
class Method:
    """One factorization: its size knob and how to fit / count it.

    Attributes:
      name: transform name.
      knob: the argument that sets the size (``max_bond_dim`` or ``rank``).
      fit: ``fit(w, knob_value, stats, name, **opts) -> (CompressedLeaf, info dict)``.
      params: ``params(shape, knob_value, **opts) -> int`` scalars stored.
      knob_range: ``knob_range(shape, **opts) -> (smallest, largest)``.
      options: the method's other arguments (what ``fit``, ``params`` and ``knob_range``
        accept besides the knob).
      needs_stats: fitting uses calibration statistics.
      refine_option: the option giving a number of steps that refine the final fit from
        calibration statistics: set, it needs statistics, and the sensitivity profile leaves it
        out (it ranks the matrices by the unrefined fit, many times cheaper to try at every
        candidate size).
    """

    name: str
    knob: str
    fit: Callable
    params: Callable
    knob_range: Callable
    options: tuple[str, ...] = ()
    needs_stats: bool = False
    refine_option: str | None = None

    def knob_for_params(self, shape, target: int, name: str = "", **opts) -> int:
        """The largest knob value whose leaf stores at most ``target`` scalars."""
        lo, hi = self.knob_range(shape, **opts)
        if self.params(shape, lo, **opts) > target:
            raise JaxcompError(f"{name or 'matrix'}: a target of {target:,} parameters cannot be "
                               f"met: {self.knob}={lo} already needs "
                               f"{self.params(shape, lo, **opts):,}")
        while lo < hi:  # params is non-decreasing in the knob
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.params(shape, mid, **opts) <= target else (lo, mid - 1)
        return lo


# --- the four methods ----------------------------------------------------------------------

def _tt_factors(shape, num_cores=3, in_factors=None, out_factors=None, name=""):
    fin = tuple(in_factors) if in_factors else tt.balanced_factors(shape[0], num_cores)
    fout = tuple(out_factors) if out_factors else tt.balanced_factors(shape[1], num_cores)
    tt.check_factorization(shape, fin, fout, name)
    return fin, fout


def _tt_fit(w, chi, stats, name, rel_error=None, refine_steps=0, **opts):
    fin, fout = _tt_factors(w.shape, name=name, **opts)
    leaf = tt.tt_matrix(w, fin, fout, max_bond_dim=chi, rel_error=rel_error, name=name)
    if not refine_steps:
        return leaf, {}
    if stats is None:
        raise JaxcompError(f"{name}: tt with refine_steps needs calibration statistics for "
                           "this layer (not a Linear kernel?)")
    cores, before, after = tt.refine_to_outputs(leaf.cores, w, stats.gram, refine_steps, name)
    leaf = leaf.replace(cores=tuple(jnp.asarray(c, leaf.dtype) for c in cores))
    # relative output error of the TT-SVD fit, then after refinement
    return leaf, {"output_error": [round(before, 6), round(after, 6)]}


def _tt_params(shape, chi, rel_error=None, refine_steps=0, **opts):
    fin, fout = _tt_factors(shape, **opts)
    return tt.tt_num_params(fin, fout, tt.tt_ranks(fin, fout, chi))


def _tt_range(shape, rel_error=None, refine_steps=0, **opts):
    return 1, max(tt.max_ranks(*_tt_factors(shape, **opts)), default=1)


def _svd_fit(w, rank, stats, name, alpha=0.5):
    return lowrank.low_rank(w, rank, name=name), {}


def _asvd_fit(w, rank, stats, name, alpha=0.5):
    if stats is None:
        raise JaxcompError(f"{name}: asvd needs calibration statistics for this layer")
    scales = np.maximum(stats.channel_rms(), 1e-12) ** alpha
    return lowrank.low_rank(w, rank, in_scales=scales, name=name), {}


def _svd_params(shape, rank, alpha=0.5):
    return rank * (shape[0] + shape[1])


def _svd_range(shape, alpha=0.5):
    return 1, min(shape)


def _kron_shapes(shape, a_shape=None, b_shape=None):
    if a_shape is None and b_shape is None:
        return kron_math.choose_kron_shapes(*shape)
    if a_shape is None or b_shape is None:
        raise JaxcompError("give both a_shape and b_shape, or neither")
    return tuple(a_shape), tuple(b_shape)


def _kron_fit(w, rank, stats, name, a_shape=None, b_shape=None, permute_iters=0):
    a_shape, b_shape = _kron_shapes(w.shape, a_shape, b_shape)
    leaf, errors = kron_math.kron_factorize(w, rank, a_shape, b_shape,
                                            permute_iters=permute_iters, name=name)
    # relative Frobenius error without permutations, then after each permutation iteration
    return leaf, {"rel_errors": [round(float(e), 6) for e in errors]}


def _kron_params(shape, rank, a_shape=None, b_shape=None, permute_iters=0):
    return kron_math.kron_num_params(*_kron_shapes(shape, a_shape, b_shape), rank)


def _kron_range(shape, a_shape=None, b_shape=None, permute_iters=0):
    (a1, a2), (b1, b2) = _kron_shapes(shape, a_shape, b_shape)
    return 1, min(a1 * a2, b1 * b2)


METHODS = {
    "tt": Method("tt", "max_bond_dim", _tt_fit, _tt_params, _tt_range,
                 ("rel_error", "refine_steps", "num_cores", "in_factors", "out_factors"),
                 refine_option="refine_steps"),
    "svd": Method("svd", "rank", _svd_fit, _svd_params, _svd_range, ("alpha",)),
    "asvd": Method("asvd", "rank", _asvd_fit, _svd_params, _svd_range, ("alpha",),
                   needs_stats=True),
    "kron": Method("kron", "rank", _kron_fit, _kron_params, _kron_range,
                   ("a_shape", "b_shape", "permute_iters")),
}


# --- the transform ---------------------------------------------------------------------------

def non_embedding_size(params) -> tuple[int, int]:
    """``(num_params, nbytes)`` outside the embedding tables and LM head, as stored
    (:func:`jaxcomp.core.tree_size` of the rest: a quantized matrix keeps its parameter count,
    plus its scales, but its bytes shrink)."""
    rest = [leaf for keypath, leaf in
            jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]
            if not re.search(EMBEDDING_PATTERN, path_str(keypath))]
    return tree_size(rest)


def non_embedding_params(params) -> int:
    """Parameters outside the embedding tables and LM head (compressed leaves count as stored)."""
    return non_embedding_size(params)[0]


def _fit_leaf(w, path, method: Method, fit_log: dict, stats=None, param_ratio=None, **args):
    if isinstance(w, CompressedLeaf):
        raise JaxcompError(f"already compressed ({type(w).__name__}); factorize before "
                           "quantizing, or select another parameter")
    require_matrix(path, w)
    if not np.all(np.isfinite(np.asarray(w))):
        raise JaxcompError(f"{path}: the weights contain NaN or Inf")
    knob = args.pop(method.knob, None)
    if param_ratio is not None:
        if not 0 < param_ratio <= 1:
            raise JaxcompError(f"{path}: param_ratio must be in (0, 1], got {param_ratio}")
        fitted = method.knob_for_params(w.shape, int(param_ratio * w.size), path, **args)
        knob = fitted if knob is None else min(knob, fitted)
    if knob is None and args.get("rel_error") is None:
        raise JaxcompError(f"{path}: {method.name} needs {method.knob}, param_ratio or "
                           "target_reduction")
    if knob is not None and knob < 1:
        raise JaxcompError(f"{path}: {method.knob} must be >= 1, got {knob}")
    leaf, info = method.fit(w, knob, None if stats is None else stats.get(path), path, **args)
    if info:
        fit_log[path] = info
    return leaf


def factorize(method_name: str, *, param_ratio: float | None = None,
              target_reduction: float | None = None, allocation: str = "uniform",
              probe_ratio: float = 0.3, rules=None, targets=DEFAULT_TARGETS, ignore=(),
              progress=None, report_sink: Callable | None = None, **method_args):
    """Makes the transform of one factorization method (shared by ``tt``/``kron``/``svd``/...).

    Args:
      method_name: a key of :data:`METHODS`.
      param_ratio: per matrix, keep at most this fraction of its scalars.
      target_reduction: remove this fraction of the model's non-embedding parameters, split
        over the selected matrices by ``allocation``.
      allocation: ``"uniform"`` (one ratio for every selected matrix), or per-matrix sizes
        minimizing the summed squared error (:func:`jaxcomp.tensornet.sensitivity.allocate`):
        ``"weight_error"`` (relative, data-free), ``"output_error"`` (relative, on the
        calibration inputs) or ``"fisher"`` (the Fisher-weighted weight error, an estimate of
        the loss increase: :func:`jaxcomp.calib.fisher_diagonal`).
      probe_ratio: the ``param_ratio`` at which the sensitivity profile is reported.
      rules, targets, ignore: selection (first match wins; rule ``args`` override per matrix).
      progress: progress bars (default: when stderr is a terminal).
      report_sink: ``report_sink(kind, value)`` receives what the run measured: ``"profile"``
        with the :class:`~jaxcomp.tensornet.sensitivity.Profile` when a budget was allocated,
        ``"fits"`` with per-matrix details (``kron``: the error after each permutation
        iteration). The CLI writes both to ``out_dir``.
      **method_args: the method's knob (``max_bond_dim``/``rank``) and options.

    Returns:
      ``transform(params, calib=None) -> params``. ``transform.needs_calibration`` says what
      ``calib`` must be: ``True``, stats from :func:`jaxcomp.calib.collect_input_stats`;
      ``"blocks"`` (refinement, ``allocation="fisher"``), a :class:`jaxcomp.calib.Calibration`,
      which also gives the allocation its statistics.
    """
    method = METHODS[method_name]
    if allocation not in ALLOCATIONS:
        raise JaxcompError(f"allocation must be one of {', '.join(ALLOCATIONS)}, "
                           f"got {allocation!r}")
    if target_reduction is not None and not 0 < target_reduction < 1:
        raise JaxcompError(f"target_reduction must be in (0, 1), got {target_reduction}")
    if target_reduction is not None and (param_ratio is not None
                                         or method_args.get(method.knob) is not None):
        raise JaxcompError(f"give target_reduction or a per-matrix size ({method.knob}, "
                           "param_ratio), not both")
    if not 0 < probe_ratio <= 1:
        raise JaxcompError(f"probe_ratio must be in (0, 1], got {probe_ratio}")
    per_matrix = (method.knob, *method.options)
    unknown = sorted(set(method_args) - set(per_matrix))
    if unknown:
        raise JaxcompError(f"{method.name} does not take {', '.join(unknown)} (it takes "
                           f"param_ratio, target_reduction, allocation, probe_ratio, "
                           f"{', '.join(per_matrix)})")
    rule_args = ("param_ratio", *per_matrix)
    rule_list = make_rules(rules, targets=targets, ignore=ignore)
    check_rule_args(rule_list, rule_args, method.name)
    refine_steps = [a[method.refine_option] for a in (method_args, *(r.args for r in rule_list))
                    if a.get(method.refine_option) is not None]
    for steps in refine_steps:  # checked before a long profile, not at the first fit after it
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise JaxcompError(f"{method.refine_option} must be a whole number >= 0, "
                               f"got {steps!r}")
    # Refinement runs in the block-sequential pass (it needs the model and calibration
    # windows); the allocation's statistics, when it needs them, come from one dense pass.
    refined = any(refine_steps)
    needs_stats = method.needs_stats or (target_reduction is not None
                                         and allocation == "output_error")
    needs_fisher = target_reduction is not None and allocation == "fisher"

    def transform(params, calib=None):
        stats = calib
        if refined or needs_fisher:
            from jaxcomp.calib import Calibration, collect_input_stats

            if not isinstance(calib, Calibration):
                why = "refinement" if refined else "allocation=fisher"
                raise JaxcompError(f"{method.name} with {why} needs calibration data: call "
                                   "it as transform(params, Calibration(model, windows)) (the "
                                   "CLI makes it from calib.*)")
            stats = (collect_input_stats(calib.model, params, calib.windows, calib.batch_size,
                                         calib.progress) if needs_stats else None)
        elif needs_stats and stats is None:
            why = "" if method.needs_stats else f" with allocation={allocation}"
            raise JaxcompError(f"{method.name}{why} needs calibration statistics (the CLI "
                               "collects them from calib.*)")
        run_rules = rule_list
        if target_reduction is not None:
            from jaxcomp.tensornet import sensitivity

            selected, _ = select(params, rule_list)
            flat = dict((path_str(k), v) for k, v in
                        jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0])
            mats = {p: flat[p] for p in selected}
            for p, w in mats.items():
                require_matrix(p, w)
            budget = int(round(target_reduction * non_embedding_params(params)))
            fisher = None
            if needs_fisher:
                from jaxcomp.calib import fisher_diagonal

                fisher = fisher_diagonal(calib.model, params, calib.windows, list(mats),
                                         calib.progress)
            profile = sensitivity.profile_and_allocate(
                method, mats, {p: {**method_args, **a} for p, a in selected.items()}, budget,
                allocation, probe_ratio, stats, progress, fisher)
            if report_sink is not None:
                report_sink("profile", profile)
            # The allocation is data: one exact-path rule per matrix (None = left dense).
            run_rules = [Rule("^" + re.escape(p) + "$", skip=k is None,
                              args={} if k is None else {**selected[p], method.knob: k})
                         for p, k in profile.allocation.items()]
        fit_log: dict[str, dict] = {}
        fit = functools.partial(_fit_leaf, method=method, fit_log=fit_log)
        if refined:
            out = _fit_blocks(params, calib, fit, run_rules, method.name,
                              param_ratio=param_ratio, **method_args)
        else:
            out = leaf_transform(fit, run_rules, progress=progress, desc=method.name,
                                 rule_args=rule_args, stats=stats, param_ratio=param_ratio,
                                 **method_args)(params)
        if report_sink is not None and fit_log:
            report_sink("fits", fit_log)
        return out

    transform.needs_calibration = "blocks" if refined or needs_fisher else needs_stats
    return transform


def _fit_blocks(params, calib, fit, rules, desc, **defaults):
    """Fits the selected kernels block by block (:func:`jaxcomp.calib.run_blocks`) and, inside
    a block, layer by layer in forward order: each is refined on the inputs the already
    factorized layers before it produce (GPTQ's "true sequential"), so it learns to work with
    them rather than with the original model's inputs."""
    from jaxcomp.calib import BlockStep, run_blocks
    from jaxcomp.models import decoder_parts

    parts = decoder_parts(calib.model)
    selected, _ = select(params, rules, warn=False)
    outside = [p for p in selected if not re.match(rf"{parts.prefix}_\d+/", p)]
    if outside:
        raise JaxcompError(f"{outside[0]}: {desc} refinement fits the decoder blocks' kernels "
                           "(block by block); give this parameter refine_steps=0")

    def step(block_params, ctx, chosen):
        leaves = leaves_by_path(block_params)
        listed = {p for group in parts.linears for p in group}
        for group in (*parts.linears, [p for p in chosen if p not in listed]):
            group = [p for p in group if p in chosen]
            if group:  # statistics of the block as fitted so far
                stats = {f"{ctx.prefix}/{p}": st for p, st in ctx.collect(block_params).items()}
                block_params = replace_leaves(block_params, {
                    p: fit(leaves[p], f"{ctx.prefix}/{p}", stats=stats, **chosen[p])
                    for p in group})
        return block_params

    return run_blocks(params, calib, (BlockStep(step, tuple(rules), defaults, desc),))


def _public(method_name: str, doc: str):
    def factory(*, rules=None, targets=DEFAULT_TARGETS, ignore=(), progress=None,
                report_sink=None, **kwargs):
        return factorize(method_name, rules=rules, targets=targets, ignore=ignore,
                         progress=progress, report_sink=report_sink, **kwargs)

    factory.__name__ = factory.__qualname__ = method_name
    factory.__doc__ = doc
    return register_transform(method_name)(factory)


tt_transform = _public("tt", """Tensor-train / MPO factorization of the selected kernels.

    Args (besides :func:`factorize`'s): ``max_bond_dim``, ``rel_error``, ``num_cores`` (3),
    ``in_factors``/``out_factors`` (default: balanced), ``refine_steps`` (0: plain TT-SVD;
    ``N``: then ``N`` L-BFGS steps on each layer's calibration output error,
    :func:`jaxcomp.tensornet.tt.refine_to_outputs`, block by block and layer by layer on the
    inputs the already factorized layers produce; call as
    ``transform(params, Calibration(model, windows))``).

    Example:
      >>> small = tt_transform(param_ratio=0.3)(params)  # doctest: +SKIP
    """)
kron_transform = _public("kron", """Kronecker-sum factorization with optional learned
    permutations (TQCompressor).

    Args (besides :func:`factorize`'s): ``rank``, ``a_shape``/``b_shape`` (default: balanced),
    ``permute_iters`` (0: no permutations).

    Example:
      >>> small = kron_transform(rank=4, permute_iters=5)(params)  # doctest: +SKIP
    """)
svd_transform = _public("svd", """Truncated-SVD low-rank factorization (``rank`` or sizes as in
    :func:`factorize`).

    Example:
      >>> small = svd_transform(param_ratio=0.5)(params)  # doctest: +SKIP
    """)
asvd_transform = _public("asvd", """Activation-aware SVD: input channels scaled by
    ``rms^alpha`` (``alpha`` default 0.5) before the SVD; call as ``transform(params, stats)``.

    Example:
      >>> small = asvd_transform(param_ratio=0.5)(params, stats)  # doctest: +SKIP
    """)
