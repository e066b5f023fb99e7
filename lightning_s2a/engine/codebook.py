"""Derivative-aware codebooks: the optimal piecewise-constant approximation of f'.

For an elementwise op whose backward is ``grad * d(s)`` (``s`` the saved tensor), a k-bit code
splits the real line into ``2**k`` intervals and stores, per element, which interval ``s`` is in.
The intervals and each interval's value are chosen to minimise ``E[(d(s) - value)^2]`` over the
data, by dynamic programming over equal-mass cells of a sample of ``s``. Unpack returns, per
interval, a point ``s~`` with ``d(s~)`` equal to the interval's optimal value, so autograd's own
backward formula computes exactly the approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .ops import Derivative


@dataclass
class Codebook:
    """Interval boundaries (ascending, ``levels - 1`` of them) and one point per interval."""

    boundaries: torch.Tensor  # float64, shape (levels - 1,)
    points: torch.Tensor  # float64, shape (levels,): s~ with d(s~) = values
    values: torch.Tensor  # float64, shape (levels,): the optimal derivative per interval
    bits: int
    fitted_at: int = 0
    #: The forward of the call site's first fit: refits come 1, 2, 4, ... forwards after it,
    #: then every ``codebook_refresh`` (see :meth:`due`).
    first_fit: int = 0
    #: The central ``1 - 2 * DRIFT_TAIL`` of the fit's samples: a tensor with far more than
    #: that outside has moved from what the codes were fitted to (see :func:`drifted`).
    lo: float = -math.inf
    hi: float = math.inf
    #: The fit's samples (not saved): a refit for drift fits on half of them and half of the
    #: new ones, so a site that sees two distributions in turn settles on codes for both.
    sample: torch.Tensor | None = None

    def due(self, step: int, refresh: int) -> bool:
        """True if the codebook should be fitted again at forward ``step``: the interval
        between fits doubles from one forward up to ``refresh``, so a first forward on
        untypical data (a shape check with autograd on, a blank batch) shapes the codes for a
        forward, not for ``refresh`` of them."""
        interval = min(refresh, max(1, self.fitted_at - self.first_fit))
        return step - self.fitted_at >= interval

    def to(self, device: torch.device, dtype: torch.dtype) -> DeviceCodebook:
        """Boundaries (float32) and points (``dtype``) on ``device``, with their interval grid."""
        boundaries = self.boundaries.to(device=device, dtype=torch.float32)
        points = points_inside(self.points, self.boundaries, dtype)
        return DeviceCodebook(boundaries, points.to(device), IntervalGrid.build(boundaries))


def points_inside(
    points: torch.Tensor, boundaries: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``points`` (float64) in ``dtype``, each moved back into its own interval
    ``(boundaries[i - 1], boundaries[i]]`` where rounding took it out, as near as ``dtype``
    allows. A point just past a jump of the derivative could round onto it: SELU's point
    4e-10 became 0 in float16, whose derivative is the other branch's (1.758 for 1.0507; a
    reviewer's bias gradient 29% off at 4 bits, until 2026-12-07). The 1-bit masks check the
    same (``quantizers._decodes_to_its_side``)."""
    cast = points.to(dtype, copy=True)  # (float64: not the codebook's own points)
    edges = [-math.inf, *boundaries.tolist(), math.inf]
    for i, value in enumerate(cast.double().tolist()):
        lo, hi = edges[i], edges[i + 1]
        if lo < value <= hi or not lo < hi:
            continue
        # From the edge it crossed, in dtype, one step at a time into the interval (the
        # edge's own rounding is within a step of it, so two steps at most).
        up = value <= lo
        p = torch.tensor(lo if up else hi, dtype=torch.float64).to(dtype)
        toward = torch.tensor(math.inf if up else -math.inf, dtype=dtype)
        for _ in range(2):
            if lo < float(p) <= hi or not math.isfinite(float(p)):
                break
            p = torch.nextafter(p, toward)
        if lo < float(p) <= hi and math.isfinite(float(p)):
            cast[i] = p  # else the interval holds no value of dtype: left as rounded
    return cast


class DeviceCodebook(NamedTuple):
    """A codebook ready to encode and decode on one device."""

    boundaries: torch.Tensor  # float32, ascending
    points: torch.Tensor  # in the saved tensor's dtype
    grid: IntervalGrid | None = None  # the fast exact interval search, where one exists


