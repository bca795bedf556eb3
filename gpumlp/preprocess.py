"""MNIST's own preprocessing, applied to an arbitrary picture of one digit.

MNIST's digits were size-normalised into a 20x20 box (keeping the aspect ratio, with
anti-aliasing) and then placed in a 28x28 field so that their centre of mass sits at the
centre; the ink is light (up to 255) on a black background (0). `mnist_pixels` does the
same to a grey image of any size:

    1. grayscale (luma), upright as the EXIF orientation says; transparent pixels count as
       white paper, or black where the opaque ones are all light (`backdrop`: white strokes
       drawn on a transparent canvas)
    2. paper = median of the outermost pixel frame, or a plane fitted to it where the light
       falls unevenly (`paper`); the ink is the levels' distance from the paper, on the
       paper's usual side unless the other reaches much farther (`ink_levels`): inverted
       when dark; stretched so that the paper is 0 and the strongest ink 255; a digit that
       runs into the frame, which then gives no paper level, is refused (`check_edges`)
    3. a picture that is a 28x28 image enlarged (by repeating pixels, or smoothly:
       bilinear, bicubic, Lanczos) and padded is read back as that image (`read_back`);
       any other picture goes on as it is. A 28x28 image laid out as MNIST's are (`laid_out`)
       is taken as it is: steps 4 to 7 are skipped
    4. blobs of ink that are small and far from the digit (dust, noise) are left out
       (`drop_specks`)
    5. crop to the bounding box of the ink (pixels above INK_LEVEL); ink shorter than
       MIN_INK_SIDE on its longer side is refused as too small to be a digit
    6. resize so that the longer side is BOX = 20 pixels, keeping the aspect ratio:
       area averaging when shrinking (MNIST's anti-aliasing), bilinear when enlarging, and
       stretched again to full ink; a digit already 19 or 20 pixels long is kept unscaled,
       with FRINGE pixels of faint edge
    7. paste into a FIELD = 28 square so that the centre of mass lands on pixel
       (CENTRE, CENTRE), rounded to whole pixels, moved back where that would put ink past
       the edge

Step 3 is there because the placement of step 7 is exact to the pixel: a smooth enlargement
blurs the ink's box and centre of mass by a fraction of a pixel, which moves the digit by
one pixel for about one image in eight, and an MLP often changes its answer for a digit
moved by one pixel. Read back, an MNIST image comes out as it went in, and so do all 70,000
of MNIST's own arrays (but for step 2's stretch).

The result is float pixels in [0, 255], as the uint8 training images are before
`data.to_inputs` scales them. Pillow is needed only to read and resize images; `.npy`
arrays (2-D grey, or 784 values: one row of X) are read with NumPy. What a file holds is
told by its content, not its name. Pictures and arrays above MAX_PIXELS are refused before
they are decoded (an array from its .npy header, which must also announce exactly the data the
file holds). A file is read whole, up to MAX_FILE_BYTES (`files.read_at_most`): a pipe such
as `<(...)` works, while a larger file or an endless input is refused after that much.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import numpy as np

from .errors import GpumlpError, shown
from .files import read_at_most
from .npzio import read_npy_header
from .readback import BOX, FIELD, read_back

CENTRE = 14.0         # where MNIST puts the centre of mass (row and column index; measured
                      # over the test set: 13.99 and 14.01)
MIN_CONTRAST = 24.0   # ink must differ from the background by this many levels of 255
INK_SIDE_ODDS = 2.0   # the ink lies on the paper's usual side (dark on light paper) unless the
                      # other side reaches this many times as far from the paper
INK_LEVEL = 0.15      # a pixel is ink when its stretched value is above this fraction of 255;
                      # high enough to step over JPEG ringing around the strokes
MIN_INK_SIDE = 5      # ink shorter than this on its longer side is too small to be read as a
                      # digit (MNIST's are 20 pixels long; a 1x2 picture was read as a "2")
FRINGE = 2            # a digit already BOX pixels long keeps this many pixels around its box
                      # (MNIST's faint anti-aliased edge lies below INK_LEVEL)
MNIST_SIDES = (BOX - 1, BOX)  # ink this long is MNIST's size, kept unscaled (the box of some
                      # MNIST digits' ink above INK_LEVEL is 19 pixels long)
MNIST_PLACED = 0.6    # a 28x28 image whose centre of mass is this close to the centre, its ink
                      # within BOX pixels, is laid out already (MNIST's: 0.52 and 20 at most)
EDGE_INK = 0.1       # ink (or paper not told from it) on this fraction of the outermost pixels
EDGE_BIAS = 2.0       # and on this many times the whole picture's share of ink is a digit cut by
                      # the edges, refused: its ink may be taken for paper (`check_edges`)
SHADE_LEVELS = 12.0   # paper whose level drifts by this much across the frame is lit unevenly:
PLANE_ROUNDS = 4      # its level is a plane fitted to the frame, refitted this many times
SPECK_MASS = 0.1      # a blob of ink with less than this fraction of the heaviest blob's ink
SPECK_GAP = 0.5       # and farther from the digit than this fraction of its longer side is a
                      # speck, not part of the digit: left out (MNIST's farthest is 0.4)
MAX_SIDE = 4096       # pictures and arrays may hold up to MAX_SIDE**2 pixels (a 12-megapixel
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # phone photo fits); larger ones are refused before decoding
MAX_FILE_BYTES = 16 * MAX_PIXELS + 2**20  # 257 MiB: MAX_PIXELS values of the widest .npy
                      # dtype taken (16-byte long double) and a header; any picture of MAX_PIXELS
                      # (8 bytes a pixel even as uncompressed 16-bit RGBA) fits
NPY_MAGIC = b"\x93NUMPY"
IMAGE_HINT = "give a PNG, JPEG or BMP picture of one digit, or a .npy array"
NPY_SHAPES = ("expected one grey image: a 2-D array (H, W), or the 784 values of one 28x28 "
              "image as (784,), (1, 784) or (784, 1)")


class ImageError(GpumlpError):
    """One input file cannot be turned into a digit image; the message names the file."""


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """The grey levels (H, W) as float64 in [0, 255] of an image file or a .npy array."""
    source = str(path)
    data = read_file(path, source)
    if not data:
        raise ImageError(f"{source}: empty file; {IMAGE_HINT}")
    if data.startswith(NPY_MAGIC):
        return gray_from_npy(data, source)
    return gray_from_image(data, source)


def read_file(path: str | os.PathLike, source: str) -> bytes:
    """The bytes of a file (a picture piped in through `<(...)` too) of at most MAX_FILE_BYTES;
    an ImageError for what cannot be read or is larger (not read whole)."""
    if not os.fspath(path):
        raise ImageError(f"an empty file name was given; {IMAGE_HINT}")
    try:
        data = read_at_most(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        raise ImageError(f"{source}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{source}: is a folder; {IMAGE_HINT}") from None
    except OSError as e:
        raise ImageError(f"{source}: cannot be read ({e.strerror or e})") from None
    if data is None:
        raise ImageError(f"{source}: more than the {MAX_FILE_BYTES // 2**20} MiB an image may "
                         "take; scale it down")
    return data


def gray_from_npy(data: bytes, source: str) -> np.ndarray:
    """A 2-D array, or 784 values (one row of X: a 28x28 image in row-major order) shaped
    (784,), (1, 784) or (784, 1). Integers are levels 0..255; floats in [0, 1] are taken as
    x/255, other floats as levels 0..255; anything outside those ranges is refused. Shape,
    dtype and size are checked from the header, before the data is read."""
    try:
        header = read_npy_header(io.BytesIO(data))
    except ValueError as e:
        raise ImageError(f"{source}: not a readable .npy array ({e})") from None
    shape = header.shape
    if math.prod(shape) == FIELD * FIELD and sorted(shape) in ([FIELD * FIELD],
                                                               [1, FIELD * FIELD]):
        shape = (FIELD, FIELD)
    if len(shape) == 2 and shape[1] == FIELD * FIELD:
        raise ImageError(f"{source}: .npy array of shape {shape} holds {shape[0]} "
                         "rows of 784 values (images); give one image per file, e.g. X[i]")
    if header.dtype.kind not in "uif":
        raise ImageError(f"{source}: .npy array of dtype {shown(header.dtype)}; expected integer "
                         "or float grey levels")
    if len(shape) != 2 or min(shape) == 0:
        raise ImageError(f"{source}: .npy array of shape {shown(shape)}; {NPY_SHAPES}")
    if math.prod(shape) > MAX_PIXELS:
        raise ImageError(f"{source}: .npy array of {shape[1]}x{shape[0]} pixels, "
                         f"more than {MAX_PIXELS:,} pixels ({MAX_SIDE}x{MAX_SIDE}); scale it down")
    if header.offset + header.nbytes != len(data):
        raise ImageError(f"{source}: damaged .npy array: its header announces "
                         f"{header.nbytes:,} bytes of data, the file holds "
                         f"{max(len(data) - header.offset, 0):,}")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False).reshape(shape)
    except (ValueError, OSError, EOFError) as e:
        raise ImageError(f"{source}: not a readable .npy array ({e})") from None
    gray = array.astype(np.float64)
    if array.dtype.kind in "ui":
        if gray.min() < 0 or gray.max() > 255:
            raise ImageError(f"{source}: .npy integer values range from {array.min()} to "
                             f"{array.max()}; expected grey levels 0..255")
        return gray
    return float_levels(gray, source, ".npy array")


def float_levels(gray: np.ndarray, source: str, what: str) -> np.ndarray:
    """Float grey values as levels 0..255: fractions in [0, 1] taken as x/255, levels kept;
    NaN, infinities and anything outside [0, 255] refused (`what` names the input)."""
    if not np.isfinite(gray).all():
        raise ImageError(f"{source}: {what} holds NaN or infinite values")
    low, high = gray.min(), gray.max()
    if low < 0 or high > 255:
        raise ImageError(f"{source}: {what}'s float values range from {low:.4g} to {high:.4g}; "
                         "expected fractions 0..1 (x/255) or levels 0..255")
    return gray * 255.0 if high <= 1.0 else gray


def gray_from_image(data: bytes, source: str) -> np.ndarray:
    """Luma of a picture Pillow can read (its first frame, turned upright as its EXIF
    orientation says, as phone cameras write it); transparency over paper (`backdrop`).
    Anything Pillow cannot decode or convert is an ImageError naming the file, never another
    exception."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    too_big = f"more than {MAX_PIXELS:,} pixels ({MAX_SIDE}x{MAX_SIDE}); scale it down"
    bomb_limit = Image.MAX_IMAGE_PIXELS  # Pillow's own refusal, past 179 million pixels, would
    try:                                 # leave the size unsaid: MAX_PIXELS is far lower
        with warnings.catch_warnings():  # the size is checked below, in one line; a corrupt
            warnings.simplefilter("ignore")  # EXIF block is Pillow's warning, not the user's
            Image.MAX_IMAGE_PIXELS = None
            try:
                image = Image.open(io.BytesIO(data))     # reads the header only
            finally:
                Image.MAX_IMAGE_PIXELS = bomb_limit
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{source}: picture of {image.width}x{image.height} pixels, "
                                 f"{too_big}")
            image.load()
            image = ImageOps.exif_transpose(image)
            return luma(image, source)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{source}: not an image; {IMAGE_HINT}") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{source}: picture of {too_big}") from None
    except Exception as e:  # Pillow's decoders raise OSError, ValueError, NotImplementedError..
        raise ImageError(f"{source}: damaged or unsupported image "
                         f"({str(e) or type(e).__name__})") from None


