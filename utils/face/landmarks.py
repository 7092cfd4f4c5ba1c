"""2D face landmarks of a photo, in the iBUG-68 layout that FLAME's landmark embeddings use.

The detector is mediapipe's face mesh (``mediapipe.solutions.face_mesh``: 468 points, 478 with the irises); its
face-detector and mesh weights ship inside the PyPI wheel, so nothing is downloaded at run time.  mediapipe 0.10.21
is the newest release that still has ``solutions``; install its numpy-2 build without dependencies
(``pip install -r requirements-landmarks.txt --no-deps``, see README).

The mesh points are turned into the 68 iBUG points by :data:`IBUG68_FROM_MEDIAPIPE`: every iBUG point is one mesh
point or a fixed weighted mean of two.  The table was derived by ``benchmarks/derive_landmark_map.py`` (a one-off
script, committed with its printed residuals in ``benchmarks/results/landmark_map.md``): dlib's 68-point predictor
(iBUG 300-W annotation) and mediapipe were run on the two public-domain portraits that ship in packages
(scikit-image's astronaut, matplotlib's grace_hopper), their mirror images and rescaled, rotated, shifted and
re-lit versions of all four; per iBUG point the mesh point or pair (weight on a 0.05 grid) with the smallest mean
error, in units of the inter-ocular distance, was kept.  dlib is used by that script only, never by this project.
iBUG 17..67 are FLAME's 51 static landmarks (``flame_static_embedding.pkl``); 0..16 the jaw contour (FLAME's
optional dynamic embedding).

Conventions: pixel coordinates x right, y down, pixel centres at +0.5 (models/camera.py); subject's right = image
left in a frontal photo (iBUG 36 is the outer corner of the subject's right eye).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

NUM_IBUG = 68
IBUG_STATIC = slice(17, 68)  # the 51 points of FLAME's static embedding
IBUG_CONTOUR = slice(0, 17)  # the jaw contour (FLAME's dynamic embedding)
NUM_MESH = 468  # mediapipe face-mesh points without the iris refinement
MIN_FACE_PX = 64  # default smallest face (height of the landmark box, pixels) that is fitted
MIN_SEARCH_PX = 32  # small faces: detector boxes smaller than this are ignored (half the default MIN_FACE_PX)
CROP_PX = 256  # small faces (LandmarkDetector.small_faces): each face's crop is scaled to this many pixels

INSTALL_HINT = ("face landmarks need mediapipe 0.10.21 (the last release that bundles the face-mesh model): "
                "pip install -r requirements-landmarks.txt --no-deps  (see README, 'A head from any photo')")

# iBUG-68 point i = sum of weight * mediapipe point over its entries.  Derived, not copied: see the module docstring
# and benchmarks/derive_landmark_map.py (which prints this table and the residual of every point).
IBUG68_FROM_MEDIAPIPE: tuple[tuple[tuple[int, float], ...], ...] = (
    ((227, 0.60), (162, 0.40),),  # 0
    ((177, 0.50), (34, 0.50),),  # 1
    ((147, 0.50), (177, 0.50),),  # 2
    ((215, 0.80), (138, 0.20),),  # 3
    ((172, 1.00),),  # 4
    ((150, 0.50), (136, 0.50),),  # 5
    ((149, 1.00),),  # 6
    ((148, 0.65), (176, 0.35),),  # 7
    ((152, 1.00),),  # 8
    ((377, 0.65), (400, 0.35),),  # 9
    ((378, 1.00),),  # 10
    ((379, 0.60), (365, 0.40),),  # 11
    ((367, 0.55), (365, 0.45),),  # 12
    ((435, 0.75), (367, 0.25),),  # 13
    ((376, 0.50), (401, 0.50),),  # 14
    ((366, 0.80), (356, 0.20),),  # 15
    ((356, 0.80), (447, 0.20),),  # 16
    ((162, 0.55), (30, 0.45),),  # 17
    ((68, 0.70), (160, 0.30),),  # 18
    ((103, 0.50), (158, 0.50),),  # 19
    ((69, 0.65), (190, 0.35),),  # 20
    ((189, 0.55), (108, 0.45),),  # 21
    ((336, 0.90), (463, 0.10),),  # 22
    ((336, 0.65), (333, 0.35),),  # 23
    ((258, 0.55), (332, 0.45),),  # 24
    ((284, 0.55), (388, 0.45),),  # 25
    ((389, 0.60), (260, 0.40),),  # 26
    ((413, 0.55), (243, 0.45),),  # 27
    ((174, 0.50), (465, 0.50),),  # 28
    ((195, 0.75), (4, 0.25),),  # 29
    ((4, 1.00),),  # 30
    ((218, 0.80), (165, 0.20),),  # 31
    ((97, 0.60), (238, 0.40),),  # 32
    ((94, 0.70), (164, 0.30),),  # 33
    ((326, 0.60), (458, 0.40),),  # 34
    ((289, 1.00),),  # 35
    ((110, 0.70), (225, 0.30),),  # 36
    ((25, 0.50), (222, 0.50),),  # 37
    ((28, 0.70), (231, 0.30),),  # 38
    ((133, 0.75), (22, 0.25),),  # 39
    ((155, 0.50), (24, 0.50),),  # 40
    ((144, 0.70), (24, 0.30),),  # 41
    ((381, 0.75), (465, 0.25),),  # 42
    ((385, 0.85), (256, 0.15),),  # 43
    ((388, 0.60), (385, 0.40),),  # 44
    ((249, 0.75), (359, 0.25),),  # 45
    ((390, 0.65), (253, 0.35),),  # 46
    ((374, 0.65), (256, 0.35),),  # 47
    ((78, 0.55), (57, 0.45),),  # 48
    ((80, 0.75), (165, 0.25),),  # 49
    ((82, 0.65), (167, 0.35),),  # 50
    ((13, 0.75), (164, 0.25),),  # 51
    ((312, 0.65), (393, 0.35),),  # 52
    ((269, 0.70), (415, 0.30),),  # 53
    ((291, 0.85), (287, 0.15),),  # 54
    ((320, 0.60), (406, 0.40),),  # 55
    ((313, 0.65), (317, 0.35),),  # 56
    ((18, 0.65), (14, 0.35),),  # 57
    ((83, 0.65), (87, 0.35),),  # 58
    ((90, 0.60), (182, 0.40),),  # 59
    ((76, 0.70), (95, 0.30),),  # 60
    ((38, 0.80), (86, 0.20),),  # 61
    ((312, 0.65), (178, 0.35),),  # 62
    ((268, 0.80), (316, 0.20),),  # 63
    ((308, 0.75), (325, 0.25),),  # 64
    ((317, 0.90), (405, 0.10),),  # 65
    ((14, 0.90), (18, 0.10),),  # 66
    ((87, 0.90), (181, 0.10),),  # 67
)


class LandmarkError(ValueError):
    """A photo whose landmarks cannot be used (the message names the file and what was expected)."""


class NoFaceError(LandmarkError):
    pass


class FaceTooSmallError(LandmarkError):
    """A face was found but is under the minimum size; ``size``: its height in pixels (forehead to chin)."""

    def __init__(self, message: str, size: float = 0.0):
        super().__init__(message)
        self.size = float(size)


@dataclass
class FaceLandmarks:
    """The landmarks of one face in one image.

    Attributes:
        mesh: (478, 3) or (468, 3) mediapipe points: x, y in pixels; z (relative depth) in pixels of x.
        ibug68: (68, 2) iBUG-68 points in pixels (from :data:`IBUG68_FROM_MEDIAPIPE`).
        box: (x0, y0, x1, y1) bounding box of the mesh points, pixels.
        image_size: (width, height) of the image.
        num_faces: faces the detector found in the image (the largest one is this one).
        name: the image's name (file) used in messages.
    """

    mesh: np.ndarray
    ibug68: np.ndarray
    box: tuple[float, float, float, float]
    image_size: tuple[int, int]
    num_faces: int = 1
    name: str = "image"
    outline: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (K, 2) face outline polygon, pixels

    def scaled(self, sx: float, sy: float) -> "FaceLandmarks":
        """The same landmarks in an image resized by (sx, sy) (mesh z scales with x)."""
        from dataclasses import replace

        w, h = self.image_size
        return replace(self, mesh=self.mesh * np.array([sx, sy, sx])[: self.mesh.shape[1]],
                       ibug68=self.ibug68 * np.array([sx, sy]), outline=self.outline * np.array([sx, sy]),
                       box=(self.box[0] * sx, self.box[1] * sy, self.box[2] * sx, self.box[3] * sy),
                       image_size=(max(1, round(w * sx)), max(1, round(h * sy))))

    @property
    def face_size(self) -> float:
        """Height of the landmark box in pixels (forehead to chin)."""
        return float(self.box[3] - self.box[1])

    @property
    def inter_ocular(self) -> float:
        """Distance between the outer eye corners (iBUG 36 and 45), pixels."""
        return float(np.linalg.norm(self.ibug68[36] - self.ibug68[45]))


def mediapipe_to_ibug68(mesh_xy: np.ndarray) -> np.ndarray:
    """(..., >=468, 2) mediapipe points -> (..., 68, 2) iBUG-68 points (:data:`IBUG68_FROM_MEDIAPIPE`)."""
    if len(IBUG68_FROM_MEDIAPIPE) != NUM_IBUG:
        raise RuntimeError("IBUG68_FROM_MEDIAPIPE is incomplete: run benchmarks/derive_landmark_map.py")
    mesh_xy = np.asarray(mesh_xy, dtype=np.float64)
    W = mapping_matrix(mesh_xy.shape[-2])
    return np.einsum("lm,...mc->...lc", W, mesh_xy)


def mapping_matrix(num_mesh: int = NUM_MESH) -> np.ndarray:
    """(68, num_mesh) matrix of :data:`IBUG68_FROM_MEDIAPIPE` (rows sum to 1)."""
    W = np.zeros((NUM_IBUG, num_mesh))
    for i, entries in enumerate(IBUG68_FROM_MEDIAPIPE):
        for j, w in entries:
            W[i, j] += w
    return W


def _face_oval_loop() -> list[int]:
    """mediapipe's face-oval edges ordered into one closed loop of mesh indices (read from the package)."""
    import mediapipe as mp

    edges = [tuple(e) for e in mp.solutions.face_mesh.FACEMESH_FACE_OVAL]
    nxt: dict[int, list[int]] = {}
    for a, b in edges:
        nxt.setdefault(a, []).append(b)
        nxt.setdefault(b, []).append(a)
    start = edges[0][0]
    loop, prev, cur = [start], None, start
    while True:
        cand = [b for b in nxt[cur] if b != prev]
        if not cand or cand[0] == start:
            break
        prev, cur = cur, cand[0]
        loop.append(cur)
        if len(loop) > len(nxt):
            break
    return loop


