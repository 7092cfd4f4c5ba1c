"""Reader for NeRSemble subject folders as the identity-field paper used them (16 cameras, the
FLAME 2023 tracking of each sequence, the face-mask crops the preprocessing scripts write).

Layout of one subject (``<root>/<subject_id>``)::

    calibration/camera_params.json
    sequences/<sequence>/annotations/tracking/FLAME2023_v2/tracked_flame_params.npz
    sequences/<sequence>/timesteps/frame_<t>/images-2x/cam_<serial>.jpg

plus what the preprocessing scripts (utils/preprocess/) write into the frame folder ``frame_<t>``, where ``<t>`` is
the zero-padded five-digit frame index (``"00000"`` for frame 0, so the frame folder is ``frame_00000``)::

    <t>.ply                           posed FLAME mesh in world space            (FLAME2PLY.py)
    <t>_facemask.ply                  its face-mask sub-mesh                     (FLAME2PLY.py)
    <t>_facemask_subd{,2,3}.ply       the face mask subdivided 1/2/3 times       (FLAME2PLY.py)
    flame_cano2world.txt              4x4 FLAME-model-to-world transform         (FLAME2PLY.py)
    flamemask_proj/cam_<serial>.png   face mask projected into each camera       (projection_ply.py)
    filled_masked_images/cam_<serial>.png  photo with everything outside the face mask black (projection_ply.py)

Images come back as float32 (H, W, 3) RGB in [0, 1]; cameras follow models/camera.py (OpenCV, K in pixels of the
image actually returned).  Every missing file raises FileNotFoundError naming the file, what it is and which
script produces it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from models.camera import Camera
from models.flame import load_tracking
from utils.core.images import image_size, read_image
from utils.core.names import safe_name
from utils.data.camera_params import load_camera_params

# The 16 NeRSemble cameras; the list index is the camera id used by the paper.
SERIALS: tuple[str, ...] = (
    "222200042", "222200044", "222200046", "222200040", "222200036", "222200048", "220700191", "222200041",
    "222200037", "222200038", "222200047", "222200043", "222200049", "222200039", "222200045", "221501007",
)
FRONTAL_SERIAL = "222200037"  # camera id 8: the single view a new person is fitted from
HELDOUT_SERIALS: tuple[str, ...] = ("222200040", "220700191", "222200043", "221501007")  # novel-view protocol
HELDOUT_IDENTITIES: tuple[str, ...] = ("017", "030", "033", "038", "113", "124", "126", "211")
DEFAULT_SEQUENCE = "EXP-1-head"
DEFAULT_IMAGE_FOLDER = "images-2x"
TRACKING_RELPATH = Path("annotations") / "tracking" / "FLAME2023_v2" / "tracked_flame_params.npz"
CALIBRATION_RELPATH = Path("calibration") / "camera_params.json"
IMAGE_EXTENSIONS = ("jpg", "png", "jpeg")

# Suffix of the face-mask PLY for each subdivision level (0 = the plain face mask).
FACEMASK_SUFFIX = {0: "_facemask", 1: "_facemask_subd", 2: "_facemask_subd2", 3: "_facemask_subd3"}

_PREPROCESS_HINT = {
    "FLAME2PLY": "run python utils/preprocess/FLAME2PLY.py --data_root {root} --subjects {subject} "
    "--flame_dir <folder with flame2023.pkl>",
    "projection_ply": "run python utils/preprocess/projection_ply.py --data_root {root} --subjects {subject} "
    "--mask_images (after FLAME2PLY.py)",
}


def timestep_name(frame: int) -> str:
    """Frame index -> the ``<t>`` used in preprocessing file names ("00000"); the folder is ``frame_<t>``."""
    if frame < 0:
        raise ValueError(f"frame index must be >= 0, got {frame}")
    return f"{frame:05d}"


def list_subjects(root: str | os.PathLike) -> list[str]:
    """Sorted ids of the subject folders under ``root`` that hold ``calibration/camera_params.json``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"NeRSemble data root {root} does not exist (expected <root>/<subject_id>/calibration/camera_params.json; "
            f"generate synthetic data with python utils/make_synthetic_dataset.py --out DIR and use DIR/subjects)"
        )
    subjects = sorted(p.name for p in root.iterdir() if (p / CALIBRATION_RELPATH).is_file())
    if not subjects:
        raise FileNotFoundError(
            f"no subject folders in {root}: none of its sub-folders holds {CALIBRATION_RELPATH.as_posix()} "
            f"(is {root} the folder that directly contains the subject ids?)"
        )
    return subjects


