"""Autoregressive generation with a KV cache, one jit-compiled program per setting."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcomp.models import init_cache


def _sample(logits, rng, temperature: float, top_p: float):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        # Nucleus: keep the smallest set of tokens whose probability mass reaches top_p.
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_p"))
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_p):
    b, t0 = prompt.shape
    cache = init_cache(model.cfg, b, t0 + max_new_tokens, model.dtype)
    logits, cache = model.apply({"params": params}, prompt, cache=cache, index=0)
    rng, sub = jax.random.split(rng)
    first = _sample(logits[:, -1], sub, temperature, top_p)

    def step(carry, i):
        token, cache, rng = carry
        logits, cache = model.apply({"params": params}, token[:, None], cache=cache,
                                    index=t0 + i)
        rng, sub = jax.random.split(rng)
        nxt = _sample(logits[:, -1], sub, temperature, top_p)
        return (nxt, cache, rng), token

    (last, _, _), tokens = jax.lax.scan(step, (first, cache, rng),
                                        jnp.arange(max_new_tokens - 1))
    new = jnp.concatenate([tokens.T, last[:, None]], axis=1)
    return jnp.concatenate([prompt, new], axis=1)


def generate(model, params, prompt, max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> jax.Array:
    """Generates ``max_new_tokens`` tokens after ``prompt`` (greedy when temperature is 0).

    Args:
      model: a module from :func:`jaxcomp.models.build_model`.
      params: its params (plain or compressed leaves).
      prompt: (B, T0) int token ids (equal-length prompts).
      max_new_tokens: number of tokens to add (>= 1); generation does not stop at EOS.
      temperature: 0 for greedy decoding, > 0 to sample.
      top_p: nucleus-sampling mass in (0, 1].
      seed: PRNG seed for sampling.

    Returns:
      (B, T0 + max_new_tokens) token ids, prompt included.

    Example:
      >>> out = generate(model, params, jnp.array([[1, 2, 3]]), 20)  # doctest: +SKIP
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    prompt = jnp.asarray(prompt, jnp.int32)
    return _generate(model, params, prompt, jax.random.key(seed), max_new_tokens,
                     float(temperature), float(top_p))
