"""AWQ and SmoothQuant wired into LLaMA-family decoder blocks: the ``awq`` and ``smoothquant``
transforms.

Both methods scale the input channels of linears sharing one input by ``s`` and fold ``1/s``
into the op producing that input, so the float block computes exactly the same function
(:func:`apply_scales`). In a LLaMA block (:func:`llama_scale_groups`):

========  ===========================  =====================================================
group     kernels sharing the input    ``1/s`` folds into
========  ===========================  =====================================================
attn_in   q_proj, k_proj, v_proj       ``input_layernorm/scale``
attn_out  o_proj                       ``v_proj`` output columns (and bias)
mlp_in    gate_proj, up_proj           ``post_attention_layernorm/scale``
mlp_out   down_proj                    ``up_proj`` output columns (and bias)
========  ===========================  =====================================================

With grouped-query attention the o_proj rows of every query head sharing a key/value head
read the same v_proj columns, so those rows share one scale: the statistics are pooled over
them (mean square for AWQ, max for SmoothQuant) and the group is still scaled (AutoAWQ skips
it instead). The statistics come from the block as handed to the step; the fold changes each
group's input by exactly ``1/s`` (the float function is unchanged), so the scaled inputs'
Gram matrix is ``G / (s s^T)`` without another pass.

Selection: a group is scaled only when the rules select *all* its kernels and the op
producing its input is a plain array. Scaling multiplies every member's rows, and a kernel the
rules leave alone (or one already compressed) must stay as it is; a partly selected group is
therefore not scaled (a warning says so) and its selected kernels get only clipping (AWQ) or
activation quantization without smoothing (SmoothQuant). The op receiving ``1/s`` is changed
whether selected or not (norm scales never are); it stays float and the block's function is
unchanged.

Only the LLaMA family (``cfg.arch == "llama"``: LLaMA, Mistral, Qwen2, SmolLM2) is wired;
other models raise a :class:`JaxcompError`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxcomp.calib import BlockContext, InputStats, block_transform
from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import make_rules, replace_leaves
from jaxcomp.core.transform import register_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.quant.actquant import ActQuant
from jaxcomp.quant.awq import clip_to_ratios, search_clip, search_scales
from jaxcomp.quant.formats import format_from_name, resolve_format
from jaxcomp.quant.rtn import quantize_array
from jaxcomp.quant.smoothquant import smooth_scales, weight_absmax
from jaxcomp.quant.transform import DEFAULT_TARGETS

# AutoAWQ does not clip q/k: their error reaches the output through the softmax of q.k, which
# the layer-output MSE the clip search minimizes does not see.
NO_CLIP = ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel")


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    """Kernels of one block sharing an input, and the param producing that input.

    Attributes:
      name: ``"attn_in"``, ``"attn_out"``, ``"mlp_in"`` or ``"mlp_out"``.
      members: block-relative kernel paths (``"self_attn/q_proj/kernel"``, ...).
      prev: block-relative path of the param ``1/s`` folds into: a norm scale
        (``prev_kind="norm"``) or a kernel whose output columns are the input channels
        (``prev_kind="columns"``).
      prev_kind: ``"norm"`` or ``"columns"``.
      prev_bias: the bias of a ``"columns"`` prev, if the model has one.
      index: ``(K,)`` the prev channel each input channel comes from (grouped-query o_proj:
        several rows per v_proj column), or ``None`` when it is one to one.
    """

    name: str
    members: tuple[str, ...]
    prev: str
    prev_kind: str
    prev_bias: str | None = None
    index: tuple[int, ...] | None = None

    def prev_scales(self, s: np.ndarray) -> np.ndarray:
        """The scale of each prev channel from per-input-channel ``s`` (tied channels must
        agree)."""
        if self.index is None:
            return s
        index = np.asarray(self.index)
        out = np.ones(int(index.max()) + 1)
        out[index] = s
        if not np.allclose(out[index], s, rtol=1e-6, atol=0.0):
            raise JaxcompError(f"{self.name}: input channels reading the same "
                               f"{self.prev} column need equal scales")
        return out


def llama_scale_groups(cfg) -> tuple[ScaleGroup, ...]:
    """The shared-input groups of a LLaMA-family block (see the module docstring).

    Args:
      cfg: a :class:`jaxcomp.models.ModelConfig` with ``arch == "llama"``.

    Returns:
      ``(attn_in, attn_out, mlp_in, mlp_out)``.

    Example:
      >>> [g.name for g in llama_scale_groups(cfg)]  # doctest: +SKIP
      ['attn_in', 'attn_out', 'mlp_in', 'mlp_out']
    """
    _require_llama(cfg)
    rep = cfg.num_heads // cfg.num_kv_heads
    index = None
    if rep > 1:  # o_proj row (head h, dim d) reads v_proj column (kv head h // rep, dim d)
        j = np.arange(cfg.num_heads * cfg.head_dim)
        index = tuple(int(c) for c in (j // cfg.head_dim // rep) * cfg.head_dim
                      + j % cfg.head_dim)
    return (
        ScaleGroup("attn_in", ("self_attn/q_proj/kernel", "self_attn/k_proj/kernel",
                               "self_attn/v_proj/kernel"), "input_layernorm/scale", "norm"),
        ScaleGroup("attn_out", ("self_attn/o_proj/kernel",), "self_attn/v_proj/kernel",
                   "columns", "self_attn/v_proj/bias" if cfg.qkv_bias else None, index),
        ScaleGroup("mlp_in", ("mlp/gate_proj/kernel", "mlp/up_proj/kernel"),
                   "post_attention_layernorm/scale", "norm"),
        ScaleGroup("mlp_out", ("mlp/down_proj/kernel",), "mlp/up_proj/kernel", "columns",
                   "mlp/up_proj/bias" if cfg.mlp_bias else None),
    )


def _require_llama(cfg, method: str = "AWQ/SmoothQuant") -> None:
    if getattr(cfg, "arch", None) != "llama":
        raise JaxcompError(f"{method} supports the LLaMA family (llama, mistral, qwen2, "
                           f"SmolLM2); this model is {getattr(cfg, 'model_type', cfg)!r}")


# --- pytree access (copy on write: the input params are never mutated) ------------------------

def _get(tree, path: str):
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise JaxcompError(f"{path}: not found in the block params")
        node = node[key]
    return node


def _plain(tree, path: str, what: str):
    leaf = _get(tree, path)
    if isinstance(leaf, CompressedLeaf):
        raise JaxcompError(f"{path}: {what} needs a float array, but it is already compressed "
                           f"({type(leaf).__name__})")
    return leaf


def _scaled(leaf, factor) -> jnp.ndarray:
    """``leaf * factor`` computed in float32, stored in the leaf's dtype."""
    leaf = jnp.asarray(leaf)
    return (leaf.astype(jnp.float32) * jnp.asarray(factor, jnp.float32)).astype(leaf.dtype)