#: Share of a fit's samples below ``lo`` and above ``hi`` each.
DRIFT_TAIL = 0.005
#: Elements read (at random positions) to check a tensor against its codebook's range.
DRIFT_SAMPLES = 1024
#: A tensor with more than this share of its checked elements outside ``[lo, hi]`` (five
#: times the fit's own 1%) has drifted: its codebook is fitted again at the site's next call.
DRIFT_SHARE = 0.05
#: A tensor whose checked elements span less than this share of ``[lo, hi]`` has drifted
#: inward: it falls into a few of the codebook's intervals.
SHRINK_SHARE = 1 / 8
#: Forwards a site's codebook keeps at least before it is fitted again for drifting inward:
#: two distributions in turn (one inside the other) would otherwise refit it at every call.
SHRINK_EVERY = 64


def drifted(t: torch.Tensor, cb: Codebook, idx: torch.Tensor, inward: bool = False) -> torch.Tensor:
    """True (a bool tensor on ``t``'s device, not read here) where ``t`` has drifted out of
    the range ``cb`` was fitted on: its end intervals, which run to infinity, give values far
    outside the fit the derivative at a point inside it (a tanh fitted at scale 0.1 and fed
    scale 3: gradient cosine 0.86 until the scheduled refit, up to 1000 forwards later).
    With ``inward``, also where ``t`` spans less than :data:`SHRINK_SHARE` of that range: a
    few intervals then code it all (a GELU fitted at scale 10 and fed 0.1: its bias gradient
    23% off until the scheduled refit, against 3% freshly fitted; until 2026-12-07 unseen).
    ``idx`` are the flat positions checked, random (see :func:`check_positions`)."""
    checked = t.detach().reshape(-1)[idx]
    out = outside_range(checked, cb)
    if inward and checked.numel():
        low, high = torch.aminmax(checked)
        out.logical_or_((high - low) < SHRINK_SHARE * (cb.hi - cb.lo))
    return out


def outside_range(values: torch.Tensor, cb: Codebook) -> torch.Tensor:
    """True (a bool tensor on ``values``' device) where more than :data:`DRIFT_SHARE` of
    ``values`` lie outside the range ``cb`` was fitted on."""
    return ((values < cb.lo) | (values > cb.hi)).sum() > DRIFT_SHARE * values.numel()


def check_positions(numel: int, seed: int, device: torch.device) -> torch.Tensor:
    """:data:`DRIFT_SAMPLES` random flat positions of a tensor of ``numel`` elements, drawn
    like the fit's samples. Evenly spaced ones lined up with the channels (a stride that is
    a multiple of the width read one channel only), and one outlying channel refitted the
    codes at every forward."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(numel, (min(DRIFT_SAMPLES, numel),), generator=gen).to(device)


#: Below this many elements one ``torch.bucketize`` is cheaper than the grid's nine ops (CPU).
GRID_MIN_NUMEL = 2048


@dataclass(frozen=True)
class IntervalGrid:
    """Uniform cells over the finite boundaries, so that the interval search is a few
    elementwise passes and two table lookups instead of a binary search per element.

    The cells are at most a quarter of the smallest gap between boundaries wide. ``base[j]``
    counts the boundaries below cell ``j - 1``'s lower edge, and ``next_boundary[j]`` is the
    boundary after those. An element that lands in cell ``j`` (give or take the rounding of its
    cell index, far below one cell) lies within cells ``j - 1`` to ``j + 1``, a window that
    holds at most one boundary: that one. Its interval is ``base[j] + (x > next_boundary[j])``,
    exactly :func:`torch.bucketize`'s answer. Boundaries that would need more than ``max_cells``
    cells (a gap under about ``4 / max_cells`` of their span) have no grid, and are searched
    with :func:`torch.bucketize`.
    """

    lo: float
    inv_width: float
    cells: int
    base: torch.Tensor  # uint8, (cells,)
    next_boundary: torch.Tensor  # float32, (cells,)

    @staticmethod
    def build(boundaries: torch.Tensor, max_cells: int = 4096) -> IntervalGrid | None:
        """The grid for ``boundaries`` (ascending float32, trailing infinities allowed), or
        None where their gaps are too uneven for ``max_cells`` cells."""
        b = boundaries.detach().to(device="cpu", dtype=torch.float64)
        finite = b[torch.isfinite(b)]
        if finite.numel() < 2 or not torch.equal(finite, b[: finite.numel()]):
            return None
        gap = float((finite[1:] - finite[:-1]).min())
        lo, span = float(finite[0]), float(finite[-1] - finite[0])
        if not gap > 0 or span / gap * 4 + 2 > max_cells:
            return None
        width = gap / 4
        cells = math.ceil(span / width) + 2
        lower = lo + (torch.arange(cells, dtype=torch.float64) - 1) * width
        base = (finite.unsqueeze(0) < lower.unsqueeze(1)).sum(1)
        ends = torch.cat([b.float(), torch.tensor([math.inf], dtype=torch.float32)])
        return IntervalGrid(
            lo=lo,
            inv_width=1.0 / width,
            cells=cells,
            base=base.to(torch.uint8).to(boundaries.device),
            next_boundary=ends[base].to(boundaries.device),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Interval index of every element of float32 ``x`` as ``uint8`` (a NaN gets some
        index: the engine keeps such tensors exact)."""
        cell = (x - self.lo).mul_(self.inv_width).clamp_(0, self.cells - 1).nan_to_num_(0.0)
        index = cell.to(torch.int32)  # truncation is floor here: cells are not negative
        codes = self.base.index_select(0, index)
        # The next boundaries, and then the comparison, reuse the two buffers just read: fresh
        # full-size tensors cost more than these passes on CPU.
        nxt = torch.index_select(self.next_boundary, 0, index, out=cell)
        above = torch.gt(x, nxt, out=index.view(torch.uint8)[: x.numel()].view(torch.bool))
        return codes.add_(above)


