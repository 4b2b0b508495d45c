"""The one container of sufficient statistics: :class:`Moments`, and :class:`GroupStats`, the same
arrays labelled with the grouping and the layers they describe.

Per group (and, with a leading layer axis, per layer) and neuron:

* ``count``     rows reduced (int64),
* ``sum``, ``sumsq``  of the finite activations (float64),
* ``npos``      rows with activation > 0 (int64),
* ``nonfinite`` per neuron, the NaN/Inf values left out (int64): the neuron's rows are
  ``count - nonfinite`` (:meth:`Moments.valid`).

That is all that activation probabilities, means, variances, Cohen's d and Welch's t need. The
statistics are mergeable exactly in the summation order of :mod:`vstore.kernels`, so parts,
threads, processes and Dask workers can each reduce a slice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import StoreError, VstoreError
from ..kernels import describe_array

__all__ = ["FIELDS", "GroupStats", "Moments", "targets"]

#: The arrays of a :class:`Moments`, in order.
FIELDS = ("count", "sum", "sumsq", "npos", "nonfinite")


@dataclass(eq=False)
class Moments:
    """Sufficient statistics per group and neuron, optionally with leading axes (e.g. layers).

    Attributes
    ----------
    count : numpy.ndarray
        int64 ``(..., G)``: rows per group.
    sum, sumsq : numpy.ndarray
        float64 ``(..., G, N)``: sum and sum of squares of the rows' finite values.
    npos : numpy.ndarray
        int64 ``(..., G, N)``: how many of them are > 0.
    nonfinite : numpy.ndarray
        int64 ``(..., G, N)``: values left out because they are NaN or +-Inf.
    """

    count: npt.NDArray[np.int64]
    sum: npt.NDArray[np.float64]
    sumsq: npt.NDArray[np.float64]
    npos: npt.NDArray[np.int64]
    nonfinite: npt.NDArray[np.int64]

    @classmethod
    def zeros(cls, n_groups: int, n_neurons: int) -> Moments:
        """Empty statistics of shape ``(G, N)`` (one layer).

        Raises
        ------
        StoreError
            A negative size.
        """
        if n_groups < 0 or n_neurons < 0:
            raise StoreError(f"Moments.zeros: expected n_groups, n_neurons >= 0, got ({n_groups}, {n_neurons})")
        a = _zero_arrays((), n_groups, n_neurons)
        return cls(a["count"], a["sum"], a["sumsq"], a["npos"], a["nonfinite"])

    @property
    def n_groups(self) -> int:
        """Number of groups G."""
        return int(self.count.shape[-1])

    @property
    def n_neurons(self) -> int:
        """Number of neurons N."""
        return int(self.sum.shape[-1])

    def arrays(self) -> dict[str, np.ndarray]:
        """The five arrays by name."""
        return {k: getattr(self, k) for k in FIELDS}

    def layer(self, index: int) -> Moments:
        """The statistics of one position of the leading axis, as views (writes go through)."""
        return Moments(self.count[index], self.sum[index], self.sumsq[index], self.npos[index], self.nonfinite[index])

    def validate(self) -> None:
        """Checks dtypes, shapes, C order and writability of the arrays.

        Raises
        ------
        StoreError
            Naming the array, what was expected and what was got.
        """
        if not isinstance(self.count, np.ndarray) or self.count.ndim < 1:
            raise StoreError(f"Moments.count: expected an int64 array (..., groups), got {describe_array(self.count)}")
        if not isinstance(self.sum, np.ndarray) or self.sum.ndim != self.count.ndim + 1:
            raise StoreError(f"Moments.sum: expected a float64 array (..., groups, neurons), got {describe_array(self.sum)}")
        lead_g = self.count.shape
        full = (*lead_g, self.sum.shape[-1])
        expected = {"count": (lead_g, np.int64), "sum": (full, np.float64), "sumsq": (full, np.float64),
                    "npos": (full, np.int64), "nonfinite": (full, np.int64)}
        for name, (shape, dtype) in expected.items():
            a = getattr(self, name)
            if (not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != np.dtype(dtype)
                    or not a.flags.c_contiguous or not a.flags.writeable):
                raise StoreError(f"Moments.{name}: expected a writable C-contiguous {np.dtype(dtype)} array of shape "
                                 f"{shape}, got {describe_array(a)}")

    def merge(self, other: Moments) -> None:
        """Adds ``other`` into these statistics, in place.

        Exact in the sense of the kernels' summation order: accumulating block B into statistics
        holding block A gives the same bits as accumulating A and B separately and merging.

        Raises
        ------
        StoreError
            The shapes differ or an array is malformed.
        """
        self.validate()
        other.validate()
        if other.sum.shape != self.sum.shape:
            want = ", ".join(map(str, self.sum.shape[:-2]))
            lead = f"({want}) x " if want else ""
            raise StoreError(
                f"Moments.merge: expected {lead}(groups, neurons) = ({self.n_groups}, {self.n_neurons}), "
                f"got ({other.n_groups}, {other.n_neurons})"
            )
        for k in FIELDS:
            getattr(self, k)[...] += getattr(other, k)

    def valid(self) -> npt.NDArray[np.int64]:
        """Rows with a finite value, per group and neuron (``count - nonfinite``)."""
        return self.count[..., None] - self.nonfinite

    def mean(self) -> npt.NDArray[np.float64]:
        """Mean activation per group and neuron; NaN where a group has no (finite) rows."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.sum / self.valid()

    def var(self, ddof: int = 1) -> npt.NDArray[np.float64]:
        """Variance with ``ddof`` (1: unbiased); NaN where a group has <= ddof (finite) rows."""
        n = self.valid().astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ss = self.sumsq - self.sum * self.sum / n
            v = np.maximum(ss, 0.0) / (n - ddof)
        return np.where(n > ddof, v, np.nan)

    def prob(self) -> npt.NDArray[np.float64]:
        """Activation probability P(activation > 0); 0 where a group has no (finite) rows."""
        n = self.valid()
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(n > 0, self.npos / np.maximum(n, 1), 0.0)