def luma(image, source: str) -> np.ndarray:
    """The grey levels (float64, 0..255) of a loaded Pillow image, by its mode."""
    from PIL import Image

    if image.mode == "F":  # 32-bit float grey (TIFF): fractions or levels, as in a .npy
        return float_levels(np.asarray(image, dtype=np.float64), source, "picture")
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 32- or 16-bit integers: 8- to 16-bit
        # grey in practice, told by the values (a 16-bit PNG may hold levels 0..255, or a
        # camera's 10 or 12 bits): the smallest full scale of 8 to 16 bits that holds them
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, None)
        top = float(gray.max(initial=0))
        full = next((2.0 ** bits - 1 for bits in range(8, 17) if top <= 2 ** bits - 1), top)
        return gray * (255.0 / full)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        paper = Image.new("RGBA", image.size, (backdrop(image),) * 3 + (255,))
        image = Image.alpha_composite(paper, image)
    return np.asarray(image.convert("L"), dtype=np.float64)


def backdrop(image) -> int:
    """The level (0 or 255) an RGBA image's transparent pixels count as: white paper, unless
    its opaque pixels (at least half its most opaque) are all of one light level, strokes whose
    alpha holds the digit (white ink drawn on a transparent canvas): black, so that they read
    as ink. Dark strokes, and pictures whose opaque pixels hold a digit of their own, get white."""
    alpha = np.asarray(image.getchannel("A"))
    levels = np.asarray(image.convert("L"), dtype=np.float64)[alpha >= max(alpha.max(), 1) / 2]
    if levels.size and np.ptp(levels) < MIN_CONTRAST and np.median(levels) > 127.5:
        return 0
    return 255


