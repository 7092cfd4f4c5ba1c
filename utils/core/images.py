"""Image files: header checks (size, pixel count, truncation), reading as float RGB and writing (atomically) from
float or uint8 RGB, for any file name (OpenCV gets bytes, never a path)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from utils.core.atomic import atomic_write

_IMAGE_END = {".jpg": (b"\xff\xd9",), ".jpeg": (b"\xff\xd9",), ".png": (b"IEND\xaeB`\x82",)}


def image_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(w, h) of an image from its header; ValueError naming the file when it is no readable image."""
    from PIL import Image

    path = Path(path)
    check_image_pixels(path, what)  # a declared size too large to decode is refused here already, by name
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... without the path
        raise ValueError(f"cannot read the {what} {path}: {_image_damage(path, exc)}") from exc


def _image_damage(path: Path, exc: BaseException | None = None) -> str:
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        return "the file is empty (0 bytes); expected a JPEG or PNG image"
    reason = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return f"the file ({size} bytes) is not a complete JPEG or PNG image{reason}; copy or export it again"


def check_image_complete(path: str | os.PathLike, what: str = "image") -> None:
    """Raise ValueError naming ``path`` when a JPEG or PNG file is truncated or damaged.

    Decoders (OpenCV included) accept a JPEG cut after its header and fill the missing rows with grey, so the end
    marker is checked (cheap); only a file without it is decoded in full by PIL, which fails on real truncation and
    accepts a complete image with trailing bytes after its end marker."""
    from PIL import Image

    path = Path(path)
    ends = _IMAGE_END.get(path.suffix.lower())
    if ends is None:
        return
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - 64))
        tail = fh.read().rstrip(b"\x00\r\n\t ")
    if tail.endswith(ends):
        return
    try:
        im = Image.open(path)
    except Exception as exc:  # not even a header: empty, random bytes, another format, cut inside the header
        raise ValueError(f"cannot decode the {what} {path}: {_image_damage(path, exc)}") from exc
    try:
        with im:
            im.load()
    except Exception as exc:
        raise ValueError(f"{what} {path} is truncated or damaged: {_image_damage(path, exc)}") from exc


def cv2_path(path: str | os.PathLike, what: str = "file") -> str:
    """``path`` as the str that OpenCV's path-taking functions (VideoCapture, VideoWriter) get, or ValueError naming
    it when its name is not valid UTF-8: OpenCV crashes the whole process (segfault, no message) on such a str
    (undecodable bytes arrive as lone surrogates).  Images never need this: :func:`imread_file` and
    :func:`imwrite_file` pass bytes, not paths, to OpenCV."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"the {what} path {text.encode('utf-8', 'surrogateescape')!r} is not valid UTF-8, which "
                         f"OpenCV cannot open: rename it (or the folder) with a UTF-8 name") from None
    return text


MAX_IMAGE_PIXELS = 120_000_000  # larger images are refused before decoding (a 120-megapixel RGB photo: 360 MB)


def check_image_pixels(path: str | os.PathLike, what: str = "image") -> None:
    """ValueError naming the file when its header declares more than MAX_IMAGE_PIXELS pixels (width x height, read
    from the header without decoding): a small file can declare a huge image (a 389 KB PNG of 20000 x 20000 pixels
    allocated ~10 GB when decoded), and every decoder allocates the declared size first."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except Image.DecompressionBombError as exc:  # PIL's own limit (2 x its MAX_IMAGE_PIXELS) is below ours too
        raise ValueError(f"{what} {path}: {exc}; this project decodes at most {MAX_IMAGE_PIXELS / 1e6:.0f} "
                         f"megapixels: scale the image down first") from None
    except Exception:  # not an image PIL knows: the decoder reports it (with the path)
        return
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what} {path} declares {w}x{h} pixels ({w * h / 1e6:.0f} megapixels), more than the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels this project decodes (refused before decoding): "
                         f"scale the image down first")


def imread_file(path: str | os.PathLike, flags: int) -> np.ndarray | None:
    """``cv2.imread`` for any path: Python reads the bytes, ``cv2.imdecode`` decodes them (same flags, EXIF
    orientation included), so a file name that is not UTF-8 works instead of crashing OpenCV.  None when the bytes
    are no image OpenCV decodes (as cv2.imread)."""
    import cv2

    check_image_pixels(path)  # before any decoder allocates the declared size
    buf = np.fromfile(os.fspath(path), dtype=np.uint8)
    if buf.size == 0:
        return None
    return cv2.imdecode(buf, flags)


def imwrite_file(path: str | os.PathLike, img: np.ndarray, params: Sequence[int] = ()) -> Path:
    """``cv2.imwrite`` for any path (format from the suffix): ``cv2.imencode`` in memory, then an atomic write of the
    bytes (:func:`atomic_write`), so a name that is not UTF-8 works and a crash never leaves half a file."""
    import cv2

    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(img), list(params))
    if not ok:
        raise OSError(f"OpenCV could not encode the image {path} (format {path.suffix!r})")
    return atomic_write(path, lambda fh: fh.write(buf.tobytes()))


def read_image(path: str | os.PathLike, what: str = "image", mode: str = "color") -> np.ndarray:
    """Read a complete image file as float32 in [0, 1] (8- or 16-bit files).

    ``mode``: "color" -> (H, W, 3) RGB (OpenCV's IMREAD_COLOR: EXIF orientation applied); "gray" -> (H, W);
    "unchanged" -> the stored channels, colour as RGB and alpha dropped.  Errors name the file and what was expected
    (missing, empty, truncated, undecodable)."""
    import cv2

    flags = {"color": cv2.IMREAD_COLOR, "gray": cv2.IMREAD_GRAYSCALE, "unchanged": cv2.IMREAD_UNCHANGED}
    if mode not in flags:
        raise ValueError(f"read_image: mode must be one of {sorted(flags)}, got {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    check_image_pixels(path, what)  # first: a decompression bomb is refused before anything decodes it
    check_image_complete(path, what)  # OpenCV would decode a truncated JPEG with grey rows
    img = imread_file(path, flags[mode])
    if img is None:
        raise ValueError(f"cannot decode the {what} {path}: {_image_damage(path)}")
    maxval = 65535.0 if img.dtype == np.uint16 else 255.0
    if img.ndim == 3:
        img = img[..., :3][..., ::-1]  # BGR(A) -> RGB, alpha dropped
    return np.ascontiguousarray(img).astype(np.float32) / maxval


def to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] -> uint8 RGB (uint8 input is returned as is)."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().numpy()
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def fit_height(image: np.ndarray, height: int) -> np.ndarray:
    """uint8 or float (h, w, 3) -> uint8 (height, w * height / h, 3)."""
    import cv2

    img = to_uint8(image)
    if img.shape[0] != height:
        w = max(2, int(round(img.shape[1] * height / img.shape[0])))
        img = cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA if img.shape[0] > height else cv2.INTER_LINEAR)
    return img


def save_image(path: str | os.PathLike, image: Tensor | np.ndarray) -> Path:
    """Write an (H, W, 3) RGB float image in [0, 1] as PNG/JPEG (by extension)."""
    import cv2

    path = Path(path)
    rgb = to_uint8(image)
    return imwrite_file(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # atomic, never through a link planted at ``path``


def save_image_grid(path: str | os.PathLike, image: Tensor | np.ndarray) -> Path:
    """Alias of save_image for an already tiled grid (kept for readability at call sites)."""
    return save_image(path, image)