def apply_scales(block_params, cfg, scales: Mapping[str, Any]):
    """Folds per-input-channel scales into a LLaMA block; the float block is unchanged.

    For each group: every member kernel's rows are multiplied by ``s``, the norm scale (or the
    prev kernel's output columns and bias) divided by it.

    Args:
      block_params: one decoder block's params (``layers_i``'s subtree).
      cfg: the model config.
      scales: ``{group name: (K,) scales}`` for some of :func:`llama_scale_groups`; for a
        grouped-query ``attn_out``, rows reading the same v_proj column need equal scales.

    Returns:
      New block params (the input is not mutated; untouched entries are the same objects).

    Example:
      >>> s = {"mlp_out": np.full(cfg.intermediate_size, 2.0)}
      >>> bp2 = apply_scales(bp, cfg, s)  # block(bp2, x) == block(bp, x)  # doctest: +SKIP
    """
    groups = {g.name: g for g in llama_scale_groups(cfg)}
    out = block_params
    for name, s in scales.items():
        if name not in groups:
            raise JaxcompError(f"unknown scale group {name!r} (groups: {', '.join(groups)})")
        group = groups[name]
        s = np.asarray(s, np.float64)
        for m in group.members:
            w = _plain(out, m, "scaling")
            if s.shape != (w.shape[0],) or not np.all(np.isfinite(s)) or np.any(s <= 0):
                raise JaxcompError(f"{m}: scales must be {w.shape[0]} finite positive values, "
                                   f"got shape {s.shape}")
            out = replace_leaves(out, {m: _scaled(w, s[:, None])})
        inv = 1.0 / group.prev_scales(s)
        prev = _plain(out, group.prev, "folding scales")
        scaled = _scaled(prev, inv if group.prev_kind == "norm" else inv[None, :])
        out = replace_leaves(out, {group.prev: scaled})
        if group.prev_bias is not None:
            out = replace_leaves(out, {group.prev_bias: _scaled(_get(out, group.prev_bias), inv)})
    return out