def ink_levels(gray: np.ndarray, source: str) -> np.ndarray:
    """Ink in [0, 255] on a 0 background: the levels' distance from the paper (`paper`), on
    the side the ink lies, stretched. On light paper (above 127.5) the ink is dark unless the
    lighter levels reach more than INK_SIDE_ODDS times as far from the paper as the darker
    ones (a glare spot beside a pencil digit does not), on dark paper light unless the darker
    ones do: a dark digit on dim grey paper is still dark ink."""
    level = paper(gray)
    distance = gray - level
    dark, light = float(-distance.min()), float(distance.max())
    light_paper = float(np.median(level)) > 127.5
    if (dark * INK_SIDE_ODDS > light) if light_paper else (dark > light * INK_SIDE_ODDS):
        # dark ink: inverted, as MNIST's is light on 0
        distance, peak = -distance, dark
    else:
        peak = light
    if peak < MIN_CONTRAST:
        raise ImageError(f"{source}: no ink found (the image is nearly uniform, contrast "
                         f"{max(peak, 0.0):.0f} of 255); {IMAGE_HINT}")
    check_edges(distance, peak, source, both_sides=np.ndim(level) > 0)
    return np.clip(distance * (255.0 / peak), 0.0, 255.0)


def check_edges(distance: np.ndarray, peak: float, source: str, both_sides: bool = True) -> None:
    """An ImageError for a digit cut by the picture's edges: where the outermost pixels that lie
    more than half the ink's contrast (`peak`) from the paper, on the ink's side (on either side
    where the paper is a fitted plane, `both_sides`: one fitted through ink), are at least
    EDGE_INK of them and EDGE_BIAS times the whole picture's share of ink. A digit's ink lies
    inside its paper; a digit cropped to its ink leaves no paper on the edges to give its level,
    so the ink was taken for paper, or a lighting plane fitted through both (far from each),
    and the net got a sliver of the negative.

    On MNIST test images 0-2999 cropped to their ink (pixels above 128), dark on white and
    enlarged 8 times, this refuses 38 (1.3%): 28 of the 46 read unlike the original and 10 of
    the 2,954 read as it (0.3%); 32 of the 61 whose edges were more than half ink. The 2,962
    left agree with the original for 99.4%. None of the 10,000 MNIST test images is refused."""
    edges = np.concatenate([distance[0], distance[-1], distance[1:-1, 0], distance[1:-1, -1]])
    on_edges = float(((np.abs(edges) if both_sides else edges) > peak / 2).mean())
    overall = float((distance > peak / 2).mean())
    if on_edges >= EDGE_INK and on_edges >= EDGE_BIAS * overall:
        raise ImageError(f"{source}: {on_edges:.0%} of the picture's outermost pixels are not "
                         f"paper, against {overall:.0%} of the whole (a digit cut by the edge, a "
                         "scanner's margin, a table or a frame); crop the picture to the paper "
                         "around the digit, leaving a margin")


