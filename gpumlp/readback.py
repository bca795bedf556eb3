"""Reading an enlarged MNIST-style picture back as the 28x28 image it was made from.

A picture made from a 28x28 image by enlarging it with a common filter (nearest, bilinear,
bicubic, Lanczos) and padding it is read back pixel for pixel: the filter, the size it was
enlarged to and where it was pasted are all found by least squares. `preprocess.mnist_pixels`
uses it before its layout steps, whose whole-pixel placement a smooth enlargement would
otherwise move by one pixel for about one image in eight.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

FIELD = 28            # side of an MNIST image, pixels
BOX = 20              # side of the box MNIST scales each digit into
SOURCE = FIELD        # an enlarged picture is read back as an image of this many pixels a side
FILTERS = ("nearest", "bilinear", "bicubic", "bicubic-0.75", "lanczos")  # the enlargements known
SUPPORT = {"bilinear": 1, "bicubic": 2, "bicubic-0.75": 2, "lanczos": 3}  # source pixels
UNCLIPPED = ("nearest", "bilinear")   # filters that never overshoot 0..255
CLIPPED = tuple(kind for kind in FILTERS if kind not in UNCLIPPED)
MIN_ENLARGEMENT = 1.5  # read back pictures enlarged this much or more ...
MAX_ENLARGEMENT = 20.0  # ... and no more (the cost grows with the square of the size)
READBACK_RMS = 3.0    # an accepted read-back explains the picture to this rms, levels of 255:
                      # enlargements fit to 0.3-1.5 (3 after JPEG), photos and rotated ones 6+
REFINE_TOP = 15       # windows refitted in each round of the search's refinement: all 15 of
                      # the 5 sizes by 3 clipped filters (with fewer, Lanczos at 70 or 140 px
                      # was read back from one size too small, a pixel off)
CLOSE_FIT_RMS = 1.0   # a fit this close is the enlargement: the search stops
HOPELESS_RMS = 8.0    # a fit this far off is not refined further (photos: 10 and more)
ONE_THREAD = 1 << 18  # matrix products kept below this size (multiply-adds), see _dot
EM_STEPS = 8          # iterations estimating the values an enlargement's clipping cut off ...
EM_RELAX = 1.5        # ... over-relaxed


def filter_weights(kind: str, d: np.ndarray) -> np.ndarray:
    """The resampling filter `kind` at distances `d` (in source pixels)."""
    d = np.abs(d)
    if kind == "bilinear":
        return np.maximum(0.0, 1.0 - d)
    if kind in ("bicubic", "bicubic-0.75"):
        a = -0.5 if kind == "bicubic" else -0.75
        return np.where(d < 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                        np.where(d < 2, a * (((d - 5) * d + 8) * d - 4), 0.0))
    if kind == "lanczos":
        return np.where(d < 3, np.sinc(d) * np.sinc(d / 3), 0.0)
    raise ValueError(f"unknown filter {kind!r}")


def nearest_pixels(n: int, size: int) -> np.ndarray:
    """(size,): the input pixel each output pixel of Pillow's "nearest" enlargement of n pixels
    to `size` takes. Pillow steps through the input by adding n / size, from half of it, and
    takes the pixel the sum has reached: where (i + 0.5) * n / size is a whole number, the
    rounding of that float sum, not a rule, decides which side the output pixel takes."""
    step, position, pixels = n / size, n / size * 0.5, np.empty(size, dtype=int)
    for i in range(size):
        pixels[i] = int(position)
        position += step
    return pixels


@functools.lru_cache(maxsize=128)
def enlargement(n: int, size: int, kind: str) -> np.ndarray:
    """(size, n): the matrix that enlarges n pixels to `size` as Pillow's `resize` does
    (OpenCV, PyTorch and TensorFlow place pixels the same way): output pixel i reads the
    input at (i + 0.5) * n / size, in input pixels, weighted by the filter, weights summing
    to 1; "nearest" takes the pixel there, as Pillow finds it (see nearest_pixels)."""
    centre = (np.arange(size) + 0.5) * n / size
    matrix = np.zeros((size, n))
    if kind == "nearest":
        matrix[np.arange(size), nearest_pixels(n, size)] = 1.0
        return matrix
    first = (centre - SUPPORT[kind] + 0.5).astype(int)     # taps first..end-1, as Pillow takes them
    end = (centre + SUPPORT[kind] + 0.5).astype(int)
    taps = first[:, None] + np.arange(int((end - first).max()))[None, :]
    used = (taps < end[:, None]) & (taps >= 0) & (taps < n)
    weights = np.where(used, filter_weights(kind, taps + 0.5 - centre[:, None]), 0.0)
    weights /= weights.sum(axis=1, keepdims=True)
    rows = np.broadcast_to(np.arange(size)[:, None], taps.shape)
    matrix[rows[used], taps[used]] = weights[used]
    return matrix


@functools.lru_cache(maxsize=128)
def _solvers(size: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The SOURCE-to-`size` enlargement A and its pseudo-inverse (for the few windows fitted)."""
    A = enlargement(SOURCE, size, kind)
    return A, np.linalg.pinv(A)


