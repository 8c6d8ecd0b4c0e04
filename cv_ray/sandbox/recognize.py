"""Parent-side op recognition: check the child's traced ops against the pixels, find what they miss.

``reconcile(input_image, result_image, traced_ops) -> (ops, to_input)`` runs in the trusted parent.
``traced_ops`` come from ``OpTracer.ops`` in the child, where the model's code could forge them, so
they are only hints:

1. **Sanitize** (``ops.sanitize_ops``): known names, finite bounded numbers, at most 64 entries.
2. **Hinted chains first.** The records' ``src``/``dst`` links give the lineage chain that ends at
   the last record (then at earlier ones). Its geometry is recomputed from the op parameters
   (``ops.chain_geometry``, never from numbers the child sent) and checked against the result:
   * *exact*: every pixel of the result equals the input seen through the chain's map (turns,
     flips, crops, fractional offsets included; also up to a BGR channel swap, and up to rounding
     when a colour input became a gray result). A 16 x 16 grid rejects most wrong maps first, but
     a match is only ever declared on the full comparison;
   * *close*: chains with a resize are compared at full resolution, pixel by pixel, with the
     input region resampled several ways (area or linear, nearest, and an exact affine warp for
     fractional regions): at most ``CLOSE_OUTLIERS`` of the result's pixels may differ by more
     than ``CLOSE_LEVELS`` from all of them, so the interpolation method does not matter but
     replaced pixels do;
   * *similar*: chains ending in photometric ops (contrast, blur, edges...) keep their geometry
     only if the low-resolution structure of the result (area-averaged over all its pixels)
     correlates with the input's view at least as well as with any other turn/flip of the region.
3. **Pixel search** when no hint verifies: the 8 turns/flips of the whole input (exact), then an
   exact sub-window search (crops of any turned/flipped view: a rare pixel of the result is located
   in the input, candidate placements are pruned with more rare pixels, survivors verified), then
   for a result of the input's size a turn/flip whose structure clearly fits a photometrically
   changed result. This finds ``np.array(img)[y1:y2, x1:x2].copy()``-style crops with no hints.

**Budget.** Everything the parent does here is bounded (``VerificationBudget``): a work budget in
pixel operations proportional to the images' size, and a wall-clock one. Running out marks every
op of the call ``unverified`` (and ``to_input`` None) instead of blocking the pool; the crafted
inputs that made the sub-window search quadratic cost at most the budget.

Ambiguity (symmetric or uniform images matching several placements): a verified hint wins; else
the simplest element (``ops.DIHEDRAL_SEQUENCES`` order, then the top-most, left-most placement),
and a crop whose placement is not unique is marked ``"ambiguous": True``.

Output ops use ``cv_ray.types.ExecResult.ops`` conventions: crop and pad boxes in the *input's*
pixel frame; ops recognized from pixels carry ``"via": "pixels"``; core ops of a hinted chain whose
result could not be checked against the pixels (e.g. turned then edge-detected beyond recognition)
are kept when the result's size agrees with the chain and carry ``"unverified": True``.
When the result is an exact view of the input, every photometric op is reported ``changed: False``
(except the gray conversion or channel swap the comparison itself had to allow for).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image

from cv_ray.geometry import IDENTITY, compose, map_box, translation
from cv_ray.sandbox.ops import (
    DIHEDRAL_SEQUENCES,
    GEOMETRIC_OPS,
    NON_CORE_OPS,
    canonical_ops,
    chain_geometry,
    dihedral_matrix,
    op_geometry,
    sanitize_ops,
    sequence_linear,
    split_axis_aligned,
    swaps_axes,
)
from cv_ray.types import CORE_OPS, Matrix3

#: Points per side of the sparse grid that rejects most wrong maps before the full comparison.
PRECHECK_GRID = 16
#: Longest side of the low-resolution images of the similar checks.
LOWRES_SIDE = 48
#: A resampled view matches when at most this fraction of the result's pixels differ by more than
#: ``CLOSE_LEVELS`` (any channel) from every reference resampling of the input region. Measured
#: on photos, text and a checkerboard, every PIL and OpenCV resampling filter at 0.13x-3.7x
#: (integer and fractional regions) stays under 1%; replacing 3% of the pixels with noise does not.
CLOSE_OUTLIERS = 0.03
CLOSE_LEVELS = 48
#: Work budget of one reconcile call, in pixel operations per pixel of the input and the result
#: (a full pass costs 1 per pixel; an honest call needs a few dozen passes at most).
WORK_PER_PIXEL = 64
#: Least work budget, for small images.
MIN_WORK = 1 << 21
#: Wall-clock budget of one reconcile call (a backstop on a loaded machine; the pool passes
#: ``sandbox.verify_budget_s``).
DEFAULT_BUDGET_S = 2.0
#: Least structure score for a photometric chain's geometry, and its allowed deficit to the best
#: other turn/flip of the same region (symmetric content scores alike).
SIMILAR_FLOOR = 0.3
SIMILAR_SLACK = 0.05
#: Least structure score to recognise a turn/flip of a photometrically changed result with no hint.
UNHINTED_FLOOR = 0.6
#: Hinted chains tried before the pixel search.
MAX_CHAINS = 4
#: Placements verified in full per orientation once the rare-pixel pruning stops narrowing.
MAX_VERIFIED_PLACEMENTS = 64
#: Result pixels considered as anchor/probes for the sub-window search (per side).
PROBE_GRID = 24

_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
#: Ops whose change a gray result or a channel swap already explains.
_COLOR_OPS = frozenset({"grayscale", "color_convert", "threshold", "edge_detection"})


class _OverBudget(Exception):
    """Raised inside reconcile when its budget is spent; reconcile reports the ops unverified."""


@dataclass
class VerificationBudget:
    """Time and work limits of one :func:`reconcile` call (the pool makes one per call)."""

    seconds: float | None = DEFAULT_BUDGET_S
    """Wall-clock budget; None: unlimited (tests that count work instead)."""
    work: int | None = None
    """Pixel operations allowed; None: ``WORK_PER_PIXEL`` per pixel of the input and the result."""
    spent: int = 0
    exhausted: bool = False
    """Set when the budget ran out (the call's ops were reported unverified)."""
    _deadline: float | None = field(default=None, repr=False)

    def start(self, pixels: int) -> None:
        if self.work is None:
            self.work = max(MIN_WORK, WORK_PER_PIXEL * pixels)
        if self.seconds is not None:
            self._deadline = time.monotonic() + self.seconds

    def spend(self, units: int) -> None:
        """Account for ``units`` pixel operations about to be done; raises _OverBudget past the budget."""
        self.spent += int(units)
        if (self.work is not None and self.spent > self.work) or (
                self._deadline is not None and time.monotonic() > self._deadline):
            self.exhausted = True
            raise _OverBudget


@dataclass
class _Pair:
    """The input and the result as uint8 arrays in one common mode (``L`` or ``RGB``)."""

    inp: np.ndarray
    """(H, W) or (H, W, 3)."""
    res: np.ndarray
    """(h, w) or (h, w, 3), same channel count as ``inp``."""
    inp_cv: np.ndarray
    """The same pixels laid out for OpenCV: ``inp`` itself, or the (H, W, 4) memory behind it."""
    res_cv: np.ndarray
    tol: int
    """Per-channel difference an exact match tolerates (gray conversions round differently)."""
    gray_result_of_color: bool
    """The result is gray but the input has colour: a gray conversion happened somewhere."""
    budget: VerificationBudget

    @property
    def input_size(self) -> tuple[int, int]:
        return self.inp.shape[1], self.inp.shape[0]

    @property
    def result_size(self) -> tuple[int, int]:
        return self.res.shape[1], self.res.shape[0]

    @property
    def channels(self) -> int:
        return 1 if self.inp.ndim == 2 else 3


@dataclass
class _Match:
    to_input: Matrix3
    exact: bool
    """Every pixel of the result is the input's view (up to ``_Pair.tol``)."""
    swapped_channels: bool = False
    ambiguous: bool = False


def reconcile(input_image: Image.Image, result_image: Image.Image, traced_ops: Any,
              budget: VerificationBudget | None = None) -> tuple[list[dict[str, Any]], Matrix3 | None]:
    """Verified ops of one sandbox call and the result->input map (None if not a geometric view).

    ``input_image``: what the code received; ``result_image``: what it produced; ``traced_ops``:
    the child's untrusted hints (``OpTracer.ops``), anything JSON-like. ``budget``: its limits
    (default: ``DEFAULT_BUDGET_S`` and the work budget); when they run out every op is reported
    ``unverified`` and ``budget.exhausted`` is set.
    """
    hints = sanitize_ops(traced_ops)
    budget = budget if budget is not None else VerificationBudget()
    budget.start(input_image.width * input_image.height + result_image.width * result_image.height)
    try:
        budget.spend(input_image.width * input_image.height + result_image.width * result_image.height)
        pair = _pair(input_image, result_image, budget)
        for chain in _hint_chains(hints):
            match = _verify_chain(pair, chain)
            if match is not None:
                return _report_chain(pair, chain, match), match.to_input
        match = _find_dihedral(pair) or _find_subwindow(pair) or _find_similar_dihedral(pair)
        if match is not None:
            return _report_found(pair, hints, match), match.to_input
        return _report_unmatched(pair, hints), None
    except _OverBudget:
        return _unverified_ops(hints, input_image.size), None


def unverified(traced_ops: Any) -> list[dict[str, Any]]:
    """The child's hints as ops, every one marked ``unverified`` (nothing checked against pixels)."""
    hints = sanitize_ops(traced_ops)
    return _unverified_ops(hints, None)


# -- pixels -------------------------------------------------------------------------------------


def _pair(input_image: Image.Image, result_image: Image.Image, budget: VerificationBudget) -> _Pair:
    input_gray, result_gray = input_image.mode in _GRAY_MODES, result_image.mode in _GRAY_MODES
    mode = "L" if input_gray or result_gray else "RGB"
    inp, inp_cv = _as_array(input_image if input_image.mode == mode else input_image.convert(mode))
    res, res_cv = _as_array(result_image if result_image.mode == mode else result_image.convert(mode))
    colored = mode == "L" and not input_gray and _has_color(_as_array(input_image.convert("RGB"))[0])
    return _Pair(inp, res, inp_cv, res_cv, tol=0 if mode == "RGB" or (input_gray and result_gray) else 2,
                 gray_result_of_color=colored, budget=budget)


def _as_array(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """An ``L`` / ``RGB`` image as an (H, W) / (H, W, 3) uint8 array and an OpenCV-ready twin,
    without copying where possible.

    Pillow exports single-block images through the Arrow C data interface, so the arrays read
    Pillow's own memory. RGB pixels are stored in 4 bytes there: the array is a ``[..., :3]`` view
    of the (H, W, 4) twin, which OpenCV reads without a copy (the fourth byte is ignored after
    resampling). Images too large for one memory block raise ``ValueError`` and are copied.
    """
    try:
        exported = pa.array(image)
    except ValueError:  # rows not contiguous in memory (several blocks): fall back to a copy
        array = np.asarray(image)
        return array, array
    if image.mode == "L":
        array = exported.to_numpy(zero_copy_only=True).reshape(image.height, image.width)
        return array, array
    padded = exported.values.to_numpy(zero_copy_only=True).reshape(image.height, image.width, -1)
    return padded[..., :3], padded


def _has_color(rgb: np.ndarray) -> bool:
    """Whether any pixel's channels differ by more than rounding (all pixels, never a sample)."""
    return bool(cv2.absdiff(rgb.max(axis=2), rgb.min(axis=2)).max() > 2)


def _grid(n: int, points: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, points)).round().astype(np.intp))