def _read_image(path: Path, what: str, hint: str, size: tuple[int, int] | None, mode: str = "color",
                expected: tuple[int, int] | None = None, uniform: bool = False) -> np.ndarray:
    """A complete image file (utils.core.images.read_image) as float32 in [0, 1], RGB for colour, resized to ``size``
    (w, h) with INTER_AREA if given.

    ``expected`` (w, h): the size the stored file must have (that of the photo it belongs to), else ValueError naming
    the file; with ``uniform`` a uniform scaling of it (same aspect ratio, e.g. a half-size mask) is accepted too."""
    import cv2

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} ({hint})")
    img = read_image(path, what, mode)
    stored = (img.shape[1], img.shape[0])
    if expected is not None and stored != tuple(expected):
        ew, eh = expected
        if not (uniform and abs(stored[0] * eh - stored[1] * ew) <= max(ew, eh)):
            raise ValueError(f"{what} {path} is {stored[0]}x{stored[1]} pixels but its photo is {ew}x{eh}: expected "
                             f"{ew}x{eh}{' (or a uniform scaling of it)' if uniform else ''}; it belongs to another "
                             f"image size (rewrite it: {hint or 'run the preprocessing again with --overwrite'})")
    if size is not None and stored != tuple(size):
        img = cv2.resize(img, tuple(size), interpolation=cv2.INTER_AREA)
    return img