def paper(gray: np.ndarray) -> float | np.ndarray:
    """The background's level: the median of the outermost pixel frame; where the frame's
    levels drift across the picture by SHADE_LEVELS or more (light falling unevenly on the
    page of a photo), a plane fitted to the frame, ink touching the frame left out."""
    h, w = gray.shape
    frame = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    median = float(np.median(frame))
    if h < 3 or w < 3:
        return median
    rows = np.concatenate([np.zeros(w), np.full(w, h - 1), np.arange(1, h - 1),
                           np.arange(1, h - 1)]) / (h - 1) - 0.5
    cols = np.concatenate([np.arange(w), np.arange(w), np.zeros(h - 2),
                           np.full(h - 2, w - 1)]) / (w - 1) - 0.5
    design = np.stack([np.ones_like(rows), rows, cols], axis=1)
    paper_pixels = np.abs(frame - median) < SHADE_LEVELS + 2 * mad(frame)
    for _ in range(PLANE_ROUNDS):  # refit on the pixels near the last plane: ink drops out
        if paper_pixels.sum() < 3:
            return median
        coef = np.linalg.lstsq(design[paper_pixels], frame[paper_pixels], rcond=None)[0]
        residual = frame - design @ coef
        paper_pixels = np.abs(residual) < SHADE_LEVELS / 2 + 3 * mad(residual[paper_pixels])
    if abs(coef[1]) + abs(coef[2]) < SHADE_LEVELS:   # the plane's rise across the picture
        return median
    r = np.arange(h)[:, None] / (h - 1) - 0.5
    c = np.arange(w)[None, :] / (w - 1) - 0.5
    return coef[0] + coef[1] * r + coef[2] * c


