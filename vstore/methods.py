"""The one table of scoring methods: name -> function, what it needs, how its scores rank.

Everything that lists or dispatches methods reads :data:`METHODS`: :func:`score`, ``vstore rank``
(which statistics to compute), the command line's ``--method`` choices and help, and the method
table of ``docs/rank.md`` (a test keeps the page and the table in step). A new method is one
function in :mod:`vstore.scoring` and one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from . import scoring
from .errors import UsageError
from .scoring import Scores
from .stats import AurocResult, GroupStats

__all__ = ["ALIASES", "METHODS", "Method", "canonical_method", "get_method", "method_choices", "score"]

Needs = Literal["moments", "histogram", "none"]


@dataclass(frozen=True)
class Method:
    """One scoring method.

    Attributes
    ----------
    name
        Canonical name (``--method``).
    needs
        What it is computed from: ``moments`` (the cached sufficient statistics), ``histogram``
        (the AUROC histogram passes) or ``none`` (only the shape: ``random``).
    lower_is_better
        Smaller scores rank first (vape's entropy).
    centre
        The "no effect" score; ``by_abs`` ranks by ``|score - centre|``.
    contrast
        Whether it can compare the two sides of a contrast.
    summary
        One line for ``--help`` and the docs.
    site
        The store site the method ranks when none is asked for (``attribution``: ``attr``); None:
        the store's first site.
    """

    name: str
    needs: Needs
    lower_is_better: bool
    centre: float
    contrast: bool
    summary: str
    fn: Callable[[GroupStats], Scores] | None = None
    site: str | None = None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("vape", "moments", True, 0.0, False,
           "LAPE's entropy of activation probabilities over the groups (the paper's VAPE)", scoring.vape),
    Method("prob-diff", "moments", False, 0.0, True, "P(act > 0 | group) - P(act > 0 | rest)", scoring.prob_diff),
    Method("mean", "moments", False, 0.0, True, "mean(group) (with a contrast: of side a)", scoring.group_mean),
    Method("attribution", "moments", True, 0.0, True,
           "mean attribution per group on the attr site (mean, most negative first: zeroing lowers the margin)",
           scoring.group_mean, site="attr"),
    Method("mean-diff", "moments", False, 0.0, True, "mean(group) - mean(rest)", scoring.mean_diff),
    Method("cohen-d", "moments", False, 0.0, True, "mean difference over the pooled standard deviation",
           scoring.cohen_d),
    Method("welch-t", "moments", False, 0.0, True, "Welch's t (unequal variances), with df and p", scoring.welch_t),
    Method("auroc", "histogram", False, 0.5, True, "exact Mann-Whitney AUROC of group vs rest"),
    Method("probeless", "moments", False, 0.0, True, "NeuroX probeless: sum of |mean_g - mean_j| over groups",
           scoring.probeless),
    Method("random", "none", False, 0.5, True, "seeded uniform scores: the control"),
)}

#: Other names accepted for a method.
ALIASES: dict[str, str] = {"lape": "vape"}


def method_choices() -> list[str]:
    """Every accepted ``method`` name: the canonical ones, then the aliases."""
    return [*METHODS, *ALIASES]


def canonical_method(name: str) -> str:
    """The method's canonical name (``lape`` -> ``vape``).

    Raises
    ------
    UsageError
        An unknown method.
    """
    m = ALIASES.get(name, name)
    if m not in METHODS:
        raise UsageError(f"method: expected one of {', '.join(method_choices())}, got {name!r}", "method")
    return m


def get_method(name: str) -> Method:
    """The :class:`Method` of ``name`` (or an alias)."""
    return METHODS[canonical_method(name)]


def score(method: str, stats: GroupStats | None = None, *, auroc: AurocResult | None = None,
          target_names: Sequence[str] | None = None, layers: Sequence[int] | None = None,
          n_neurons: int | None = None, seed: int = 0) -> Scores:
    """Scores of ``method``: from statistics, from :func:`vstore.stats.compute_auroc`'s result
    (``auroc``), or, for ``random``, from the shape (targets, layers, neurons) and ``seed``.

    Raises
    ------
    UsageError
        An unknown method, or the input it needs is missing.
    """
    m = get_method(method)
    if m.needs == "none":
        if target_names is None or layers is None or n_neurons is None:
            if stats is None:
                raise UsageError("random scores need target_names, layers and n_neurons (or stats)",
                                 "target_names", "layers", "n_neurons")
            target_names = target_names or (stats.base or stats.groups)
            layers, n_neurons = stats.layers, stats.n_neurons
        sc = scoring.random_scores(target_names, layers, n_neurons, seed)
    elif m.needs == "histogram":
        if auroc is None:
            raise UsageError(f"{m.name} scores need compute_auroc's result (auroc=...)", "auroc")
        sc = scoring.auroc_scores(auroc)
    else:
        if stats is None or m.fn is None:
            raise UsageError(f"{m.name} needs statistics (stats=...)", "stats")
        sc = m.fn(stats)
        sc.method = m.name  # attribution shares mean's function
    sc.lower_is_better, sc.centre = m.lower_is_better, m.centre
    return sc