# --- shared by both transforms ---------------------------------------------------------------

def _selected_groups(cfg, selected: Mapping[str, Any], method: str):
    """``[(group, selected members)]`` for groups with a selected member; raises for a
    selected path outside every group."""
    groups = llama_scale_groups(cfg)
    known = {m for g in groups for m in g.members}
    stray = sorted(set(selected) - known)
    if stray:
        raise JaxcompError(f"{stray[0]}: {method} handles the linear kernels of a LLaMA block "
                           f"({', '.join(sorted(known))}); select only those")
    return [(g, [m for m in g.members if m in selected]) for g in groups
            if any(m in selected for m in g.members)]


def _can_scale(block_params, group: ScaleGroup, members: list[str], method: str) -> bool:
    missing = [m for m in group.members if m not in members]
    if missing:
        warnings.warn(f"{method}: rules select {', '.join(members)} but not "
                      f"{', '.join(missing)}, which share their input; that input is not "
                      "scaled", stacklevel=2)
        return False
    return not any(isinstance(_get(block_params, p), CompressedLeaf)
                   for p in (group.prev, group.prev_bias) if p is not None)


def _group_stats(ctx: BlockContext, members: list[str]) -> InputStats:
    stats = ctx.stats.get(members[0])
    if stats is None:
        raise JaxcompError(f"{members[0]}: no calibration statistics were collected for it")
    return stats


def _group_value(members, selected, key: str):
    values = {selected[m][key] for m in members}
    if len(values) > 1:
        raise JaxcompError(f"{', '.join(members)} share an input and need one {key}; rules "
                           f"give {sorted(values)}")
    return values.pop()


def _pooled(values: np.ndarray, index, how: str) -> np.ndarray:
    """Per-channel values pooled over channels tied by ``index`` (mean or max), expanded."""
    values = np.asarray(values, np.float64)
    if index is None:
        return values
    index = np.asarray(index)
    if how == "mean":
        return (np.bincount(index, values) / np.bincount(index))[index]
    out = np.full(int(index.max()) + 1, -np.inf)
    np.maximum.at(out, index, values)
    return out[index]


def _check_rule_args(rules, defaults: dict, resolve, method: str) -> None:
    """Resolves every rule's arguments now, so a bad one fails before calibration starts."""
    resolve(defaults, method)
    for r in make_rules(rules):
        if not r.skip and r.args:
            resolve({**defaults, **r.args}, f"{method} rule {r.pattern!r}")


def _llama_only(transform, method: str):
    """``transform`` refusing a non-LLaMA model before calibrating. (The block step checks
    too: ``chain`` fuses block steps into a new pass that does not go through this.)"""

    def checked(params, calib=None):
        cfg = getattr(getattr(calib, "model", None), "cfg", None)
        if cfg is not None:
            _require_llama(cfg, method)
        return transform(params, calib)

    checked.needs_calibration = transform.needs_calibration
    checked.block_steps = transform.block_steps
    return checked


def _require_bool(args: Mapping[str, Any], keys, where: str) -> None:
    for key in keys:
        if not isinstance(args[key], bool):
            raise JaxcompError(f"{where}: {key} must be true or false, got {args[key]!r}")


# --- AWQ --------------------------------------------------------------------------------------

def _awq_format(args: Mapping[str, Any], where: str):
    _require_bool(args, ("clip", "quantize", "symmetric"), where)
    grid = args["alpha_grid"]
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise JaxcompError(f"{where}: alpha_grid must be an integer >= 1, got {grid!r}")
    return resolve_format(args, where)