def mad(values: np.ndarray) -> float:
    """The median absolute deviation from the median, scaled to a normal's sigma."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def drop_specks(ink: np.ndarray) -> np.ndarray:
    """`ink` without the blobs that are not part of the digit: dust, noise, a mark at the
    page's edge. The digit is the blobs of ink (pixels above INK_LEVEL, 8-connected) with at
    least SPECK_MASS of the heaviest one's ink, and, grown blob by blob, the blobs within
    SPECK_GAP of its longer side of the box they span; a blob smaller than one pixel of the
    digit scaled to BOX pixels (or than a square of the heaviest blob's stroke width, where
    that is less: a broken pen line's dashes) is noise wherever it lies. MNIST's own digits
    lose nothing."""
    from scipy import ndimage

    labels, n = ndimage.label(ink > INK_LEVEL * 255, structure=np.ones((3, 3), dtype=bool))
    if n < 2:
        return ink
    mass = np.asarray(ndimage.sum_labels(ink, labels, np.arange(1, n + 1)))
    pixels = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = np.array([(r.start, r.stop, c.start, c.stop)
                      for r, c in ndimage.find_objects(labels)])  # (n, 4): rows, columns
    kept = mass >= SPECK_MASS * mass.max()

    def span(blobs):  # (top, bottom, left, right) of the blobs' box
        return (boxes[blobs, 0].min(), boxes[blobs, 1].max(), boxes[blobs, 2].min(),
                boxes[blobs, 3].max())

    top, bottom, left, right = span(kept)
    scale = max(bottom - top, right - left) / BOX      # picture pixels per pixel of MNIST's
    heaviest = labels == np.argmax(mass) + 1
    edge = heaviest & ~ndimage.binary_erosion(heaviest)
    stroke = max(2.0 * heaviest.sum() / max(edge.sum(), 1), 1.0)  # area / half its perimeter
    candidates = pixels >= min(scale, stroke) ** 2     # a dash of a thin stroke is no noise
    while True:
        top, bottom, left, right = span(kept)
        gap = SPECK_GAP * max(bottom - top, right - left)
        near = candidates & ((boxes[:, 0] < bottom + gap) & (boxes[:, 1] > top - gap)
                             & (boxes[:, 2] < right + gap) & (boxes[:, 3] > left - gap))
        if (near <= kept).all():
            break
        kept |= near
    if kept.all():
        return ink
    return np.where(np.isin(labels, np.flatnonzero(~kept) + 1), 0.0, ink)


def ink_box(ink: np.ndarray, level: float = INK_LEVEL) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the pixels above `level` of full ink, bottom and right
    exclusive."""
    rows = np.flatnonzero((ink > level * 255).any(axis=1))
    cols = np.flatnonzero((ink > level * 255).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def crop_to_ink(ink: np.ndarray, margin: int = 0) -> np.ndarray:
    """The smallest rectangle holding every pixel above INK_LEVEL, widened by `margin`
    pixels on each side as far as the image goes."""
    top, bottom, left, right = ink_box(ink)
    return ink[max(top - margin, 0):bottom + margin, max(left - margin, 0):right + margin]


def fit_box(patch: np.ndarray, box: int = BOX) -> np.ndarray:
    """`patch` resized so that its longer side is `box`, aspect kept (area-averaged when
    shrinking: a digit upscaled by whole pixels comes back exactly)."""
    from PIL import Image

    h, w = patch.shape
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # Pillow wants (width, height)
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    resized = Image.fromarray(patch.astype(np.float32)).resize(size, resample)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 255.0)


def centre_of_mass(patch: np.ndarray) -> tuple[float, float]:
    """(row, column) of the ink's centre of mass, in pixels from the top left."""
    h, w = patch.shape
    mass = patch.sum()
    return (patch.sum(axis=1) @ np.arange(h)) / mass, (patch.sum(axis=0) @ np.arange(w)) / mass


def centre_by_mass(patch: np.ndarray, field: int = FIELD, centre: float = CENTRE) -> np.ndarray:
    """A (field, field) image with `patch` pasted so that its centre of mass is at `centre`,
    rounded to whole pixels; moved back as far as needed to keep its ink (pixels above
    INK_LEVEL) inside the field, where the ink fits. What lies past the edge is cut off."""
    h, w = patch.shape
    com_row, com_col = centre_of_mass(patch)
    top, left = int(round(centre - com_row)), int(round(centre - com_col))
    if (patch > INK_LEVEL * 255).any():  # none may be left after shrinking a thin stroke
        ink_top, ink_bottom, ink_left, ink_right = ink_box(patch)
        if ink_bottom - ink_top <= field:
            top = min(max(top, -ink_top), field - ink_bottom)
        if ink_right - ink_left <= field:
            left = min(max(left, -ink_left), field - ink_right)
    out = np.zeros((field, field))
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + h, field), min(left + w, field)
    out[r0:r1, c0:c1] = patch[r0 - top:r1 - top, c0 - left:c1 - left]
    return out


