"""QuaRot rotations and activation quantization as param transforms (``rotate``, ``act_quant``).

``rotate`` rewrites a LLaMA-family param tree so the model computes the same function while
its residual stream lives in a randomly rotated basis ``x -> x @ Q`` (``Q`` a randomized
Hadamard matrix, :func:`jaxcomp.quant.rotation.random_hadamard`). Outlier channels of the
residual stream are spread over all channels, so per-token activation quantization (W4A4) and
weight quantization lose less. The math lives in :mod:`jaxcomp.quant.rotation`; this module
only wires it into the param tree.

Why it is exact: with RMSNorm scales folded into the next linears, RMSNorm commutes with any
orthogonal ``Q`` (``||x Q|| = ||x||``), so a residual stream ``x Q`` stays ``x Q`` through every
block when the readers (``q/k/v``, ``gate/up``, LM head: ``W -> Q.T W``) undo it and the writers
(embedding, ``o_proj``, ``down_proj``: ``W -> W Q``) apply it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import require_matrix
from jaxcomp.core.transform import leaf_transform, register_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.quant.actquant import ActQuant
from jaxcomp.quant.rotation import apply_hadamard, hadamard_signs
from jaxcomp.quant.transform import DEFAULT_TARGETS

ONLINE_HADAMARD_LAYERS = ("o_proj", "down_proj")
_LAYER = re.compile(r"^layers_(\d+)$")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _dense(leaf, path: str) -> np.ndarray:
    """A plain param as float64 NumPy, or a clear error for a compressed one."""
    if isinstance(leaf, CompressedLeaf):
        raise JaxcompError(f"{path} is already compressed ({type(leaf).__name__}); run rotate "
                           "before quantization, factorization and act_quant stages")
    return np.asarray(leaf, np.float64)


def _like(value: np.ndarray, old):
    """``value`` in ``old``'s dtype and array type (NumPy stays NumPy, JAX stays JAX)."""
    dtype = old.dtype
    if isinstance(old, np.ndarray):
        return value.astype(dtype)
    return jnp.asarray(value, dtype)


def _check_llama(params) -> list[str]:
    """The decoder block keys of a LLaMA-family param tree; raises for anything else."""
    if not isinstance(params, Mapping):
        raise JaxcompError(f"rotate expects a param mapping, got {type(params).__name__}")
    if "wte" in params or any(re.match(r"^h_\d+$", k) for k in params):
        raise JaxcompError("rotate supports the LLaMA family only: this looks like GPT-2 "
                           "(wte, h_i), whose LayerNorm subtracts the mean and does not commute "
                           "with a rotation of the residual stream")
    for key in ("embed_tokens", "norm"):
        if key not in params:
            raise JaxcompError(f"rotate supports the LLaMA family only: no '{key}' param "
                               f"(found: {', '.join(sorted(params))})")
    layers = sorted((k for k in params if _LAYER.match(k)), key=lambda k: int(k.split("_")[1]))
    unknown = set(params) - set(layers) - {"embed_tokens", "norm", "lm_head"}
    if unknown or not layers:
        raise JaxcompError(f"rotate does not know the params {sorted(unknown) or 'layers_i'} "
                           "of this model; it supports the LLaMA family only")
    expected = {"input_layernorm": ("scale",), "post_attention_layernorm": ("scale",),
                "self_attn": _ATTN, "mlp": _MLP}
    for key in layers:
        block = params[key]
        if set(block) != set(expected):
            raise JaxcompError(f"{key}: rotate expects {sorted(expected)}, got {sorted(block)}")
        for sub, names in expected.items():
            if set(block[sub]) != set(names):
                raise JaxcompError(f"{key}/{sub}: rotate expects {list(names)}, got "
                                   f"{sorted(block[sub])} (an unknown LLaMA variant?)")
            for name in names if sub in ("self_attn", "mlp") else ():
                extra = set(block[sub][name]) - {"kernel", "bias"}
                if extra:
                    raise JaxcompError(f"{key}/{sub}/{name}: unexpected params {sorted(extra)}")
    return layers