def _awq_block(block_params, ctx: BlockContext, selected: Mapping[str, dict]):
    _require_llama(ctx.cfg, "AWQ")
    fmts = {p: _awq_format(a, p) for p, a in selected.items()}
    scales: dict[str, np.ndarray] = {}
    grams: dict[str, np.ndarray] = {}  # each selected kernel's input Gram after scaling
    for group, members in _selected_groups(ctx.cfg, selected, "AWQ"):
        for m in members:
            _plain(block_params, m, "AWQ")
        stats = _group_stats(ctx, members)
        gram = stats.gram / max(stats.count, 1)
        if _can_scale(block_params, group, members, "awq"):
            rms = np.sqrt(_pooled(np.maximum(np.diag(gram), 0.0), group.index, "mean"))
            s, _, _ = search_scales([_get(block_params, m) for m in members],
                                    [fmts[m] for m in members], gram, rms,
                                    _group_value(members, selected, "alpha_grid"))
            scales[group.name] = s
            gram = gram / np.outer(s, s)
        for m in members:
            grams[m] = gram
    block_params = apply_scales(block_params, ctx.cfg, scales)
    for path, args in selected.items():
        w = _get(block_params, path)
        fmt = fmts[path]
        if args["clip"] and path not in NO_CLIP and fmt.granularity != "tensor":
            w = clip_to_ratios(w, fmt, search_clip(w, fmt, grams[path])).astype(w.dtype)
        if args["quantize"]:
            w = quantize_array(w, fmt, name=path)
        block_params = replace_leaves(block_params, {path: w})
    return block_params


@register_transform("awq")
def awq(fmt=None, *, format: str = "int", bits: int | None = 4, group_size=128,
        symmetric: bool = False, scale_dtype: str = "bfloat16", alpha_grid: int = 20,
        clip: bool = True, quantize: bool = True, rules=None, targets=DEFAULT_TARGETS,
        ignore=()):
    """AWQ: activation-aware per-channel scaling and clipping, then RTN (LLaMA family).

    Block by block on calibration activations: for each group of kernels sharing an input
    (see the module docstring), search ``s = rms(x)^alpha`` minimizing the group's quantized
    output error (:func:`jaxcomp.quant.awq.search_scales`), fold ``1/s`` into the op producing
    the input, then search a clip ratio per quantization group and column
    (:func:`jaxcomp.quant.awq.search_clip`; not for q_proj/k_proj, as AutoAWQ) and clamp the
    float weights to it. Finally each selected kernel becomes a ``QArray`` (RTN in ``fmt``), or,
    with ``quantize=False``, stays a float array for a following quantizer:
    ``chain(awq(quantize=False), gptq(...))`` runs AWQ then GPTQ inside each block.

    Args:
      fmt: a format object (``int4(128)``, ...); or build one from ``format``, ``bits``,
        ``group_size``, ``symmetric``, ``scale_dtype`` (the recipe form, as ``quantize``).
      alpha_grid: exponents ``alpha = i / alpha_grid`` tried (``alpha = 0``: RTN).
      clip: run the clip search.
      quantize: replace the kernels by ``QArray``; ``False`` keeps them float (scaled,
        clipped).
      rules: ordered rules; a rule's ``args`` override any argument above for the kernels it
        selects. Kernels sharing an input need one ``alpha_grid``; the search uses each
        kernel's own format.
      targets, ignore: kernels selected / skipped. Default: every kernel in the decoder
        blocks. A group is scaled only when all its kernels are selected.

    Returns:
      A calibrated transform ``transform(params, Calibration(model, windows)) -> params``.

    Example:
      >>> t = awq(bits=4, group_size=128)
      >>> q = t(params, Calibration(build_model(cfg), windows))  # doctest: +SKIP
    """
    defaults = dict(fmt=fmt, format=format, bits=bits, group_size=group_size,
                    symmetric=symmetric, scale_dtype=scale_dtype, alpha_grid=alpha_grid,
                    clip=clip, quantize=quantize)
    _check_rule_args(rules, defaults, _awq_format, "awq")
    return _llama_only(block_transform(_awq_block, rules, targets=targets, ignore=ignore,
                                       desc="awq", **defaults), "AWQ")


# --- SmoothQuant ------------------------------------------------------------------------------