def _exact(pair: _Pair, to_input: Matrix3, res: np.ndarray | None = None) -> tuple[bool, bool] | None:
    """Whether every pixel of the result (or ``res``) equals the input seen through ``to_input``.

    Returns ``(matches, with_swapped_channels)`` or None when no result pixel lands inside the
    input (nothing to compare). Result pixel centres are mapped; pixels outside the input
    (padding, fill) are not compared. A 16 x 16 grid rejects most wrong maps before the full
    comparison; a match is only ever declared on the full one.
    """
    res = pair.res if res is None else res
    if res.shape == pair.inp.shape and to_input == IDENTITY:  # the image kept as it came: one comparison
        pair.budget.spend(res.size)
        if np.array_equal(res, pair.inp):
            return True, False
    pair.budget.spend(PRECHECK_GRID * PRECHECK_GRID)
    verdict = _exact_on_grid(pair, to_input, res, PRECHECK_GRID)
    if verdict is None or not verdict[0]:
        return verdict
    return _exact_full(pair, to_input, res)


def _exact_on_grid(pair: _Pair, to_input: Matrix3, res: np.ndarray, points: int) -> tuple[bool, bool] | None:
    """The exact comparison on a ``points`` x ``points`` grid of result pixels only (a pre-check)."""
    (h, w), (W, H) = res.shape[:2], pair.input_size
    ys, xs = _grid(h, points), _grid(w, points)
    ix, iy = _map_centres(to_input, *(a.ravel() for a in np.meshgrid(xs, ys)))
    inside = (ix >= 0) & (ix < W) & (iy >= 0) & (iy < H)
    if not inside.any():
        return None
    want = res[np.ix_(ys, xs)].reshape(len(ix), -1)[inside].astype(np.int16)
    got = pair.inp[iy[inside], ix[inside]].reshape(int(inside.sum()), -1).astype(np.int16)
    if np.abs(want - got).max() <= pair.tol:
        return True, False
    if got.shape[1] == 3 and np.abs(want - got[:, ::-1]).max() <= pair.tol:
        return True, True
    return False, False


