"""Sufficient statistics per (group, layer, neuron), from one streaming pass over a store.

``moments``
    :class:`Moments` / :class:`GroupStats`, the one container of counts, sums, sums of squares and
    counts of activation > 0 (mergeable);
``grouping``
    :class:`Grouping`: which group every example belongs to (``by``, ``where``, ``contrast``, mask);
``halves``
    :func:`split_halves` for split-half stability;
``reading``
    tasks, the group of every row, the prefetching reader and the read counter;
``passes``
    :func:`compute_stats`, :func:`compute_split_stats` and the one cached pass they share;
``auroc``
    :func:`compute_auroc`, exact AUROC from histograms;
``dask``
    the same reduction mapped over a Dask distributed cluster.

Every pass reads through the store's statistics cache (``stats/<key>/``): a second scoring method
on the same grouping reads no activations.
"""

from .auroc import HIST_BINS, AurocResult, auroc_from_histograms, compute_auroc, grouping_auroc
from .grouping import STATS_VERSION, Grouping, make_grouping, normalise_contrast, normalise_where
from .halves import item_stem, split_halves
from .moments import GroupStats, Moments, targets
from .passes import (
    compute_split_stats,
    compute_stats,
    cpu_count,
    grouping_stats,
    plan_workers,
    split_grouping_stats,
)
from .reading import ReadCounter, read_counter

__all__ = [
    "HIST_BINS",
    "STATS_VERSION",
    "AurocResult",
    "GroupStats",
    "Grouping",
    "Moments",
    "ReadCounter",
    "auroc_from_histograms",
    "compute_auroc",
    "compute_split_stats",
    "compute_stats",
    "cpu_count",
    "grouping_auroc",
    "grouping_stats",
    "item_stem",
    "make_grouping",
    "normalise_contrast",
    "normalise_where",
    "plan_workers",
    "read_counter",
    "split_grouping_stats",
    "split_halves",
    "targets",
]