def _sq_format(args: Mapping[str, Any], where: str):
    """The weight format (``None``: weights stay float) after checking the arguments."""
    alpha = args["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise JaxcompError(f"{where}: alpha must be in [0, 1], got {alpha!r}")
    bits = args["act_bits"]
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise JaxcompError(f"{where}: act_bits must be an integer in 2..8, got {bits!r}")
    _require_bool(args, ("w_symmetric",), where)
    if args["w_bits"] is None:
        return None
    try:
        return format_from_name("int", args["w_bits"], args["w_group_size"],
                                args["w_symmetric"], args["w_scale_dtype"])
    except JaxcompError as e:
        raise JaxcompError(f"{where}: {e}") from None


def _smoothquant_block(block_params, ctx: BlockContext, selected: Mapping[str, dict]):
    _require_llama(ctx.cfg, "SmoothQuant")
    fmts = {p: _sq_format(a, p) for p, a in selected.items()}
    scales: dict[str, np.ndarray] = {}
    for group, members in _selected_groups(ctx.cfg, selected, "SmoothQuant"):
        weights = [_plain(block_params, m, "SmoothQuant") for m in members]
        if not _can_scale(block_params, group, members, "smoothquant"):
            continue
        stats = _group_stats(ctx, members)
        if stats.absmax is None:
            raise JaxcompError(f"{members[0]}: SmoothQuant needs per-channel activation "
                               "maxima (absmax) in the calibration statistics")
        act = _pooled(stats.absmax, group.index, "max")
        wmax = _pooled(weight_absmax(weights), group.index, "max")
        scales[group.name] = smooth_scales(act, wmax,
                                           _group_value(members, selected, "alpha"))
    block_params = apply_scales(block_params, ctx.cfg, scales)
    for path, args in selected.items():
        w = _get(block_params, path)
        if fmts[path] is not None:
            w = quantize_array(w, fmts[path], name=path)
        block_params = replace_leaves(block_params, {path: ActQuant(w, args["act_bits"])})
    return block_params


@register_transform("smoothquant")
def smoothquant(alpha: float = 0.5, *, act_bits: int = 8, w_bits: int | None = 8,
                w_group_size="channel", w_symmetric: bool = True,
                w_scale_dtype: str = "bfloat16", rules=None, targets=DEFAULT_TARGETS,
                ignore=()):
    """SmoothQuant W8A8: smoothing scales folded into the block, then per-token dynamic
    activation quantization and int weights (LLaMA family).

    Block by block on calibration activations: for each group of kernels sharing an input,
    ``s = max|X|^alpha / max|W|^(1-alpha)``
    (:func:`jaxcomp.quant.smoothquant.smooth_scales`) is folded in (:func:`apply_scales`);
    then each selected kernel becomes ``ActQuant(QArray, act_bits)``: inputs fake-quantized
    per token (symmetric, dynamic), weights RTN in a symmetric per-channel int format.

    Args:
      alpha: migration strength in ``[0, 1]``.
      act_bits: activation bits (2..8).
      w_bits: weight bits (2..8), or ``None`` to keep float weights (activations only).
      w_group_size: ``"channel"`` (SmoothQuant's per-output-channel scales), an int, or
        ``"tensor"``.
      w_symmetric: symmetric weight codes.
      w_scale_dtype: ``"bfloat16"`` or ``"float32"`` weight scales.
      rules: ordered rules; a rule's ``args`` override any argument above for the kernels it
        selects (kernels sharing an input need one ``alpha``).
      targets, ignore: kernels selected / skipped. Default: every kernel in the decoder
        blocks. A group is smoothed only when all its kernels are selected.

    Returns:
      A calibrated transform ``transform(params, Calibration(model, windows)) -> params``.

    Example:
      >>> t = smoothquant(alpha=0.5)
      >>> w8a8 = t(params, Calibration(build_model(cfg), windows))  # doctest: +SKIP
    """
    defaults = dict(alpha=alpha, act_bits=act_bits, w_bits=w_bits, w_group_size=w_group_size,
                    w_symmetric=w_symmetric, w_scale_dtype=w_scale_dtype)
    _check_rule_args(rules, defaults, _sq_format, "smoothquant")
    return _llama_only(block_transform(_smoothquant_block, rules, targets=targets,
                                       ignore=ignore, desc="smoothquant", **defaults),
                       "SmoothQuant")