def _exact_full(pair: _Pair, to_input: Matrix3, res: np.ndarray) -> tuple[bool, bool] | None:
    """The exact comparison on every result pixel whose centre maps inside the input."""
    if res is pair.res and _equal_turned_region(pair, to_input):
        return True, False
    seen = _view_of(pair, to_input, res)
    if seen is None:
        return None
    view, faced = seen
    pair.budget.spend(2 * faced.size)
    if _equal(view, faced, pair.tol):
        return True, False
    if view.ndim == 3 and _equal(view[..., ::-1], faced, pair.tol):
        return True, True
    return False, False


#: Each orientation op with OpenCV: (function of (src, dst), whether it swaps the axes).
_CV2_ORIENTATION = {
    "flip_horizontal": (lambda a, out: cv2.flip(a, 1, dst=out), False),
    "flip_vertical": (lambda a, out: cv2.flip(a, 0, dst=out), False),
    "rotate_90": (lambda a, out: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE, dst=out), True),
    "rotate_180": (lambda a, out: cv2.rotate(a, cv2.ROTATE_180, dst=out), False),
    "rotate_270": (lambda a, out: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE, dst=out), True),
}
#: Scratch buffers kept per thread between calls, up to this size each: on a VM the first touch of
#: fresh pages costs several times the comparison itself (measured 0.3 ms warm vs 2.4-3.8 ms fresh
#: for a 1 MP turn); larger images get fresh buffers.
SCRATCH_MAX_BYTES = 8 << 20
_scratch_buffers = threading.local()