def _segment_costs(d_sorted: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Sum of squared deviations of ``d`` within cells ``edges[i]..edges[j]``, for all i < j
    (``inf`` elsewhere); computed in place, a full-size temporary per step cost more than the
    arithmetic."""
    zero = torch.zeros(1, dtype=torch.float64)
    c1 = torch.cat([zero, d_sorted.cumsum(0)])[edges]
    c2 = torch.cat([zero, (d_sorted * d_sorted).cumsum(0)])[edges]
    cnt = edges.double()
    n = (cnt[None, :] - cnt[:, None]).clamp_(min=1.0)
    s1 = c1[None, :] - c1[:, None]
    cost = (c2[None, :] - c2[:, None]).sub_(s1.mul_(s1).div_(n)).clamp_(min=0.0)
    idx = torch.arange(len(edges))
    return cost.masked_fill_(idx[None, :] <= idx[:, None], float("inf"))


def optimal_segments(
    d_sorted: torch.Tensor, levels: int, cells: int = 512, extra_edges: tuple[int, ...] = ()
) -> list[int]:
    """Cut positions (indices into the sorted samples) of the optimal ``levels``-piece split.

    Samples are grouped into ``cells`` equal-mass cells, plus cells ending at
    ``extra_edges`` (where the derivative jumps); the DP over cell edges is
    ``O(levels * cells^2)``, vectorised, a few milliseconds on CPU.
    """
    n = d_sorted.numel()
    cells = max(1, min(cells, n))
    edges = torch.linspace(0, n, cells + 1).round().long()
    if extra_edges:
        edges = torch.cat([edges, torch.tensor(extra_edges, dtype=torch.long)])
    edges = torch.unique(edges)
    cost = _segment_costs(d_sorted, edges)
    g = len(edges) - 1
    best = cost[0].clone()
    back: list[torch.Tensor] = []
    # Row j of the transpose holds the costs of the cells ending at edge j: each step's
    # minimum runs along contiguous rows (down the columns it was 4 times slower on CPU).
    cost_t = cost.t().contiguous()
    total = torch.empty_like(cost_t)
    for _ in range(1, min(levels, g)):
        best, arg = torch.add(cost_t, best, out=total).min(dim=1)
        back.append(arg)
    cuts = []
    j = g
    for arg in reversed(back):
        j = int(arg[j])
        cuts.append(j)
    return sorted({int(edges[c]) for c in cuts if 0 < c < g})


def _solve_point(deriv: Derivative, target: float, lo: float, hi: float) -> float:
    """A point in ``[lo, hi]`` whose derivative is closest to ``target`` (see
    :func:`_solve_points`, which solves every interval of a codebook at once)."""
    return _solve_points(deriv, [target], [lo], [hi])[0]


def _solve_points(
    deriv: Derivative, targets: list[float], lows: list[float], highs: list[float]
) -> list[float]:
    """For each interval ``[lows[k], highs[k]]``, a point whose derivative is closest to
    ``targets[k]`` (bisection-refined), all intervals in the same tensor ops.

    A sign change of ``deriv - target`` between two grid points is a root only where the
    derivative is continuous: across a jump, bisection closes in on the jump itself, whose
    derivative may lie on the far side (Hardswish's 1.5 at 3 for an interval above 3, where
    it is 1). So a refined point is kept only if it beats the grid's best. Solved one interval
    and one bisection step at a time, a 4-bit GELU fit made about 2,000 scalar derivative
    calls: two thirds of the fit's time, on the host, at every refit of every site.
    """
    steps = _SOLVE_GRID
    grids = torch.stack(
        [
            torch.linspace(lo, max(hi, lo), steps, dtype=torch.float64)
            for lo, hi in zip(lows, highs, strict=True)
        ]
    )
    target = torch.tensor(targets, dtype=torch.float64)
    err = deriv(grids) - target[:, None]
    i = err.abs().argmin(dim=1)
    rows = torch.arange(len(targets))
    best = grids[rows, i].tolist()
    best_err = err[rows, i].abs().tolist()
    # Brackets: the grid intervals beside the best point (left one first) with a sign change.
    owner, left = [], []
    e = err.tolist()
    for k, ik in enumerate(i.tolist()):
        if highs[k] <= lows[k]:
            continue
        for j in (ik - 1, ik):
            if 0 <= j < steps - 1 and e[k][j] * e[k][j + 1] < 0:
                owner.append(k)
                left.append(j)
    points = [lo if hi <= lo else b for lo, hi, b in zip(lows, highs, best, strict=True)]
    if not owner:
        return points
    own = torch.tensor(owner)
    at = torch.tensor(left)
    a, b = grids[own, at], grids[own, at + 1]
    fa = err[own, at]
    tgt = target[own]
    for _ in range(60):
        m = 0.5 * (a + b)
        fm = deriv(m) - tgt
        lower = fa * fm <= 0  # the root lies in [a, m]
        b = torch.where(lower, m, b)
        a = torch.where(lower, a, m)
        fa = torch.where(lower, fa, fm)
    m = 0.5 * (a + b)
    fm = (deriv(m) - tgt).abs()
    for k, mk, fk in zip(owner, m.tolist(), fm.tolist(), strict=True):
        if fk < best_err[k]:
            points[k], best_err[k] = mk, fk
    return points


#: Grid points per interval before bisection in :func:`_solve_points`.
_SOLVE_GRID = 2049


def fit_codebook(
    samples: torch.Tensor,
    deriv: Derivative,
    bits: int,
    cells: int = 512,
    jumps: tuple[float, ...] = (),
) -> Codebook:
    """Fit the optimal ``bits``-bit derivative code to ``samples`` of the saved tensor.

    ``jumps`` are where ``deriv`` is discontinuous: a cut may fall exactly there (the
    boundary is the jump itself, not a midpoint between samples), so that no interval holds
    elements from both sides of it.
    """
    levels = 1 << bits
    s = samples.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    s = s[torch.isfinite(s)]
    if s.numel() == 0:
        s = torch.zeros(1, dtype=torch.float64)
    s = s.sort().values
    d = deriv(s)
    # Cut c splits samples [.., c) from [c, ..): at a jump J, those <= J from those above, as
    # the interval search does (an element equal to a boundary counts below it).
    at_jump = {}
    for jump in jumps:
        c = int(torch.searchsorted(s, torch.tensor([jump], dtype=torch.float64), right=True))
        if 0 < c < s.numel():
            at_jump[c] = jump
    cuts = optimal_segments(d, levels, cells, tuple(at_jump))
    starts = [0, *cuts]
    ends = [*cuts, s.numel()]
    boundaries = [at_jump.get(c, 0.5 * (s[c - 1] + s[c]).item()) for c in cuts]
    lows = [s[0].item(), *boundaries]
    highs = [*boundaries, s[-1].item()]
    values = [d[a:b].mean().item() for a, b in zip(starts, ends, strict=True)]
    points = _solve_points(deriv, values, lows, highs)
    # Unused levels (fewer distinct cells than levels) repeat the last interval.
    while len(points) < levels:
        points.append(points[-1])
        values.append(values[-1])
        boundaries.append(float("inf"))
    tail = int(DRIFT_TAIL * (s.numel() - 1))
    return Codebook(
        boundaries=torch.tensor(boundaries, dtype=torch.float64),
        points=torch.tensor(points, dtype=torch.float64),
        values=torch.tensor(values, dtype=torch.float64),
        bits=bits,
        lo=s[tail].item(),
        hi=s[s.numel() - 1 - tail].item(),
    )


def encode(
    x: torch.Tensor, boundaries: torch.Tensor, grid: IntervalGrid | None = None
) -> torch.Tensor:
    """Interval index of every element of ``x`` (``boundaries`` ascending) as ``uint8``: the
    number of boundaries below it, as ``torch.bucketize`` counts, through ``grid`` if given and
    ``x`` is large enough for its fixed cost of nine ops to pay off."""
    if grid is not None and x.numel() >= GRID_MIN_NUMEL:
        return grid.encode(x.float())
    return torch.bucketize(x.float(), boundaries, out_int32=True).to(torch.uint8)