class NersembleSubject:
    """One subject, one sequence, one frame of a NeRSemble-layout dataset.

    Args:
        root: folder holding the subject folders.
        subject_id: e.g. "017".
        sequence: sequence name (default "EXP-1-head").
        frame: frame index (folder ``timesteps/frame_<frame:05d>``).
        image_folder: image folder inside the frame folder ("images-2x": half of the 2200x3208 calibration frames).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        subject_id: str,
        sequence: str = DEFAULT_SEQUENCE,
        frame: int = 0,
        image_folder: str = DEFAULT_IMAGE_FOLDER,
    ) -> None:
        self.root = Path(root)
        # ids and names become folders that are read and written: one safe component each (utils.core.names.safe_name)
        self.subject_id = safe_name(str(subject_id), "subject id", self.root)
        self.sequence = safe_name(sequence, "sequence name", self.root / self.subject_id)
        safe_name(image_folder, "image folder name", self.root / self.subject_id)
        self.frame = int(frame)
        self.image_folder = image_folder
        self.subject_dir = self.root / self.subject_id
        if not self.subject_dir.is_dir():
            have = sorted(p.name for p in self.root.iterdir() if (p / CALIBRATION_RELPATH).is_file()) \
                if self.root.is_dir() else []
            raise FileNotFoundError(
                f"subject folder not found: {self.subject_dir} (subjects under {self.root}: {have})"
            )
        self._size_cache: dict[str, tuple[int, int]] = {}

    def __repr__(self) -> str:
        return (f"NersembleSubject({str(self.root)!r}, {self.subject_id!r}, sequence={self.sequence!r}, "
                f"frame={self.frame})")

    # ------------------------------------------------------------------ paths
    @property
    def t(self) -> str:
        """The ``<t>`` of preprocessing file names, e.g. "00000"."""
        return timestep_name(self.frame)

    @property
    def calibration_path(self) -> Path:
        return self.subject_dir / CALIBRATION_RELPATH

    @property
    def sequence_dir(self) -> Path:
        return self.subject_dir / "sequences" / self.sequence

    @property
    def tracking_path(self) -> Path:
        return self.sequence_dir / TRACKING_RELPATH

    @property
    def frame_dir(self) -> Path:
        return self.sequence_dir / "timesteps" / f"frame_{self.t}"

    @property
    def image_dir(self) -> Path:
        return self.frame_dir / self.image_folder

    @property
    def flame_mesh_path(self) -> Path:
        return self.frame_dir / f"{self.t}.ply"

    def facemask_mesh_path(self, level: int = 1) -> Path:
        """``<t>_facemask.ply`` (level 0) or ``<t>_facemask_subd{,2,3}.ply`` (levels 1-3)."""
        if level not in FACEMASK_SUFFIX:
            raise ValueError(f"face-mask subdivision level must be one of {sorted(FACEMASK_SUFFIX)}, got {level}")
        return self.frame_dir / f"{self.t}{FACEMASK_SUFFIX[level]}.ply"

    @property
    def cano2world_path(self) -> Path:
        return self.frame_dir / "flame_cano2world.txt"

    def facemask_path(self, serial: str) -> Path:
        return self.frame_dir / "flamemask_proj" / f"cam_{safe_name(serial, 'camera serial', self.frame_dir)}.png"

    def masked_image_path(self, serial: str) -> Path:
        return (self.frame_dir / "filled_masked_images"
                / f"cam_{safe_name(serial, 'camera serial', self.frame_dir)}.png")

    def image_path(self, serial: str) -> Path:
        """Path of camera ``serial``'s image (jpg, png or jpeg); FileNotFoundError when none exists."""
        safe_name(serial, "camera serial", self.image_dir)
        for ext in IMAGE_EXTENSIONS:
            p = self.image_dir / f"cam_{serial}.{ext}"
            if p.is_file():
                return p
        raise FileNotFoundError(
            f"image of camera {serial} not found: {self.image_dir / f'cam_{serial}.jpg'} (NeRSemble "
            f"{self.image_folder} frame; download the subject or generate synthetic data with "
            f"utils/make_synthetic_dataset.py)"
        )

    def _hint(self, script: str) -> str:
        return _PREPROCESS_HINT[script].format(root=self.root, subject=self.subject_id)

    # ------------------------------------------------------------------ cameras and images
    def serials(self) -> list[str]:
        """Serials of the cameras whose image is present, in SERIALS order (unknown serials appended, sorted)."""
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {self.image_dir} (expected {self.image_folder}/cam_<serial>.jpg of frame "
                f"{self.frame} of sequence {self.sequence})"
            )
        present = set()
        for p in self.image_dir.iterdir():
            stem, ext = p.stem, p.suffix.lower().lstrip(".")
            if stem.startswith("cam_") and ext in IMAGE_EXTENSIONS:
                present.add(stem[4:])
        return [s for s in SERIALS if s in present] + sorted(present - set(SERIALS))

    def image_size(self, serial: str) -> tuple[int, int]:
        """(w, h) of the stored image of ``serial`` (header read only, cached)."""
        if serial not in self._size_cache:
            self._size_cache[serial] = image_size(self.image_path(serial), f"image of camera {serial}")
        return self._size_cache[serial]

    def loaded_size(self, serial: str, scale: float = 1.0) -> tuple[int, int]:
        """(w, h) of ``image(serial, scale)``: the stored size times ``scale``, rounded (as Camera.scaled does)."""
        w, h = self.image_size(serial)
        return (max(1, round(w * scale)), max(1, round(h * scale))) if scale != 1.0 else (w, h)

    def cameras(
        self, scale: float = 1.0, serials: Sequence[str] | None = None, *, image_scale: float | None = None
    ) -> dict[str, Camera]:
        """Cameras for the images as returned by ``image(serial, scale)``.

        The calibration (for the full 2200x3208 frames) is rescaled by the ratio read from the actual images,
        then resized to the loaded size ``round(w * scale) x round(h * scale)``.
        ``image_scale`` is an alias of ``scale``.
        Returns:
            {serial: Camera} in SERIALS order.
        """
        if image_scale is not None:
            scale = image_scale
        serials = list(self.serials() if serials is None else serials)
        sizes = {s: self.image_size(s) for s in serials}
        cams = load_camera_params(self.calibration_path, image_size=sizes, serials=serials)
        if scale != 1.0:
            cams = {s: c.resized(*self.loaded_size(s, scale)) for s, c in cams.items()}
        return cams

    def image(self, serial: str, scale: float = 1.0) -> np.ndarray:
        """Photo of camera ``serial``: float32 (H, W, 3) RGB in [0, 1], resized by ``scale`` (INTER_AREA)."""
        path = self.image_path(serial)
        size = self.loaded_size(serial, scale) if scale != 1.0 else None
        return _read_image(path, f"image of camera {serial}", "NeRSemble photo", size, "color")

    def facemask(self, serial: str, scale: float = 1.0) -> np.ndarray:
        """Projected FLAME face mask of camera ``serial``: float32 (H, W, 1) in [0, 1], at the size of
        ``image(serial, scale)`` (a mask stored at a uniform scaling of the photo's size is resized; another aspect
        ratio is an error)."""
        m = _read_image(
            self.facemask_path(serial),
            f"projected face mask of camera {serial}",
            self._hint("projection_ply"),
            self.loaded_size(serial, scale),
            "gray",
            expected=self.image_size(serial),
            uniform=True,
        )
        return m[..., None] if m.ndim == 2 else m[..., :1]

    def masked_image(self, serial: str, scale: float = 1.0) -> np.ndarray:
        """Face-masked photo (black outside the mask): float32 (H, W, 3).

        Read from ``filled_masked_images`` when present (it must have the photo's size), else computed as
        image * facemask.
        """
        path = self.masked_image_path(serial)
        if path.is_file():
            size = self.loaded_size(serial, scale)
            return _read_image(path, f"masked image of camera {serial}", self._hint("projection_ply") + " --overwrite",
                               size, "color", expected=self.image_size(serial))
        if not self.facemask_path(serial).is_file():
            raise FileNotFoundError(
                f"masked image of camera {serial} not found: neither {path} nor the projected face mask "
                f"{self.facemask_path(serial)} exists ({self._hint('projection_ply')})"
            )
        return self.image(serial, scale) * self.facemask(serial, scale)

    # ------------------------------------------------------------------ FLAME data
    def tracking(self):
        """FLAME tracking of the sequence (models.flame.FlameParams, all frames of the npz)."""

        if not self.tracking_path.is_file():
            raise FileNotFoundError(
                f"FLAME tracking not found: {self.tracking_path} (NeRSemble FLAME2023_v2 tracked_flame_params.npz of "
                f"sequence {self.sequence}; it ships with the NeRSemble annotations)"
            )
        return load_tracking(self.tracking_path)

    def frame_params(self, flame=None):
        """FLAME parameters of this frame (FlameParams, T = 1): the tracking row of ``self.frame`` (see
        :func:`tracking_row`).  ``flame``: a FlameModel that bakes VHAP's root pivot into the translation."""
        params = self.tracking()
        params = params.frame(tracking_row(self.tracking_path, self.frame, params.num_frames))
        return flame.bake_root_pivot(params) if flame is not None else params

    def frames(self) -> list[int]:
        """Indices of the frame folders ``timesteps/frame_<t>`` of this sequence, sorted."""
        root = self.sequence_dir / "timesteps"
        if not root.is_dir():
            raise FileNotFoundError(f"no frame folders: {root} does not exist (sequence {self.sequence} of "
                                    f"{self.subject_dir})")
        return sorted(int(p.name[6:]) for p in root.iterdir() if p.is_dir() and p.name.startswith("frame_")
                      and p.name[6:].isdigit())

    def sequences(self) -> list[str]:
        """Names of the sequence folders of this subject, sorted."""
        root = self.subject_dir / "sequences"
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def _read_mesh(self, path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
        if not path.is_file():
            raise FileNotFoundError(f"{what} not found: {path} ({self._hint('FLAME2PLY')})")
        return read_ply_mesh(path)

    def facemask_mesh(self, level: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Posed face-mask mesh of this frame (world space), subdivided ``level`` times (0-3).

        Returns:
            verts (V, 3) float32, faces (F, 3) int64.
        """
        path = self.facemask_mesh_path(level)
        return self._read_mesh(path, f"face-mask mesh (subdivision level {level})")

    def flame_mesh(self) -> tuple[np.ndarray, np.ndarray]:
        """Whole posed FLAME mesh ``<t>.ply`` of this frame: verts (V, 3) float32, faces (F, 3) int64."""
        return self._read_mesh(self.flame_mesh_path, "posed FLAME mesh")

    def cano2world(self) -> np.ndarray:
        """(4, 4) float64 FLAME-canonical-to-world transform from ``flame_cano2world.txt``."""
        path = self.cano2world_path
        if not path.is_file():
            raise FileNotFoundError(f"FLAME canonical-to-world transform not found: {path} ({self._hint('FLAME2PLY')})")
        m = np.loadtxt(path, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"{path} must hold a 4x4 matrix, got shape {m.shape}")
        return m


def _tracked_frame_ids(path: Path, num_frames: int) -> tuple[str | None, np.ndarray | None]:
    """(key, (T,) frame numbers) from a tracking file's ``frames`` (NeRSemble) or ``timestep_id`` (VHAP) key;
    (None, None) when it has neither (or one of another length)."""
    with np.load(path, allow_pickle=False) as z:
        key = "frames" if "frames" in z.files else ("timestep_id" if "timestep_id" in z.files else None)
        ids = np.asarray(z[key]).reshape(-1).astype(np.int64) if key else None
    return (key, ids) if ids is not None and len(ids) == num_frames else (None, None)


def tracking_row(path: str | os.PathLike, frame: int, num_frames: int) -> int:
    """Row of frame ``frame`` (the ``<t>`` of ``timesteps/frame_<t>``) in a tracking file of ``num_frames`` rows: found
    in its ``frames``/``timestep_id`` key when present, else the row ``frame`` itself."""
    path = Path(path)
    key, ids = _tracked_frame_ids(path, num_frames)
    if ids is not None:
        hit = np.nonzero(ids == frame)[0]
        if len(hit) == 0:
            raise ValueError(f"{path}: frame {frame} is not tracked (its '{key}' holds "
                             f"{ids[:5].tolist()}{' ...' if len(ids) > 5 else ''})")
        return int(hit[0])
    if not 0 <= frame < num_frames:
        raise ValueError(f"{path}: frame {frame} out of range (the file has {num_frames} frames)")
    return frame


def tracking_frame_ids(path: str | os.PathLike, num_frames: int) -> np.ndarray:
    """(T,) frame number of every row of a tracking file: its ``frames``/``timestep_id`` key, else 0..T-1."""
    ids = _tracked_frame_ids(Path(path), num_frames)[1]
    return ids if ids is not None else np.arange(num_frames, dtype=np.int64)


def read_ply_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Triangle mesh from a PLY file, vertex order preserved: verts (V, 3) float32, faces (F, 3) int64."""
    import trimesh

    path = Path(path)
    # process=False: trimesh must not merge or reorder vertices (vertex ids index the FLAME mask / subdivision).
    mesh = trimesh.load(str(path), process=False, force="mesh")
    verts = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) == 0:
        raise ValueError(f"{path} holds no vertices (expected a triangle mesh PLY)")
    if not np.isfinite(verts).all():
        bad = np.nonzero(~np.isfinite(verts).all(1))[0]
        raise ValueError(f"{path}: {len(bad)} vertices hold NaN or Inf coordinates (first: vertex {bad[0]}); expected "
                         f"finite positions (was it written from a broken FLAME tracking? run FLAME2PLY.py again)")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"{path} has faces of shape {faces.shape}, expected (F, 3) triangles")
    return verts, faces