def _scratch(index: int, shape: tuple[int, ...]) -> np.ndarray | None:
    """A uint8 array of ``shape`` from this thread's scratch buffer ``index`` (None: too large to keep)."""
    size = int(np.prod(shape))
    if size > SCRATCH_MAX_BYTES:
        return None
    buffers = _scratch_buffers.__dict__.setdefault("buffers", {})
    buffer = buffers.get(index)
    if buffer is None or buffer.size < size:
        buffer = buffers[index] = np.empty(size, np.uint8)
    return buffer[:size].reshape(shape)


def _equal_turned_region(pair: _Pair, to_input: Matrix3) -> bool:
    """The common case fast: a turn/flip of a whole-pixel crop lying inside the input, turned with
    OpenCV into warm scratch buffers and compared in one pass (``NORM_INF``). A True is a match of
    every pixel; a False leaves the decision (swapped channels included) to the general comparison."""
    split = split_axis_aligned(to_input, tol=1e-9)
    if split is None or split[1] != 1.0 or split[2] != 1.0:
        return False
    (w, h), (W, H) = pair.result_size, pair.input_size
    box = map_box(to_input, [0, 0, w, h])
    if any(v != round(v) for v in box):
        return False
    x1, y1, x2, y2 = (round(v) for v in box)
    if x1 < 0 or y1 < 0 or x2 > W or y2 > H:
        return False
    pair.budget.spend(5 * w * h * pair.channels)
    view, result = _three_channels(pair.inp_cv[y1:y2, x1:x2], 2), _three_channels(pair.res_cv, 3)
    for index, name in enumerate(_sequence_of(split[0])):
        turn, swaps = _CV2_ORIENTATION[name]
        shape = (view.shape[1], view.shape[0], *view.shape[2:]) if swaps else view.shape
        view = turn(view, _scratch(index % 2, shape))
    if view.shape != result.shape:
        return False
    return cv2.norm(view, result, cv2.NORM_INF) <= pair.tol


def _three_channels(array_cv: np.ndarray, scratch: int) -> np.ndarray:
    """An OpenCV twin without Pillow's fourth (padding) byte, whose value differs between images."""
    if array_cv.ndim == 3 and array_cv.shape[2] == 4:
        return cv2.cvtColor(array_cv, cv2.COLOR_RGBA2RGB, dst=_scratch(scratch, (*array_cv.shape[:2], 3)))
    return array_cv


def _equal(a: np.ndarray, b: np.ndarray, tol: int) -> bool:
    if tol == 0:
        return bool(np.array_equal(a, b))
    return bool(np.abs(a.astype(np.int16) - b).max() <= tol)