def _import_mediapipe():
    # mediapipe logs through glog/absl to stderr on every graph start; keep warnings, drop the info lines
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mediapipe as mp
        mp.solutions.face_mesh  # noqa: B018  (0.10.30+ and 1.x have no solutions)
    except (ImportError, AttributeError) as exc:
        raise ImportError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from exc
    return mp


def as_uint8_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """(H, W, 3) RGB float in [0, 1] or uint8 -> contiguous uint8 RGB (what mediapipe reads)."""
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise LandmarkError(f"{name}: expected an (H, W, 3) RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


class LandmarkDetector:
    """mediapipe face mesh, kept open across calls (photos, or the frames of a video).

    Args:
        static_images: True: every image is detected on its own (photos); False: video mode, the mesh of the last
            frame seeds the next (faster, steadier; frames must be given in order).
        max_faces: faces looked for per image (the largest is returned; more than one is reported).
        min_face_px: smallest usable face, as the height of its landmark box in pixels.
        min_confidence: mediapipe's face-detection confidence threshold.
        refine: mediapipe's attention model (478 points: better eyes and lips; iris points 468..477).
    """

    def __init__(self, static_images: bool = True, max_faces: int = 4, min_face_px: float = MIN_FACE_PX,
                 min_confidence: float = 0.5, refine: bool = True) -> None:
        mp = _import_mediapipe()
        self.min_face_px = float(min_face_px)
        self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=static_images, max_num_faces=max_faces,
                                                     refine_landmarks=refine, min_detection_confidence=min_confidence,
                                                     min_tracking_confidence=min_confidence)
        self._oval = _face_oval_loop()
        self._refine, self._min_confidence, self._static = refine, min_confidence, static_images
        self._max_faces = max_faces
        self._finder = None  # full-range face detector and a one-face mesh for crops: made on first use (small_faces)
        self._crop_mesh = None

    def close(self) -> None:
        self._mesh.close()
        for extra in (self._finder, self._crop_mesh):
            if extra is not None:
                extra.close()

    def __enter__(self) -> "LandmarkDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def detect_all(self, image: np.ndarray, name: str = "image") -> list[np.ndarray]:
        """Every face's mesh: a list of (478 or 468, 3) arrays in pixels (x, y; z in pixels of x), any order."""
        rgb = as_uint8_rgb(image, name)
        h, w = rgb.shape[:2]
        res = self._mesh.process(rgb)
        faces = []
        for lm in res.multi_face_landmarks or []:
            a = np.array([[p.x, p.y, p.z] for p in lm.landmark], dtype=np.float64)
            faces.append(a * np.array([w, h, w]))
        if not self._static:  # video: the tiled search (about 1 s a frame on a CPU) would dominate the frame rate
            return faces
        # photos: the faces the mesh's own detector missed too (small faces of a group photo), so that the faces
        # counted and the one fitted are every face of the photo
        boxes = [_mesh_box(m) for m in faces]
        for m in self.small_faces(rgb):
            if all(_overlap(_mesh_box(m), b) < 0.3 for b in boxes):
                faces.append(m)
                boxes.append(_mesh_box(m))
        return faces

    def _face_boxes(self, rgb: np.ndarray) -> list[tuple[float, float, float]]:
        """(centre x, centre y, size) in pixels of the faces the full-range detector finds, largest first.  The
        detector sees a 192-pixel version of its input, so the photo is also searched in overlapping square tiles
        of 1/2 and 1/4 of its shorter side (a face 7 % of the photo's height is 13 pixels in the whole photo, 54 in
        a quarter tile); boxes found twice are merged (the larger kept)."""
        h, w = rgb.shape[:2]
        short = min(h, w)
        boxes: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1, pixels of the photo
        for side in (short, short // 2, short // 4):
            if side < 96 and boxes:
                break
            step = max(1, side // 2)
            for ty in sorted({*range(0, max(1, h - side + 1), step), max(0, h - side)}):
                for tx in sorted({*range(0, max(1, w - side + 1), step), max(0, w - side)}):
                    tile = np.ascontiguousarray(rgb[ty:ty + side, tx:tx + side])
                    th, tw = tile.shape[:2]
                    for det in self._finder.process(tile).detections or []:
                        b = det.location_data.relative_bounding_box
                        boxes.append((tx + b.xmin * tw, ty + b.ymin * th, tx + (b.xmin + b.width) * tw,
                                      ty + (b.ymin + b.height) * th))
        # too small to be fitted (and where the detector finds texture, e.g. a badge, as a face)
        boxes = [b for b in boxes if max(b[2] - b[0], b[3] - b[1]) >= MIN_SEARCH_PX]
        boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        kept: list[tuple[float, float, float, float]] = []
        for b in boxes:
            if all(_overlap(b, k) < 0.3 for k in kept):
                kept.append(b)
        return [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, max(b[2] - b[0], b[3] - b[1])) for b in kept]

    def small_faces(self, rgb: np.ndarray) -> list[np.ndarray]:
        """Faces the face mesh's own detector misses when they are small (its short-range model looks for faces that
        fill a good part of the image: in a group photo of 1800x1200 pixels, faces 85 pixels high were not found).
        mediapipe's full-range face detector finds the faces' boxes; each box, grown to twice its size and scaled to
        CROP_PX pixels, goes through a one-face mesh, and the mesh is mapped back to the photo's pixels.

        rgb: (H, W, 3) uint8.  Returns the meshes as :meth:`detect_all` (pixels of the photo)."""
        mp = _import_mediapipe()
        if self._finder is None:
            self._finder = mp.solutions.face_detection.FaceDetection(model_selection=1,
                                                                     min_detection_confidence=self._min_confidence)
            self._crop_mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                                              refine_landmarks=self._refine,
                                                              min_detection_confidence=self._min_confidence)
        import cv2

        h, w = rgb.shape[:2]
        faces = []
        for cx, cy, size in self._face_boxes(rgb)[: self._max_faces]:
            side = 2.0 * size
            x0, y0 = cx - side / 2, cy - side / 2
            # the crop as an affine warp: parts outside the photo are black, the crop is CROP_PX square
            s = CROP_PX / side
            crop = cv2.warpAffine(rgb, np.array([[s, 0, -x0 * s], [0, s, -y0 * s]], np.float32), (CROP_PX, CROP_PX),
                                  flags=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
            res = self._crop_mesh.process(np.ascontiguousarray(crop))
            for lm in res.multi_face_landmarks or []:
                a = np.array([[p.x, p.y, p.z] for p in lm.landmark], dtype=np.float64) * CROP_PX / s
                a[:, 0] += x0
                a[:, 1] += y0
                faces.append(a)
        return faces

    def detect(self, image: np.ndarray, name: str = "image") -> FaceLandmarks:
        """The largest face of ``image`` ((H, W, 3) RGB, uint8 or float in [0, 1]).

        Raises NoFaceError (no face: the message names ``name``), FaceTooSmallError (the size found and the
        minimum); more than one face: warns and returns the largest (``num_faces`` says how many)."""
        h, w = np.asarray(image).shape[:2]
        faces = self.detect_all(image, name)
        if not faces:
            raise NoFaceError(f"no face found in {name} ({w}x{h} pixels): the detector needs one clearly visible, "
                              f"roughly frontal face that fills a good part of the photo (crop the photo around "
                              f"the face)")

        def box(m: np.ndarray) -> tuple[float, float, float, float]:
            return float(m[:, 0].min()), float(m[:, 1].min()), float(m[:, 0].max()), float(m[:, 1].max())

        areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in map(box, faces)]
        k = int(np.argmax(areas))
        if len(faces) > 1:
            x0, y0, x1, y1 = box(faces[k])
            others = ", ".join(f"{b[2] - b[0]:.0f} px at ({(b[0] + b[2]) / 2:.0f}, {(b[1] + b[3]) / 2:.0f})"
                               for i, b in enumerate(map(box, faces)) if i != k)
            warnings.warn(f"{name}: {len(faces)} faces found; fitting the largest: {x1 - x0:.0f} px wide, centred at "
                          f"pixel ({(x0 + x1) / 2:.0f}, {(y0 + y1) / 2:.0f}) (others: {others}); crop the photo to "
                          f"choose another", stacklevel=2)
        mesh = faces[k]
        b = box(mesh)
        size = b[3] - b[1]
        if size < self.min_face_px:
            raise FaceTooSmallError(f"the face in {name} is {size:.0f} pixels high (forehead to chin), the minimum "
                                    f"is {self.min_face_px:.0f}: use a larger or closer crop of the face", size)
        return FaceLandmarks(mesh=mesh, ibug68=mediapipe_to_ibug68(mesh[:NUM_MESH, :2]), box=b, image_size=(w, h),
                             num_faces=len(faces), name=name, outline=mesh[self._oval, :2])