def _online_layers(online_hadamard) -> tuple[str, ...]:
    if online_hadamard is True:
        return ONLINE_HADAMARD_LAYERS
    if online_hadamard is False or online_hadamard is None:
        return ()
    if isinstance(online_hadamard, str):
        online_hadamard = (online_hadamard,)
    names = tuple(online_hadamard)
    bad = [n for n in names if n not in ONLINE_HADAMARD_LAYERS]
    if bad:
        raise JaxcompError(f"online_hadamard: {bad} not supported (choose from "
                           f"{list(ONLINE_HADAMARD_LAYERS)}, or true/false)")
    return names


@register_transform("rotate")
def rotate(*, seed: int = 0, online_hadamard: bool | Sequence[str] = True, rules=None):
    """QuaRot: fold RMSNorm scales, rotate the residual stream, add online Hadamards.

    For the LLaMA family (LLaMA, Mistral, Qwen2, SmolLM2) only; other models raise. The float
    model computes the same logits (up to rounding); what changes is how its weights and
    activations look to a quantizer. Run it before every compression stage.

    1. Every RMSNorm scale is folded into the rows of the linears reading its output
       (``input_layernorm -> q/k/v``, ``post_attention_layernorm -> gate/up``,
       ``norm -> lm_head``) and set to ones.
    2. The residual stream is rotated by ``Q = random_hadamard(hidden, seed)``:
       ``embedding -> E Q``; ``q/k/v/gate/up/lm_head`` kernels ``W -> Q.T W``; ``o_proj`` and
       ``down_proj`` kernels (and biases) ``W -> W Q``. A tied LM head is **untied**: an
       explicit ``lm_head/kernel`` param is written (the LLaMA model uses an ``lm_head`` param
       whenever there is one).
    3. Online Hadamard (QuaRot): the inputs ``x`` of each layer in ``online_hadamard``
       (``down_proj``; ``o_proj``) are rotated at run time by the Hadamard matrix ``H`` of their
       width. The kernel ``W`` becomes ``ActQuant(H.T @ W, act_bits=None, hadamard=width)``,
       which computes ``(x @ H) @ (H.T @ W) == x @ W``; its inner kernel ``H.T @ W`` is what
       later ``quantize``/``gptq`` stages compress, and ``act_quant`` sets its input bits.
       Widths without a Hadamard order fall back to block-diagonal Hadamards
       (:mod:`jaxcomp.quant.rotation`).

    Args:
      seed: seed of the random signs of ``Q``.
      online_hadamard: ``True`` (``o_proj`` and ``down_proj``), ``False``, or a list of those
        layer names.
      rules: not supported (the rotation must cover the whole model to be exact); present so
        recipes can pass an empty list.

    Returns:
      A pure transform ``params -> params`` (the input is not modified).

    Example:
      >>> rotated = rotate(seed=0)(params)  # doctest: +SKIP
      >>> w4a4 = chain(rotate(), act_quant(bits=4), quantize(int4(128)))(params)  # doctest: +SKIP
    """
    if rules:
        raise JaxcompError("rotate takes no rules: a partial rotation would change the model")
    online = _online_layers(online_hadamard)
    if not isinstance(seed, (int, np.integer)):
        raise JaxcompError(f"rotate: seed must be an integer, got {seed!r}")

    def transform(params):
        layers = _check_llama(params)
        embedding = params["embed_tokens"]["embedding"]
        hidden = np.shape(embedding)[-1]
        signs = hadamard_signs(hidden, int(seed))

        def write(w):  # W -> W Q = (W diag(s)) H, on the last (residual) axis
            return apply_hadamard(w * signs, hidden)

        def read(w):  # W -> Q.T W = (W.T Q).T
            return write(w.T).T

        def rotate_group(block, key, group, norm_key, readers, writer):
            scale = block[norm_key]["scale"]
            s = _dense(scale, f"{key}/{norm_key}/scale")
            sub = dict(block[group])
            for name in readers:  # fold the norm scale into the rows, then undo Q
                old = sub[name]["kernel"]
                w = _dense(old, f"{key}/{group}/{name}/kernel")
                sub[name] = {**sub[name], "kernel": _like(read(s[:, None] * w), old)}
            layer = dict(sub[writer])
            old = layer["kernel"]
            w = write(_dense(old, f"{key}/{group}/{writer}/kernel"))
            if "bias" in layer:
                b = layer["bias"]
                layer["bias"] = _like(write(_dense(b, f"{key}/{group}/{writer}/bias")), b)
            if writer in online:  # x @ W == (x @ H) @ (H.T @ W): H applied online
                width = w.shape[0]
                layer["kernel"] = ActQuant(_like(apply_hadamard(w.T, width).T, old),
                                           act_bits=None, hadamard=width)
            else:
                layer["kernel"] = _like(w, old)
            sub[writer] = layer
            return {**block, group: sub,
                    norm_key: {**block[norm_key], "scale": _ones_like(scale)}}

        new = dict(params)
        for key in layers:
            block = rotate_group(params[key], key, "self_attn", "input_layernorm",
                                 ("q_proj", "k_proj", "v_proj"), "o_proj")
            new[key] = rotate_group(block, key, "mlp", "post_attention_layernorm",
                                    ("gate_proj", "up_proj"), "down_proj")

        final_scale = params["norm"]["scale"]
        s = _dense(final_scale, "norm/scale")
        if "lm_head" in params:
            head = params["lm_head"]["kernel"]
            head_w = _dense(head, "lm_head/kernel")
        else:  # tied: the head is E.T; untie it (an explicit param, rotated differently)
            head = embedding
            head_w = _dense(embedding, "embed_tokens/embedding").T
        new["lm_head"] = {**params.get("lm_head", {}),
                          "kernel": _like(read(s[:, None] * head_w), head)}
        new["norm"] = {**params["norm"], "scale": _ones_like(final_scale)}
        new["embed_tokens"] = {**params["embed_tokens"], "embedding": _like(
            write(_dense(embedding, "embed_tokens/embedding")), embedding)}
        return new

    return transform