def _zero_arrays(lead: tuple[int, ...], n_groups: int, n_neurons: int) -> dict[str, np.ndarray]:
    g, full = (*lead, n_groups), (*lead, n_groups, n_neurons)
    return {"count": np.zeros(g, np.int64), "sum": np.zeros(full, np.float64), "sumsq": np.zeros(full, np.float64),
            "npos": np.zeros(full, np.int64), "nonfinite": np.zeros(full, np.int64)}


@dataclass(eq=False)
class GroupStats(Moments):
    """:class:`Moments` of every layer of a store, ``(L, G)`` / ``(L, G, N)``, with what they describe.

    Attributes
    ----------
    groups
        Group names (``G``). With a contrast, ``<base>|<side>`` for every base group and side.
    layers
        Model layer index of each layer position (``L``).
    key
        Cache key (grouping, filter, example subset and committed rows).
    base, sides
        The base groups (label categories, or ``["all"]``) and the contrast sides (or None).
    spec
        The grouping as JSON (by, where, contrast, mask, committed).
    from_cache, chunks_read, bytes_read, seconds
        Where the statistics came from and what computing them read.
    skipped
        Damaged chunks left out (``skip_damaged``): ``(part, layer position, first row, end row)``.
    """

    groups: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    key: str = ""
    base: list[str] = field(default_factory=list)
    sides: list[str] | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    from_cache: bool = False
    chunks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, int, int, int]] = field(default_factory=list)

    @classmethod
    def for_groups(cls, groups: Sequence[str], layers: Sequence[int], n_neurons: int, key: str = "") -> GroupStats:
        """Empty statistics (all counts and sums zero) of these groups and layers."""
        a = _zero_arrays((len(layers),), len(groups), int(n_neurons))
        return cls(a["count"], a["sum"], a["sumsq"], a["npos"], a["nonfinite"], groups=list(groups),
                   layers=[int(x) for x in layers], key=key, base=list(groups))

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def copy(self) -> GroupStats:
        """A deep copy of the arrays, with the same labels."""
        return GroupStats(self.count.copy(), self.sum.copy(), self.sumsq.copy(), self.npos.copy(),
                          self.nonfinite.copy(), groups=list(self.groups),
                          layers=list(self.layers), key=self.key, base=list(self.base),
                          sides=list(self.sides) if self.sides else None, spec=dict(self.spec))

    def merge(self, other: Moments) -> None:
        """Add ``other`` (same groups, layers and neurons) into these statistics, in place."""
        if isinstance(other, GroupStats) and (other.groups != self.groups or other.layers != self.layers):
            raise VstoreError(
                f"cannot merge statistics of groups {other.groups} / layers {other.layers} / shape "
                f"{other.sum.shape} into groups {self.groups} / layers {self.layers} / shape {self.sum.shape}"
            )
        super().merge(other)
        if isinstance(other, GroupStats):
            self.chunks_read += other.chunks_read
            self.bytes_read += other.bytes_read
            self.skipped += other.skipped

    def rows_per_group(self) -> dict[str, int]:
        """Rows per group (the largest count over layers)."""
        return {g: int(self.count[:, i].max(initial=0)) for i, g in enumerate(self.groups)}

    def target_rows(self) -> dict[str, int]:
        """Rows per target (both sides of a contrast together)."""
        per = self.rows_per_group()
        if not self.sides:
            return per
        return {b: sum(per[f"{b}|{s}"] for s in self.sides) for b in self.base}

    def nonfinite_per_layer(self) -> dict[int, int]:
        """NaN/Inf values left out, per model layer (only layers with any)."""
        return {lyr: int(n) for lyr, n in zip(self.layers, self.nonfinite.sum(axis=(1, 2)), strict=True) if n}


def targets(base: Sequence[str], sides: Sequence[str] | None) -> list[tuple[str, list[int], list[int] | None]]:
    """What each contrastive score compares: (target name, positive groups, negative groups).

    Without sides, base group ``g`` is compared with the rest (negative ``None``); with a contrast,
    the target ``g`` compares ``g|side_a`` (positive) with ``g|side_b`` (negative).
    """
    if not sides:
        return [(b, [i], None) for i, b in enumerate(base)]
    S = len(sides)
    return [(b, [i * S], [i * S + 1]) for i, b in enumerate(base)]