def load_views(
    subject: NersembleSubject,
    serials: Sequence[str] | None = None,
    scale: float = 1.0,
    device: str | torch.device = "cpu",
    masks: str = "facemask",
) -> tuple[Tensor, Tensor, list[Camera]]:
    """Load several views of one subject as tensors.

    Args:
        subject: the subject/frame to read.
        serials: cameras to load (default: every camera with an image, SERIALS order).
        scale: resize factor applied to the stored images (and the cameras).
        device: where the tensors go.
        masks: "facemask" (projected face masks; FileNotFoundError when preprocessing has not run) or "none"
            (all-ones masks, for raw captures).
    Returns:
        images (C, H, W, 3) float32 in [0, 1], masks (C, H, W, 1) float32, cameras: list of C Camera on ``device``.
    """
    if masks not in ("facemask", "none"):
        raise ValueError(f"masks must be 'facemask' or 'none', got {masks!r}")
    serials = list(subject.serials() if serials is None else serials)
    if not serials:
        raise FileNotFoundError(f"no images for {subject} in {subject.image_dir}")
    cams = subject.cameras(scale, serials)
    imgs, msks = [], []
    for s in serials:
        img = subject.image(s, scale)
        cam = cams[s]
        if img.shape[:2] != (cam.height, cam.width):
            raise ValueError(
                f"camera {s}: image is {img.shape[1]}x{img.shape[0]} but its camera is {cam.width}x{cam.height}"
            )
        imgs.append(torch.from_numpy(img))
        if masks == "facemask":
            m = subject.facemask(s, scale)
            if m.shape[:2] != img.shape[:2]:
                raise ValueError(
                    f"camera {s}: face mask {subject.facemask_path(s)} is {m.shape[1]}x{m.shape[0]}, "
                    f"image is {img.shape[1]}x{img.shape[0]}"
                )
            msks.append(torch.from_numpy(np.ascontiguousarray(m)))
        else:
            msks.append(torch.ones(img.shape[0], img.shape[1], 1))
    sizes = {tuple(t.shape) for t in imgs}
    if len(sizes) != 1:
        raise ValueError(f"views of {subject} have different sizes {sorted(sizes)}; load them separately")
    return (
        torch.stack(imgs).to(device),
        torch.stack(msks).to(device),
        [cams[s].to(device) for s in serials],
    )