def _ones_like(scale):
    return _like(np.ones(np.shape(scale)), scale)


def _act_quant_leaf(w, path, bits):
    if isinstance(w, ActQuant):  # e.g. rotate's online-Hadamard wrapper: set its input bits
        return w.replace(act_bits=bits)
    require_matrix(path, w)
    return ActQuant(w, act_bits=bits)


@register_transform("act_quant")
def act_quant(bits: int = 4, *, rules=None, targets=DEFAULT_TARGETS, ignore=(), progress=None):
    """Per-token dynamic activation quantization of the selected kernels' inputs (the ``A`` of
    W4A4/W8A8).

    Each selected kernel ``W`` becomes ``ActQuant(W, act_bits=bits)``; a kernel that already is
    an :class:`ActQuant` (``rotate``'s online-Hadamard layers) only gets its ``act_bits`` set.
    Weights are untouched: a later ``quantize``/``gptq`` stage quantizes the inner kernel
    (through ``map_factors``).

    Args:
      bits: input bits, 2..8.
      rules: ordered rules; a rule's ``args`` may override ``bits`` for the leaves it selects.
      targets, ignore: patterns selected / skipped (ignore first). Default: every kernel inside
        a decoder block.
      progress: progress bar (default: when stderr is a terminal).

    Returns:
      A pure transform ``params -> params``.

    Example:
      >>> w4a4 = chain(act_quant(bits=4), quantize(int4(128)))(params)  # doctest: +SKIP
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise JaxcompError(f"act_quant: bits must be an integer in 2..8, got {bits!r}")
    return leaf_transform(_act_quant_leaf, rules, targets=targets, ignore=ignore,
                          progress=progress, desc="act_quant", bits=bits)