def _mesh_box(m: np.ndarray) -> tuple[float, float, float, float]:
    return float(m[:, 0].min()), float(m[:, 1].min()), float(m[:, 0].max()), float(m[:, 1].max())


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area of two (x0, y0, x1, y1) boxes (a face found in two tiles, or a
    part of a face found in a tile that cuts it, overlaps its other box by most of the smaller one)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1e-9)


def detect_landmarks(image: np.ndarray, name: str = "image", min_face_px: float = MIN_FACE_PX,
                     detector: "LandmarkDetector | None" = None) -> FaceLandmarks:
    """:meth:`LandmarkDetector.detect` on a photo ((H, W, 3) RGB, uint8 or float in [0, 1]): with ``detector`` (a
    static-image detector kept open by the caller; its own ``min_face_px``), else with a detector opened for this
    photo alone (mediapipe's graph set-up is most of a one-shot detection's time)."""
    if detector is not None:
        return detector.detect(image, name)
    with LandmarkDetector(static_images=True, min_face_px=min_face_px) as det:
        return det.detect(image, name)


def load_landmarks_file(path: str | os.PathLike, image_size: tuple[int, int]) -> FaceLandmarks:
    """Landmarks given by the user instead of the detector: a text/.npy file of (68, 2) iBUG points in pixels of
    the photo (x right, y down), one point per row.  ``image_size``: (width, height) of the photo."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark file not found: {path} (expected (68, 2) iBUG-68 pixel coordinates, "
                                f".npy or text)")
    try:
        pts = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, delimiter=None, ndmin=2)
    except (ValueError, OSError) as exc:
        raise LandmarkError(f"{path}: cannot read landmarks ({exc}); expected (68, 2) pixel coordinates") from exc
    pts = np.asarray(pts, dtype=np.float64)
    if pts.shape != (NUM_IBUG, 2) or not np.isfinite(pts).all():
        raise LandmarkError(f"{path}: expected (68, 2) finite iBUG-68 pixel coordinates, got shape {pts.shape}")
    b = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
    return FaceLandmarks(mesh=np.zeros((0, 3)), ibug68=pts, box=b, image_size=tuple(image_size), name=str(path))


def draw_landmarks(image: np.ndarray, detected: np.ndarray, fitted: np.ndarray | None = None,
                   outline: np.ndarray | None = None, max_size: int = 768, margin: float | None = None) -> np.ndarray:
    """The photo with detected points (green dots), fitted points (red crosses, a line from each detected point to
    its fitted one) and the face outline (thin yellow); returns (H', W', 3) uint8 RGB, downscaled to at most
    ``max_size`` pixels.  detected, fitted: (L, 2) pixels; outline (K, 2).  ``margin``: crop the photo to the
    points' box grown by this fraction of its size on every side (None: the whole photo)."""
    import cv2

    img = as_uint8_rgb(image)
    if margin is not None:
        pts = np.concatenate([np.asarray(detected, np.float64).reshape(-1, 2)]
                             + ([np.asarray(outline, np.float64).reshape(-1, 2)] if outline is not None else []))
        lo, hi = pts.min(0), pts.max(0)
        pad = margin * (hi - lo).max()
        x0, y0 = (np.floor(np.maximum(lo - pad, 0))).astype(int)
        x1, y1 = (np.ceil(np.minimum(hi + pad, img.shape[1::-1]))).astype(int)
        img = img[y0:y1, x0:x1]
        shift = np.array([x0, y0], np.float64)
        detected = np.asarray(detected) - shift
        fitted = None if fitted is None else np.asarray(fitted) - shift
        outline = None if outline is None else np.asarray(outline) - shift
    h, w = img.shape[:2]
    s = min(1.0, max_size / max(h, w))
    up = 4 if s * max(h, w) < 400 else 1  # small photos: draw on an upscaled copy so marks stay readable
    k = s * up
    img = cv2.resize(img, (round(w * k), round(h * k)), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_NEAREST)
    img = np.ascontiguousarray(img[..., ::-1])  # BGR for cv2 drawing
    r = max(1, round(min(img.shape[:2]) / 200))
    sh = 4  # sub-pixel drawing: 4 fractional bits

    def pt(p: np.ndarray) -> tuple[int, int]:
        return int(round(p[0] * k * (1 << sh))), int(round(p[1] * k * (1 << sh)))

    if outline is not None and len(outline):
        cv2.polylines(img, [np.array([pt(p) for p in outline], np.int32)], True, (0, 220, 255), 1, cv2.LINE_AA, sh)
    for i, p in enumerate(detected):
        if fitted is not None and np.isfinite(fitted[i]).all():
            cv2.line(img, pt(p), pt(fitted[i]), (255, 255, 255), 1, cv2.LINE_AA, sh)
        cv2.circle(img, pt(p), r << sh, (60, 220, 60), -1, cv2.LINE_AA, sh)
    if fitted is not None:
        for q in fitted[np.isfinite(fitted).all(-1)]:
            cv2.drawMarker(img, (int(q[0] * k), int(q[1] * k)), (40, 40, 255), cv2.MARKER_CROSS, 3 * r, 1,
                           cv2.LINE_AA)
    return np.ascontiguousarray(img[..., ::-1])


def reprojection_error(detected: np.ndarray, fitted: np.ndarray, points: Sequence[int] | slice = IBUG_STATIC
                       ) -> dict[str, float]:
    """Mean distance (pixels) of fitted to detected iBUG points (``points``: the 51 static ones by default) and the
    same relative to the inter-ocular distance of the detected points (outer eye corners, iBUG 36 / 45)."""
    d = np.asarray(detected, dtype=np.float64)
    f = np.asarray(fitted, dtype=np.float64)
    err = np.linalg.norm(d[points] - f[points], axis=-1)
    iod = float(np.linalg.norm(d[36] - d[45]))
    return {"landmark_error_px": float(err.mean()), "landmark_error_max_px": float(err.max()),
            "inter_ocular_px": iod, "landmark_error_iod": float(err.mean() / max(iod, 1e-9))}