@functools.lru_cache(maxsize=512)
def _range_basis(size: int, kind: str) -> np.ndarray:
    """(size, SOURCE): an orthonormal basis of the range of the SOURCE-to-`size` enlargement
    (for every size and filter the profiles try)."""
    return np.linalg.qr(enlargement(SOURCE, size, kind))[0]


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in products of fewer than ONE_THREAD multiply-adds each, which OpenBLAS runs on
    one thread: for products this small its threads gain little, and on a busy machine
    they can cost a hundred times the work."""
    (m, k), n = a.shape, b.shape[1]
    if m * k * n < ONE_THREAD:
        return a @ b
    if m >= n:
        step = max(ONE_THREAD // (k * n), 1)
        return np.concatenate([a[i:i + step] @ b for i in range(0, m, step)])
    step = max(ONE_THREAD // (m * k), 1)
    return np.concatenate([a @ b[:, j:j + step] for j in range(0, n, step)], axis=1)


def _windows_dot(seen: np.ndarray, basis: np.ndarray, spectra: dict) -> np.ndarray:
    """(len(seen) - len(basis) + 1, basis.shape[1]): each window of len(basis) pixels of
    `seen` times `basis`, a correlation, computed by FFT (`spectra` keeps the basis's
    spectrum by FFT size, for the next call): as a product of the windows (a Hankel matrix)
    it was a thousand matrix-vector products, half a second for a 500-pixel drawing."""
    fft_size = 1 << (len(seen) - 1).bit_length()   # at least len(seen): no window wraps round
    if fft_size not in spectra:
        spectra[fft_size] = np.fft.rfft(basis, fft_size, axis=0).conj()
    product = np.fft.rfft(seen, fft_size)[:, None] * spectra[fft_size]
    return np.fft.irfft(product, fft_size, axis=0)[:len(seen) - len(basis) + 1]


@functools.lru_cache(maxsize=64)
def _stacked_bases(sizes: range, kinds: tuple[str, ...]) -> np.ndarray:
    """(sizes[-1], SOURCE * len(sizes) * len(kinds)): the range bases of each size and filter
    side by side, each padded with zero rows to the longest size."""
    out = np.zeros((sizes[-1], SOURCE * len(sizes) * len(kinds)))
    for i, (size, kind) in enumerate((size, kind) for size in sizes for kind in kinds):
        out[:size, i * SOURCE:(i + 1) * SOURCE] = _range_basis(size, kind)
    return out


class Enlargement(NamedTuple):
    rms: float           # misfit per inked pixel, levels of 255
    size: int            # the side the SOURCE-pixel image was enlarged to
    kind: str            # the filter
    top: int             # where its first row and column lie in the searched patch
    left: int
    source: np.ndarray   # (SOURCE, SOURCE): the small image read back
    restored: np.ndarray  # the patch with the values its clipping cut off put back


def _window(patch: np.ndarray, size: int, top: int, left: int) -> np.ndarray:
    """patch[top:top + size, left:left + size], zeros where that runs past its edges."""
    out = np.zeros((size, size))
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + size, patch.shape[0]), min(left + size, patch.shape[1])
    if r1 > r0 and c1 > c0:
        out[r0 - top:r1 - top, c0 - left:c1 - left] = patch[r0:r1, c0:c1]
    return out


def _by_profiles(patch: np.ndarray, sizes: range, kinds: tuple[str, ...],
                 box_rows: tuple[int, int], box_cols: tuple[int, int]) -> list[tuple]:
    """(misfit, size, kind, top, left) for each size and filter, best first: where a window of
    the enlarged source best explains the patch's row and column sums (an enlargement's sums
    are the enlargement of sums, with the same filter and grid). The window holds the box."""
    basis, longest = _stacked_bases(sizes, kinds), sizes[-1]
    best, spectra = [], {}
    for profile, (first, end) in ((patch.sum(axis=1), box_rows), (patch.sum(axis=0), box_cols)):
        offsets = np.arange(end - longest, first + 1)
        padded = np.concatenate([np.zeros(longest), profile, np.zeros(longest)])
        seen = padded[offsets[0] + longest:offsets[-1] + 2 * longest]  # every window's pixels
        explained = (_windows_dot(seen, basis, spectra) ** 2).reshape(
            len(offsets), len(sizes), len(kinds), SOURCE).sum(axis=3)
        misfit = profile @ profile - explained                         # (offsets, sizes, kinds)
        misfit[offsets[:, None] + np.asarray(sizes)[None, :] < end] = np.inf   # misses the box
        at = misfit.argmin(axis=0)                                     # (sizes, kinds)
        best.append((np.take_along_axis(misfit, at[None], axis=0)[0], offsets[at]))
    (row_misfit, tops), (col_misfit, lefts) = best
    found = [(float(row_misfit[i, j] + col_misfit[i, j]), size, kind, int(tops[i, j]),
              int(lefts[i, j])) for i, size in enumerate(sizes) for j, kind in enumerate(kinds)]
    return sorted(found, key=lambda c: c[0])


def _fit(patch: np.ndarray, size: int, kind: str, top: int, left: int) -> Enlargement:
    """The SOURCE x SOURCE image whose enlargement, placed at (top, left), best gives `patch`.

    Pillow enlarges the rows, rounds and clips to 0..255, then the columns, and clips again;
    the overshoot of the bicubic and Lanczos filters at a stroke's edges is cut off. Those
    cut-off values are estimated along with the image (the least-squares fit alternates with
    putting the model's values back where the picture is clipped, over-relaxed)."""
    A, pinv = _solvers(size, kind)
    window = _window(patch, size, top, left)
    outside = max(float((patch ** 2).sum() - (window ** 2).sum()), 0.0)   # ink the window misses
    inner = _dot(pinv, window)                               # (SOURCE, size): after the row pass
    filled = window
    low, high = window <= 0, window >= 255
    inked = max(int((patch > 0).sum()), 1)
    for step in range(1 if kind in UNCLIPPED else EM_STEPS):
        source = _dot(inner, pinv.T)
        inner_model = _dot(source, A.T)
        model = _dot(A, np.clip(inner_model, 0, 255))
        if step == EM_STEPS - 1 or kind in UNCLIPPED:
            break
        clipped = (low & (model < 0)) | (high & (model > 255))
        if step == 2 and ((np.where(clipped, 0.0, model - window) ** 2).sum() + outside
                          > (HOPELESS_RMS ** 2) * inked):
            break                       # far off after a few steps: not this enlargement
        filled = np.where(clipped, filled + EM_RELAX * (model - filled), window)
        estimate = _dot(pinv, filled)
        cut = ((inner_model < 0) & (estimate < 1)) | ((inner_model > 255) & (estimate > 254))
        inner = np.where(cut, inner + EM_RELAX * (inner_model - inner), estimate)
    clipped = (low & (model < 0)) | (high & (model > 255))
    misfit = np.where(clipped, 0.0, model - window)
    rms = float(np.sqrt(((misfit ** 2).sum() + outside) / inked))
    restored = patch.copy()
    if clipped.any():                                        # the unclipped model where clipped
        full = _dot(_dot(A, source), A.T)
        r0, c0 = max(top, 0), max(left, 0)
        r1, c1 = min(top + size, patch.shape[0]), min(left + size, patch.shape[1])
        part = np.s_[r0 - top:r1 - top, c0 - left:c1 - left]
        restored[r0:r1, c0:c1] = np.where(clipped[part], full[part], window[part])
    return Enlargement(rms, size, kind, top, left, source, restored)


def read_back(ink: np.ndarray, ink_level: float) -> np.ndarray | None:
    """The SOURCE x SOURCE image that `ink` is an enlargement of, or None if it is not one.

    A picture made from an MNIST image (28 pixels a side) by enlarging it with a common
    filter (nearest, bilinear, bicubic, Lanczos: the filter, the size it was enlarged to and
    where it was pasted are all found) and padding it is read back pixel for pixel, so that
    the layout steps see the image the picture was made from; smooth enlargement blurs the
    ink's box and centre of mass by a fraction of a source pixel, enough to move a
    whole-pixel placement by one pixel for about one image in eight. MNIST's box gives the
    scale: the digit's longer side is BOX source pixels. Any other picture (a photo, a drawing,
    a rotated or JPEG-damaged enlargement that fits worse than READBACK_RMS) gives None."""
    mask = ink > ink_level * 255
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    extent = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1
    if not MIN_ENLARGEMENT <= extent / BOX <= MAX_ENLARGEMENT:
        return None
    margin = int(np.ceil((SOURCE - BOX) / 2 * extent / BOX)) + 1
    r0, c0 = max(rows[0] - margin, 0), max(cols[0] - margin, 0)
    patch = ink[r0:rows[-1] + 1 + margin, c0:cols[-1] + 1 + margin]
    box_rows, box_cols = (rows[0] - r0, rows[-1] + 1 - r0), (cols[0] - c0, cols[-1] + 1 - c0)
    # the box of a smooth enlargement at the ink level is 0 to 5% longer than BOX source pixels
    sizes = range(int(SOURCE * extent / (BOX + 1.2)),
                  int(np.ceil(SOURCE * extent / (BOX - 0.2))) + 1)
    fits: dict[tuple, Enlargement] = {}

    def fit(candidate: tuple) -> Enlargement:
        key = candidate[1:]
        if key not in fits:
            fits[key] = _fit(patch, *key)
        return fits[key]

    # the best window of each filter by the profiles, simplest filter first, until one fits
    # as closely as the rounding of levels allows (some enlargements by 2 are also, nearly,
    # enlargements of another image with a sharper filter: the simpler reading wins)
    best = None
    for kind in FILTERS:
        found = fit(_by_profiles(patch, sizes, (kind,), box_rows, box_cols)[0])
        best = found if best is None or found.rms < best.rms else best
        if best.rms <= CLOSE_FIT_RMS:
            break
    for _ in range(3):   # clipping bends the sums: look again with the clipped values put back
        if best.rms <= CLOSE_FIT_RMS or best.rms > HOPELESS_RMS or best.kind in UNCLIPPED:
            break
        near = range(max(best.size - 2, sizes.start), min(best.size + 3, sizes.stop))
        again = _by_profiles(best.restored, near, CLIPPED, box_rows, box_cols)[:REFINE_TOP]
        better = min((fit(c) for c in again), key=lambda e: e.rms)
        if better.rms >= best.rms:
            break
        best = better
    source = np.clip(best.source, 0.0, 255.0)
    return source if best.rms <= READBACK_RMS and source.max() > ink_level * 255 else None
