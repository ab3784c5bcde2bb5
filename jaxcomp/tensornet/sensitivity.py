"""Layer sensitivity profiles and the budget allocator behind ``target_reduction``.

For every selected matrix the factorization is tried at a few sizes (fractions of its dense
parameter count). The *sensitivity* of a matrix at a size is its error there: the relative
weight error ``||W - W'||_F / ||W||_F`` (data-free), the relative output error on calibration
inputs ``||X (W - W')||_F / ||X W||_F`` (from the input Gram matrices, :mod:`jaxcomp.calib`), or
the Fisher-weighted error ``sqrt(sum(F * (W - W')^2))``, whose square is twice the
second-order estimate of the loss increase (:func:`jaxcomp.calib.fisher_diagonal`; not
relative: it also says how much the loss cares about the matrix). The profile reports it at
``probe_ratio``. The allocator picks one size per matrix (or leaves it dense) so that the model
loses the requested number of parameters while the summed squared error is smallest (for the
relative errors: the relative noise energy injected into the layers' outputs; for Fisher: the
estimated loss increase): a multiple-choice knapsack solved by Lagrangian relaxation, then
greedily topped up.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
from tqdm.auto import tqdm

from jaxcomp.errors import JaxcompError

# Sizes tried per matrix, as fractions of its dense parameter count.
CANDIDATE_RATIOS = (0.04, 0.08, 0.15, 0.25, 0.4, 0.6)


@dataclasses.dataclass
class MatrixProfile:
    """One matrix: dense size and ``(knob, params, relative_error)`` per candidate size."""

    shape: tuple[int, int]
    candidates: list[tuple[int, int, float]]
    probe_error: float | None = None

    @property
    def dense_params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclasses.dataclass
class Profile:
    """A sensitivity profile and the allocation made from it.

    Attributes:
      method: factorization method name.
      metric: ``uniform``, ``weight_error``, ``output_error`` or ``fisher``.
      probe_ratio: the size at which ``probe_error`` is reported.
      matrices: path -> :class:`MatrixProfile`.
      allocation: path -> knob value, or ``None`` for a matrix left dense.
      budget: parameters asked to be removed; ``removed``: parameters the allocation removes.
    """

    method: str
    metric: str
    probe_ratio: float
    matrices: dict[str, MatrixProfile]
    allocation: dict[str, int | None]
    budget: int
    removed: int

    def to_json(self) -> dict:
        return {"method": self.method, "metric": self.metric, "probe_ratio": self.probe_ratio,
                "budget_params": self.budget, "removed_params": self.removed,
                "matrices": {p: {"shape": list(m.shape), "probe_error": m.probe_error,
                                 "allocated": self.allocation.get(p),
                                 "candidates": [list(c) for c in m.candidates]}
                             for p, m in self.matrices.items()}}

    def depth_trend(self) -> float | None:
        """Spearman correlation of probe error with layer index (< 0: deeper layers tolerate
        more compression, CompactifAI's observation)."""
        pairs = [(_layer_index(p), m.probe_error) for p, m in self.matrices.items()
                 if m.probe_error is not None and _layer_index(p) is not None]
        if len(pairs) < 3:
            return None
        layer, err = (np.argsort(np.argsort(np.asarray(v, float)))
                      for v in zip(*pairs, strict=True))
        return float(np.corrcoef(layer, err)[0, 1])

    def save(self, out_dir: str) -> list[str]:
        """Writes ``sensitivity.json`` and, with errors measured, ``sensitivity.png``."""
        import os

        written = [os.path.join(out_dir, "sensitivity.json")]
        with open(written[0], "w") as f:
            json.dump({**self.to_json(), "depth_trend": self.depth_trend()}, f, indent=1)
        if self.metric != "uniform":
            written.append(os.path.join(out_dir, "sensitivity.png"))
            plot_profile(self, written[-1])
        return written


def _layer_index(path: str) -> int | None:
    m = re.search(r"(?:^|/)(?:layers|h)_(\d+)/", path)
    return int(m.group(1)) if m else None


def _matrix_kind(path: str) -> str:
    parts = path.split("/")
    return parts[-2] if len(parts) >= 2 else path


def plot_profile(profile: Profile, png_path: str) -> None:
    """Probe error against layer index, one line per matrix kind, plus the allocation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    kinds: dict[str, list] = {}
    for p, m in profile.matrices.items():
        if _layer_index(p) is not None:
            kept = profile.allocation.get(p)
            params = m.dense_params if kept is None else \
                next(c[1] for c in m.candidates if c[0] == kept)
            kinds.setdefault(_matrix_kind(p), []).append(
                (_layer_index(p), m.probe_error, params / m.dense_params))
    for kind, rows in sorted(kinds.items()):
        rows.sort()
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", ms=3, label=kind)
        ax2.plot([r[0] for r in rows], [r[2] for r in rows], marker="o", ms=3, label=kind)
    ax.set(xlabel="layer", ylabel=("Fisher-weighted error" if profile.metric == "fisher" else
                                   f"relative {profile.metric.replace('_', ' ')}"),
           title=f"{profile.method}: sensitivity at {profile.probe_ratio:.0%} of parameters")
    if profile.metric == "fisher":  # not relative: spans orders of magnitude
        ax.set_yscale("log")
    ax2.set(xlabel="layer", ylabel="fraction of parameters kept",
            title=f"allocation: {profile.removed:,} parameters removed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def allocate(matrices: dict[str, MatrixProfile], budget: int) -> dict[str, int | None]:
    """Picks a candidate (or dense) per matrix removing >= ``budget`` parameters with the
    smallest summed squared error.

    Returns:
      path -> knob value of the chosen candidate, ``None`` for dense.

    Raises:
      JaxcompError: when even the smallest candidates remove fewer than ``budget``.
    """
    options = {p: [(None, m.dense_params, 0.0)] + list(m.candidates) for p, m in matrices.items()}
    most = sum(m.dense_params - min(c[1] for c in m.candidates) for m in matrices.values()
               if m.candidates)
    if most < budget:
        raise JaxcompError(f"target cannot be met: the selected matrices can lose at most "
                           f"{most:,} parameters at the smallest size tried, {budget:,} asked")

    def pick(lam):  # per matrix, minimize error^2 + lam * params
        return {p: min(opts, key=lambda o: (o[2] ** 2 + lam * o[1], o[1]))
                for p, opts in options.items()}

    def removed(choice):
        return sum(matrices[p].dense_params - o[1] for p, o in choice.items())

    lo, hi = 0.0, 1.0
    while removed(pick(hi)) < budget:
        hi *= 4
    for _ in range(60):  # the smallest price on parameters that meets the budget
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if removed(pick(mid)) >= budget else (mid, hi)
    choice = pick(hi)
    # Spend the slack: upgrade where error drops most per parameter, keeping the budget met.
    slack = removed(choice) - budget
    while True:
        best = None
        for p, (_knob, params, err) in choice.items():
            for o in options[p]:
                extra = o[1] - params
                if 0 < extra <= slack and o[2] < err:
                    gain = (err ** 2 - o[2] ** 2) / extra
                    if best is None or gain > best[0]:
                        best = (gain, p, o)
        if best is None:
            break
        _, p, o = best
        slack -= o[1] - choice[p][1]
        choice[p] = o
    return {p: o[0] for p, o in choice.items()}


def uniform_allocation(method, mats: dict, args: dict, budget: int
                       ) -> tuple[dict[str, MatrixProfile], dict[str, int]]:
    """One parameter ratio for every matrix: the largest that removes ``budget``."""

    def sizes(ratio):
        out = {}
        for p, w in mats.items():
            target = max(1, int(ratio * w.size))
            try:
                knob = method.knob_for_params(w.shape, target, p, **args[p])
            except JaxcompError:  # this matrix cannot get that small: its smallest size
                knob = method.knob_range(w.shape, **args[p])[0]
            out[p] = (knob, method.params(w.shape, knob, **args[p]))
        return out

    def removed(s):
        return sum(mats[p].size - s[p][1] for p in s)

    if removed(sizes(0.0)) < budget:
        raise JaxcompError(f"target cannot be met: the selected matrices can lose at most "
                           f"{removed(sizes(0.0)):,} parameters, {budget:,} asked")
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(sizes(mid)) >= budget else (lo, mid)
    chosen = sizes(lo)
    profiles = {p: MatrixProfile(tuple(w.shape), [(k, n, float("nan"))])
                for p, (w, (k, n)) in ((p, (mats[p], chosen[p])) for p in mats)}
    return profiles, {p: k for p, (k, _) in chosen.items()}


def profile_and_allocate(method, mats: dict, args: dict, budget: int, metric: str,
                         probe_ratio: float, stats=None, progress=None, fisher=None) -> Profile:
    """Measures each matrix's sensitivity (unless ``metric="uniform"``) and allocates.

    Args:
      method: a :class:`jaxcomp.tensornet.transform.Method`.
      mats: path -> ``(m, n)`` weights of the selected matrices.
      args: path -> the method's options for that matrix.
      budget: parameters to remove.
      metric: ``uniform``, ``weight_error``, ``output_error`` or ``fisher``.
      probe_ratio: size at which the profile is reported.
      stats: path -> :class:`jaxcomp.calib.InputStats` (for ``output_error``).
      progress: progress bar.
      fisher: path -> the matrix's diagonal Fisher (for ``fisher``).

    Returns:
      The :class:`Profile` with its allocation.
    """
    import sys

    if metric == "uniform":
        profiles, allocation = uniform_allocation(method, mats, args, budget)
    else:
        ratios = sorted(set(CANDIDATE_RATIOS) | {probe_ratio})
        profiles = {}
        show = sys.stderr.isatty() if progress is None else progress
        for p, w in tqdm(mats.items(), desc=f"sensitivity ({method.name})", disable=not show,
                         leave=False):
            w64 = np.asarray(w, np.float64)
            stat = None if stats is None else stats.get(p)
            if metric == "output_error" and stat is None:
                raise JaxcompError(f"{p}: no calibration statistics for this matrix")
            if metric == "fisher" and (fisher is None or p not in fisher):
                raise JaxcompError(f"{p}: no Fisher diagonal for this matrix")
            errors, candidates, probe_error = {}, [], None
            # the profile tries the unrefined fit (refinement only runs on the final sizes)
            opts = {k: v for k, v in args[p].items()
                    if k not in (method.knob, method.refine_option)}
            for ratio in ratios:
                try:
                    knob = method.knob_for_params(w.shape, int(ratio * w.size), p, **opts)
                except JaxcompError:
                    continue  # this matrix cannot get that small
                if knob not in errors:
                    leaf, _ = method.fit(w, knob, stat, p, **opts)
                    approx = np.asarray(leaf.materialize(), np.float64)
                    if metric == "output_error":
                        errors[knob] = stat.output_error(w64, approx)
                    elif metric == "fisher":
                        errors[knob] = float(np.sqrt(np.sum(fisher[p] * (w64 - approx) ** 2)))
                    else:
                        errors[knob] = float(np.linalg.norm(w64 - approx) / np.linalg.norm(w64))
                    n = method.params(w.shape, knob, **opts)
                    if n < w.size:
                        candidates.append((knob, n, errors[knob]))
                if ratio == probe_ratio:
                    probe_error = errors[knob]
            profiles[p] = MatrixProfile(tuple(w.shape), candidates, probe_error)
        allocation = allocate(profiles, budget)
    removed = sum(profiles[p].dense_params - (profiles[p].dense_params if k is None else
                                               next(c[1] for c in profiles[p].candidates
                                                    if c[0] == k))
                  for p, k in allocation.items())
    return Profile(method.name, metric, probe_ratio, profiles, allocation, budget, removed)