def laid_out(ink: np.ndarray) -> bool:
    """Whether `ink` is a 28x28 image laid out as MNIST's are: all its ink (above 0) 19 or 20
    pixels long (MNIST_SIDES; a smaller digit is scaled up), its centre of mass within
    MNIST_PLACED of (CENTRE, CENTRE)."""
    if ink.shape != (FIELD, FIELD) or not (ink > 0).any():
        return False
    top, bottom, left, right = ink_box(ink, 0.0)
    return (max(bottom - top, right - left) in MNIST_SIDES
            and bool(np.abs(np.array(centre_of_mass(ink)) - CENTRE).max() <= MNIST_PLACED))


def mnist_pixels(gray: np.ndarray, source: str = "image") -> np.ndarray:
    """(28, 28) float32 levels in [0, 255], laid out as MNIST lays out its digits."""
    ink = ink_levels(np.asarray(gray, dtype=np.float64), source)
    small = read_back(ink, INK_LEVEL)
    if small is not None:
        ink = small
    if laid_out(ink):
        return ink.astype(np.float32)
    if small is None:
        ink = drop_specks(ink)
    patch = crop_to_ink(ink)
    if max(patch.shape) < MIN_INK_SIDE:
        raise ImageError(f"{source}: the ink is only {patch.shape[1]}x{patch.shape[0]} pixels, "
                         f"too small to read as a digit; give a picture whose digit is at least "
                         f"{MIN_INK_SIDE} pixels long (MNIST's are 20)")
    if max(patch.shape) in MNIST_SIDES:  # already MNIST's size: kept unscaled, faint edges too
        patch = crop_to_ink(ink, FRINGE)
    else:
        patch = fit_box(patch)
        patch *= 255.0 / max(patch.max(), 1e-12)  # a thin stroke averaged down to a faint one
    return centre_by_mass(patch).astype(np.float32)


def load_digit(path: str | os.PathLike) -> np.ndarray:
    """The file at `path` as a (28, 28) MNIST-style image; an ImageError naming it if not."""
    return mnist_pixels(read_gray(path), str(path))