def _view_of(pair: _Pair, to_input: Matrix3, res: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(input pixels, result pixels)`` facing each other through an axis-aligned ``to_input``:
    every result pixel whose centre maps inside the input, and the input pixel under that centre
    (same shape; fractional offsets and scales are mapped exactly). None when the map is not
    axis-aligned or no centre lands inside."""
    if split_axis_aligned(to_input, tol=1e-9) is None:
        return None
    (h, w), (W, H) = res.shape[:2], pair.input_size
    swapped = to_input[0][0] == 0
    # Input column from result column (or row, when the map swaps axes), and input row likewise.
    col_from = (np.arange(h if swapped else w) + 0.5) * (to_input[0][1] if swapped else to_input[0][0]) + to_input[0][2]
    row_from = (np.arange(w if swapped else h) + 0.5) * (to_input[1][0] if swapped else to_input[1][1]) + to_input[1][2]
    cols = np.floor(col_from + 1e-6).astype(np.intp)
    rows = np.floor(row_from + 1e-6).astype(np.intp)
    # The maps are monotonic, so the indices inside the input form one contiguous run.
    keep_c, keep_r = _run((cols >= 0) & (cols < W)), _run((rows >= 0) & (rows < H))
    if keep_c is None or keep_r is None:
        return None
    view = _take(_take(pair.inp, rows[keep_r], axis=0), cols[keep_c], axis=1)
    if swapped:  # view[i, j] faces result pixel (row j, column i)
        return view.swapaxes(0, 1), res[keep_c, keep_r]
    return view, res[keep_r, keep_c]


def _run(mask: np.ndarray) -> slice | None:
    """The slice of a boolean mask's one run of True values (None: no True)."""
    if not mask.any():
        return None
    return slice(int(np.argmax(mask)), len(mask) - int(np.argmax(mask[::-1])))


def _take(array: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """``array`` indexed along ``axis``: a view (a slice) when the indices step by +-1, else a copy."""
    if len(index) == 1 or (len(index) > 1 and np.all(np.diff(index) == index[1] - index[0])
                           and abs(int(index[1] - index[0])) == 1):
        step = 1 if len(index) == 1 else int(index[1] - index[0])
        stop = index[-1] + step
        chosen = slice(int(index[0]), None if stop < 0 else int(stop), step)
    else:
        chosen = index
    return array[chosen] if axis == 0 else array[:, chosen]


def _sequence_of(linear: Any) -> tuple[str, ...]:
    return next(seq for seq in DIHEDRAL_SEQUENCES if sequence_linear(seq) == linear)


def _apply_sequence(array: np.ndarray, seq: tuple[str, ...]) -> np.ndarray:
    """Apply orientation ops to an (H, W[, C]) array as views (np.rot90 turns counter-clockwise)."""
    for name in seq:
        if name == "flip_horizontal":
            array = array[:, ::-1]
        elif name == "flip_vertical":
            array = array[::-1]
        else:
            array = np.rot90(array, {"rotate_90": 1, "rotate_180": 2, "rotate_270": 3}[name])
    return array


def _low(array_cv: np.ndarray, channels: int, budget: VerificationBudget,
         size: tuple[int, int] | None = None) -> np.ndarray:
    """Area-averaged copy, longest side <= ``LOWRES_SIDE`` (or exactly ``size``), as float32.

    Area resampling by a whole factor is OpenCV's fast path and costs a fraction of a general
    ratio on a large image, so a first pass shrinks by a whole factor that leaves >= 4x the target
    size (cutting the remainder, under a quarter of a target pixel, evenly from both sides) and a
    second, cheap pass on the small image reaches the target.
    """
    h, w = array_cv.shape[:2]
    budget.spend(h * w)
    if size is None:
        scale = min(1.0, LOWRES_SIDE / max(h, w))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
    factor = max(1, min(w // (4 * size[0]), h // (4 * size[1])))
    if factor > 1:
        cut_x, cut_y = w % factor, h % factor
        array_cv = array_cv[cut_y // 2: h - (cut_y - cut_y // 2), cut_x // 2: w - (cut_x - cut_x // 2)]
        array_cv = cv2.resize(array_cv, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    low = cv2.resize(array_cv, size, interpolation=cv2.INTER_AREA)
    if low.ndim == 3:
        low = low[..., :channels]
    return low.astype(np.float32)


def _region_views(pair: _Pair, to_input: Matrix3, size: tuple[int, int],
                  ) -> tuple[tuple[str, ...], dict[tuple[str, ...], np.ndarray]] | None:
    """The input region ``to_input`` covers, area-resampled to ``size`` in the result's orientation.

    Returns ``(target, views)``: ``views`` holds the region under every turn/flip that yields
    ``size`` (all eight for a square size), ``target`` names the one ``to_input`` describes. None
    when the map is not axis-aligned or leaves the input.
    """
    split = split_axis_aligned(to_input, tol=1e-4)
    if split is None:
        return None
    linear = split[0]
    (w, h), (W, H) = pair.result_size, pair.input_size
    x1, y1, x2, y2 = (round(v) for v in map_box(to_input, [0, 0, w, h]))
    if x1 < 0 or y1 < 0 or x2 > W or y2 > H or x2 <= x1 or y2 <= y1:
        return None
    region_size = (size[1], size[0]) if swaps_axes(linear) else size
    region = _low(pair.inp_cv[y1:y2, x1:x2], pair.channels, pair.budget, region_size)
    views = {seq: _apply_sequence(region, seq) for seq in DIHEDRAL_SEQUENCES
             if size[0] == size[1] or swaps_axes(sequence_linear(seq)) == swaps_axes(linear)}
    return _sequence_of(linear), views


def _to_gray(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 2 else np.ascontiguousarray(array) @ np.array([0.299, 0.587, 0.114], np.float32)


def _close(pair: _Pair, to_input: Matrix3) -> bool:
    """Resampled view: at most ``CLOSE_OUTLIERS`` of the result's pixels differ by more than
    ``CLOSE_LEVELS`` (any channel) from every reference resampling of the input region (area or
    linear, two nearest-neighbour conventions, and linear and nearest warps of the exact,
    possibly fractional, region), all compared at the result's full resolution."""
    split = split_axis_aligned(to_input, tol=1e-9)
    if split is None:
        return False
    linear = split[0]
    (w, h), (W, H) = pair.result_size, pair.input_size
    x1, y1, x2, y2 = map_box(to_input, [0, 0, w, h])
    ix1, iy1, ix2, iy2 = (round(v) for v in (x1, y1, x2, y2))
    if ix1 < 0 or iy1 < 0 or ix2 > W or iy2 > H or ix2 <= ix1 or iy2 <= iy1:
        return False
    size = (h, w) if swaps_axes(linear) else (w, h)  # the result's size in the input's orientation
    pair.budget.spend(6 * w * h * pair.channels + (ix2 - ix1) * (iy2 - iy1) * pair.channels)
    region = np.ascontiguousarray(pair.inp[iy1:iy2, ix1:ix2])
    smooth = cv2.INTER_AREA if size[0] < region.shape[1] or size[1] < region.shape[0] else cv2.INTER_LINEAR
    references = [cv2.resize(region, size, interpolation=i) for i in (smooth, cv2.INTER_NEAREST_EXACT, cv2.INTER_NEAREST)]
    # The exact region (fractional when the code resized a fractional box), as OpenCV's warp sees
    # it: its pixel centres are integers, ours are at +0.5.
    to_region = [[(x2 - x1) / size[0], 0.0, x1 - 0.5 + (x2 - x1) / size[0] / 2],
                 [0.0, (y2 - y1) / size[1], y1 - 0.5 + (y2 - y1) / size[1] / 2]]
    source = np.ascontiguousarray(pair.inp)
    references += [cv2.warpAffine(source, np.asarray(to_region), size, flags=cv2.WARP_INVERSE_MAP | i,
                                  borderMode=cv2.BORDER_REPLICATE) for i in (cv2.INTER_LINEAR, cv2.INTER_NEAREST)]
    target = _sequence_of(linear)
    result = pair.res
    closest = None
    for reference in references:
        turned = np.ascontiguousarray(_apply_sequence(reference, target))
        difference = cv2.absdiff(turned, np.ascontiguousarray(result))
        if difference.ndim == 3:
            difference = difference.max(axis=2)
        closest = difference if closest is None else np.minimum(closest, difference)
    assert closest is not None
    return float(np.count_nonzero(closest > CLOSE_LEVELS)) <= CLOSE_OUTLIERS * closest.size


def _features(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Zero-mean, unit-norm intensities and gradient magnitudes of a low-resolution gray image
    (both over the same (h-1, w-1) window), or None when it is flat or too small to compare."""
    if min(gray.shape) < 2 or gray.std() < 1e-3:
        return None
    inner = gray[:-1, :-1]
    gradient = np.hypot(gray[1:, :-1] - inner, gray[:-1, 1:] - inner)
    return _unit(inner), _unit(gradient)


def _unit(x: np.ndarray) -> np.ndarray:
    x = (x - x.mean()).ravel()
    norm = float(np.sqrt(x @ x))
    return x / norm if norm > 0 else x


def _structure(view: tuple[np.ndarray, np.ndarray] | None, result: tuple[np.ndarray, np.ndarray] | None,
               ) -> float | None:
    """How alike two low-resolution images are, whatever photometric op separates them.

    The best of |corr| of intensities (contrast, brightness, inversion, gray), corr of gradient
    magnitudes (blur, sharpen, equalize) and corr of the view's gradient with the result's
    intensities (edge maps). None when either is flat (nothing to compare).
    """
    if view is None or result is None:
        return None
    (view_i, view_g), (res_i, res_g) = view, result
    return max(abs(float(view_i @ res_i)), float(view_g @ res_g), float(view_g @ res_i))


def _structure_scores(pair: _Pair, to_input: Matrix3,
                      ) -> tuple[tuple[str, ...], dict[tuple[str, ...], float | None]] | None:
    """Structure score of the result against the region of ``to_input`` under each fitting turn."""
    res_low = _to_gray(_low(pair.res_cv, pair.channels, pair.budget))
    found = _region_views(pair, to_input, (res_low.shape[1], res_low.shape[0]))
    if found is None:
        return None
    result = _features(res_low)
    return found[0], {seq: _structure(_features(_to_gray(view)), result) for seq, view in found[1].items()}


def _similar(pair: _Pair, to_input: Matrix3) -> bool:
    """Photometric chain: the view's structure matches the result at least as well as any other turn."""
    scored = _structure_scores(pair, to_input)
    if scored is None:
        return False
    target, scores = scored
    score = scores.pop(target)
    if score is None:
        return True  # flat content cannot contradict the hinted geometry
    if score < SIMILAR_FLOOR:
        return False
    return score >= max([s for s in scores.values() if s is not None], default=0.0) - SIMILAR_SLACK


# -- hinted chains ------------------------------------------------------------------------------


def _hint_chains(hints: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Lineage chains from the input (node 0) to the last records, most recent end first.

    Records without ``src``/``dst`` links (hand-written or partly forged hints) are read as one
    chain in list order when none of them is linked.
    """
    if not hints:
        return []
    if all("src" not in op and "dst" not in op for op in hints):
        return [hints]
    producer = {op["dst"]: i for i, op in enumerate(hints) if "dst" in op}
    chains: list[list[dict[str, Any]]] = []
    for end in range(len(hints) - 1, -1, -1):
        chain: list[dict[str, Any]] = []
        index: int | None = end
        reaches_input = False
        while index is not None and len(chain) < len(hints):
            chain.append(hints[index])
            src = hints[index].get("src")
            if src == 0:
                reaches_input = True
                break
            index = producer.get(src) if src is not None else None
        if reaches_input and chain[::-1] not in chains:
            chains.append(chain[::-1])
        if len(chains) >= MAX_CHAINS:
            break
    return chains


def _verify_chain(pair: _Pair, chain: list[dict[str, Any]]) -> _Match | None:
    geometry = chain_geometry(chain, *pair.input_size)
    if geometry is None or geometry[1] != pair.result_size:
        return None
    to_input = geometry[0]
    exact = _exact(pair, to_input)
    if exact is not None and exact[0]:
        return _Match(to_input, exact=True, swapped_channels=exact[1])
    photometric = any(op["op"] not in GEOMETRIC_OPS and op.get("changed") for op in chain)
    resampled = any(op["op"] == "resize" for op in chain)
    if photometric and _similar(pair, to_input):
        return _Match(to_input, exact=False)
    if resampled and not photometric and _close(pair, to_input):
        return _Match(to_input, exact=False)
    return None


# -- pixel search -------------------------------------------------------------------------------


def _find_dihedral(pair: _Pair) -> _Match | None:
    """The simplest turn/flip of the whole input that the result equals exactly."""
    for seq in DIHEDRAL_SEQUENCES:
        geometry = chain_geometry([{"op": name} for name in seq], *pair.input_size)
        if geometry[1] != pair.result_size:
            continue
        exact = _exact(pair, geometry[0])
        if exact is not None and exact[0]:
            return _Match(geometry[0], exact=True, swapped_channels=exact[1])
    return None


def _find_similar_dihedral(pair: _Pair) -> _Match | None:
    """No verified hint and no exact match, but the size of the input up to a turn: the turn/flip
    whose structure fits the (photometrically changed) result clearly (``UNHINTED_FLOOR``), the
    simplest one among those within ``SIMILAR_SLACK`` of the best."""
    W, H = pair.input_size
    if pair.result_size not in ((W, H), (H, W)):
        return None
    start = [] if pair.result_size == (W, H) else [{"op": "rotate_90"}]
    scored = _structure_scores(pair, chain_geometry(start, W, H)[0])
    if scored is None:
        return None
    scores = {seq: s for seq, s in scored[1].items() if s is not None}
    if not scores or max(scores.values()) < UNHINTED_FLOOR:
        return None
    best = max(scores.values())
    seq = next(seq for seq in DIHEDRAL_SEQUENCES if scores.get(seq, -1.0) >= best - SIMILAR_SLACK)
    return _Match(chain_geometry([{"op": name} for name in seq], W, H)[0], exact=False)


def _find_subwindow(pair: _Pair) -> _Match | None:
    """An exact crop of any turn/flip of the input, located by rare pixels; see the module doc."""
    (w, h), (W, H) = pair.result_size, pair.input_size
    if w * h >= W * H or min(w, h) < 1:
        return None
    match = _search_subwindow(pair, pair.res)
    if match is None and pair.res.ndim == 3:
        match = _search_subwindow(pair, np.ascontiguousarray(pair.res[..., ::-1]))
        if match is not None:
            match.swapped_channels = True
    return match


def _search_subwindow(pair: _Pair, res: np.ndarray) -> _Match | None:
    inp, tol = pair.inp, pair.tol
    (h, w), (H, W) = res.shape[:2], inp.shape[:2]
    ys, xs = _grid(h, PROBE_GRID), _grid(w, PROBE_GRID)
    py, px = (a.ravel() for a in np.meshgrid(ys, xs, indexing="ij"))
    values = res[py, px].reshape(len(py), -1).astype(np.int16)
    order = np.argsort(_rarity(inp, values), kind="stable")
    anchor, probes = order[0], order[1:]
    low = np.clip(values[anchor] - tol, 0, 255).astype(np.uint8)
    high = np.clip(values[anchor] + tol, 0, 255).astype(np.uint8)
    if pair.inp_cv.ndim == 3 and pair.inp_cv.shape[2] == 4:  # Pillow's 4-byte pixels: 4th byte free
        low, high = np.append(low, 0).astype(np.uint8), np.append(high, 255).astype(np.uint8)
    pair.budget.spend(2 * H * W)
    hits = cv2.findNonZero(cv2.inRange(pair.inp_cv, low, high))  # (x, y) rows, or None
    if hits is None:
        return None
    hits = hits.reshape(-1, 2).astype(np.intp)
    hit_x, hit_y = hits[:, 0], hits[:, 1]
    found: list[_Match] = []
    for seq in DIHEDRAL_SEQUENCES:
        linear = sequence_linear(seq)
        rw, rh = (h, w) if swaps_axes(linear) else (w, h)
        if rw > W or rh > H:
            continue
        to_region = dihedral_matrix(linear, w, h)
        qx, qy = _map_centres(to_region, px, py)
        top_x, top_y = hit_x - qx[anchor], hit_y - qy[anchor]
        keep = (top_x >= 0) & (top_y >= 0) & (top_x <= W - rw) & (top_y <= H - rh)
        top_x, top_y = top_x[keep], top_y[keep]
        stale = 0
        for probe in probes:
            if len(top_x) <= 8 or stale >= 4:
                break
            pair.budget.spend(len(top_x))
            got = inp[top_y + qy[probe], top_x + qx[probe]].reshape(len(top_x), -1).astype(np.int16)
            ok = np.abs(got - values[probe]).max(axis=1) <= tol
            stale = stale + 1 if ok.all() else 0
            top_x, top_y = top_x[ok], top_y[ok]
        for x0, y0 in zip(top_x[:MAX_VERIFIED_PLACEMENTS], top_y[:MAX_VERIFIED_PLACEMENTS]):
            to_input = compose(translation(float(x0), float(y0)), to_region)
            exact = _exact(pair, to_input, res)
            if exact is not None and exact[0] and not exact[1]:
                found.append(_Match(to_input, exact=True))
                if len(found) == 2:
                    break
        if len(found) == 2:
            break
    if not found:
        return None
    found[0].ambiguous = len(found) > 1
    return found[0]


def _map_centres(matrix: Matrix3, px: np.ndarray, py: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = px + 0.5, py + 0.5
    qx = np.floor(matrix[0][0] * x + matrix[0][1] * y + matrix[0][2] + 1e-6).astype(np.intp)
    qy = np.floor(matrix[1][0] * x + matrix[1][1] * y + matrix[1][2] + 1e-6).astype(np.intp)
    return qx, qy


def _rarity(inp: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How common each value (rows of the (n, channels) ``values``) is in the input: counts of its
    bin over a strided sample of the input (gray levels, or 16 levels per colour channel)."""
    sample = inp[:: max(1, inp.shape[0] // 96), :: max(1, inp.shape[1] // 96)]
    counts = np.bincount(_bins(sample.reshape(-1, values.shape[1])), minlength=16 ** 3)
    return counts[_bins(values)]


def _bins(values: np.ndarray) -> np.ndarray:
    if values.shape[1] == 1:
        return values[:, 0].astype(np.intp)
    q = values.astype(np.intp) >> 4
    return (q[:, 0] << 8) | (q[:, 1] << 4) | q[:, 2]


# -- reports ------------------------------------------------------------------------------------


def _public(op: dict[str, Any]) -> dict[str, Any]:
    """An op as ExecResult reports it: the tracer's node links, input-frame boxes and a resize's
    own region dropped; a crop keeps the box the code passed in its own frame (``frame_box``)."""
    out = {k: v for k, v in op.items() if k not in ("src", "dst", "input_box")}
    if op["op"] != "crop":
        out.pop("frame_box", None)
        if op["op"] != "pad":
            out.pop("box", None)
    elif "box" in op:
        out.setdefault("frame_box", list(op["box"]))
    return out


def _chain_ops(input_size: tuple[int, int], chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chain's ops with crop/pad boxes moved into the input's frame."""
    ops: list[dict[str, Any]] = []
    matrix, size = None, input_size
    for op in chain:
        out = _public(op)
        if op["op"] in ("crop", "pad") and "box" in op:
            out["box"] = op["box"] if matrix is None else [float(v) for v in map_box(matrix, op["box"])]
        ops.append(out)
        step = op_geometry(op, *size)
        if step is None:
            break
        matrix = step[0] if matrix is None else compose(matrix, step[0])
        size = step[1]
    return ops + [_public(op) for op in chain[len(ops):]]


def _settle(pair: _Pair, ops: list[dict[str, Any]], match: _Match | None) -> list[dict[str, Any]]:
    """Make the photometric claims agree with the match (None: no geometric view), and add the
    colour changes the comparison itself had to allow for."""
    claims = [op for op in ops if op["op"] in NON_CORE_OPS and op["op"] not in GEOMETRIC_OPS and op.get("changed")]
    swapped = match is not None and match.swapped_channels
    if match is not None and match.exact and claims:
        explained = pair.gray_result_of_color or swapped
        for op in claims:
            if not (explained and op["op"] in _COLOR_OPS):
                op["changed"] = False
    if match is not None and match.ambiguous:
        for op in ops:
            if op["op"] == "crop":
                op["ambiguous"] = True
    changed = {op["op"] for op in ops if op.get("changed")}
    if pair.gray_result_of_color and not changed & _COLOR_OPS:
        ops.append({"op": "grayscale", "via": "pixels", "changed": True})
    if swapped and "color_convert" not in changed:
        ops.append({"op": "color_convert", "via": "pixels", "changed": True})
    return ops


def _report_chain(pair: _Pair, chain: list[dict[str, Any]], match: _Match) -> list[dict[str, Any]]:
    return _settle(pair, _chain_ops(pair.input_size, chain), match)


def _photometric_hints(hints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_public(op) for op in hints if op["op"] not in GEOMETRIC_OPS]


def _report_found(pair: _Pair, hints: list[dict[str, Any]], match: _Match) -> list[dict[str, Any]]:
    ops = canonical_ops(match.to_input, *pair.result_size, *pair.input_size, tol=1e-4) or []
    for op in ops:
        op["via"] = "pixels"
        if op["op"] == "crop":  # found in the input's own frame: the frame the code cropped is unknown
            op["frame_box"] = list(op["box"])
    return _settle(pair, ops + _photometric_hints(hints), match)


def _unverified_ops(hints: list[dict[str, Any]], input_size: tuple[int, int] | None) -> list[dict[str, Any]]:
    """Sanitized hints as ops with nothing checked against the pixels: the lineage chain that
    ends last (boxes moved into the input's frame when ``input_size`` is known), every op marked
    ``unverified`` and no change claimed."""
    chains = _hint_chains(hints)
    if chains and input_size is not None:
        ops = _chain_ops(input_size, chains[0])
    else:
        ops = [_public(op) for op in (chains[0] if chains else hints)]
    for op in ops:
        op["unverified"] = True
        if "changed" in op:
            op["changed"] = False
    return ops


def _report_unmatched(pair: _Pair, hints: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Not a geometric view of the input: a hinted chain whose output size agrees with the result
    (its core ops marked ``unverified``), else the hinted non-core ops alone."""
    for chain in _hint_chains(hints):
        geometry = chain_geometry(chain, *pair.input_size)
        if geometry is not None and geometry[1] == pair.result_size:
            ops = _chain_ops(pair.input_size, chain)
            for op in ops:
                if op["op"] in CORE_OPS:
                    op["unverified"] = True
            return _settle(pair, ops, None)
    return _settle(pair, [_public(op) for op in hints if op["op"] in NON_CORE_OPS], None)
