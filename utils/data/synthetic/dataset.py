"""Synthetic NeRSemble-format dataset rendered from known ground-truth Gaussian heads (the same files and
layout as a preprocessed NeRSemble subject, utils/data/nersemble.py, so every script runs on it unchanged).

``make_synthetic_dataset(out, ...)`` writes::

    <out>/flame/                 FLAME-format model files (utils.data.synthetic.flame_files.write_flame_files)
    <out>/subjects/<id>/calibration/camera_params.json
    <out>/subjects/<id>/sequences/EXP-1-head/annotations/tracking/FLAME2023_v2/tracked_flame_params.npz
    <out>/subjects/<id>/sequences/EXP-1-head/timesteps/frame_00000/images-2x/cam_<serial>.jpg   (16 cameras)
    <out>/subjects/<id>/sequences/EXP-1-head/timesteps/frame_<t>/images-2x/...   frames 1..N-1 with num_frames N > 1:
                                 non-neutral expression, jaw, neck and eyes (sample_frame_params), same head
    <out>/synthetic_info.json    seed, sizes, training / held-out ids (the split), per-identity appearance summary;
                                 written last (while generating, <out>/.synthetic_pending.json claims the folder)

exactly in the real NeRSemble layout, so every reader and preprocessing script runs on it unchanged.  The parts: the
rig (rig.py), identities (identity.py), sequences (motion.py), the texture (texture.py), ground-truth heads and
their rendering (render.py), the synthetic FLAME model (flame_model.py).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.flame import (
    save_nersemble_tracking,
)
from models.gaussians import GaussianCloud
from utils.core.atomic import atomic_write_json
from utils.core.images import imwrite_file
from utils.core.names import safe_child, safe_name
from utils.data.camera_params import load_camera_params, write_camera_params
from utils.data.nersemble import (
    CALIBRATION_RELPATH,
    DEFAULT_SEQUENCE,
    FRONTAL_SERIAL,
    HELDOUT_IDENTITIES,
    HELDOUT_SERIALS,
    SERIALS,
    TRACKING_RELPATH,
    timestep_name,
)
from utils.data.synthetic.flame_files import write_flame_files
from utils.data.synthetic.flame_mesh import EYEBALL_VERTICES, eyeball_mesh
from utils.data.synthetic.flame_model import make_flame_model
from utils.data.synthetic.identity import SyntheticIdentity, identity_rngs, sample_identity
from utils.data.synthetic.motion import MOTIONS, sample_frame_params, sequence_params
from utils.data.synthetic.render import GroundTruthHeads, render_ground_truth
from utils.data.synthetic.rig import auto_subdivision, image_size_for, make_rig

GENERATOR_VERSION = 2  # 2: FLAME-like eyes (almond lid openings, eyeballs set back) and mouth (lips that part)
INFO_NAME = "synthetic_info.json"  # written last: its presence means the dataset is complete
PENDING_NAME = ".synthetic_pending.json"  # claims the folder while generating (an interrupted run resumes from it)
DEFAULT_NUM_IDENTITIES = 24  # training identities; ~24 span the appearance distribution (see README)
DEFAULT_NUM_HELDOUT = 2
DEFAULT_IMAGE_SIZE = 96  # height of the written images-2x (width = round(S * 1100 / 1604))
FIRST_TRAINING_ID = 300
JPEG_QUALITY = 95


def default_subject_ids(num_identities: int, num_heldout: int) -> tuple[list[str], list[str]]:
    """(training ids "300", "301", ..., held-out ids HELDOUT_IDENTITIES[:num_heldout])."""
    if num_identities < 0 or num_heldout < 0:
        raise ValueError(f"identity counts must be >= 0, got {num_identities} training and {num_heldout} held-out")
    if num_heldout > len(HELDOUT_IDENTITIES):
        raise ValueError(f"at most {len(HELDOUT_IDENTITIES)} held-out identities (the protocol ids), got {num_heldout}")
    return [str(FIRST_TRAINING_ID + i) for i in range(num_identities)], list(HELDOUT_IDENTITIES[:num_heldout])


def _dataset_key(seed: int, image_size: int, subdivision: int, num_frames: int = 1,
                 motion: str = "expressions", eyeball_vertices: int = EYEBALL_VERTICES) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "image_size": int(image_size),
            "subdivision": int(subdivision), "num_frames": int(num_frames), "motion": str(motion),
            "eyeball_vertices": int(eyeball_vertices)}


def _key_of(info: dict) -> dict:
    """The dataset key of a synthetic_info.json (files written before sequences existed have one frame)."""
    # left implicit in files written before they existed (and whenever they have the default value)
    defaults = {"num_frames": 1, "motion": "expressions", "eyeball_vertices": EYEBALL_VERTICES}
    return {k: info.get(k, defaults.get(k)) for k in _dataset_key(0, 0, 0)}


def _read_dataset_json(path: Path) -> dict:
    """synthetic_info.json or .synthetic_pending.json, with every subject id checked by
    :func:`utils.core.names.safe_name` (the ids become folder names under subjects/ that are read, replaced and
    deleted: "../x" must never reach shutil.rmtree).
    ValueError naming the file for anything else than a JSON object with lists of ids."""

    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); delete it or generate the dataset again") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    for key in ("subjects", "training_ids", "heldout_ids"):
        ids = doc.get(key, [])
        if not isinstance(ids, list):
            raise ValueError(f"{path}: {key!r} must be a list of subject ids, got {type(ids).__name__}")
        for sid in ids:
            safe_name(sid, f"subject id in {key!r}", path)
    if not isinstance(doc.get("identities", {}), dict):
        raise ValueError(f"{path}: 'identities' must be an object")
    return doc


def read_info(root: str | os.PathLike) -> dict:
    """The synthetic_info.json of a synthetic dataset folder (FileNotFoundError when it is not one); subject ids
    are checked to be safe folder names (ValueError naming the file)."""
    path = Path(root) / INFO_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a synthetic dataset folder (generate one with "
            f"python utils/make_synthetic_dataset.py --out {root})"
        )
    return _read_dataset_json(path)


def _frame_image_dir(subject_dir: Path, frame: int) -> Path:
    return subject_dir / "sequences" / DEFAULT_SEQUENCE / "timesteps" / f"frame_{timestep_name(frame)}" / "images-2x"


def _subject_complete(subject_dir: Path, num_frames: int = 1) -> bool:
    return (
        (subject_dir / CALIBRATION_RELPATH).is_file()
        and (subject_dir / "sequences" / DEFAULT_SEQUENCE / TRACKING_RELPATH).is_file()
        and all((_frame_image_dir(subject_dir, t) / f"cam_{s}.jpg").is_file()
                for t in range(num_frames) for s in SERIALS)
    )


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    import cv2

    u8 = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)[..., ::-1]  # RGB -> BGR
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    if hasattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR"):  # 4:4:4: no chroma blur on tiny images
        params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
    imwrite_file(path, u8, params)


def write_subject(
    subject_dir: str | os.PathLike,
    heads: GroundTruthHeads,
    identity: SyntheticIdentity,
    image_size: int,
    rig_rng: np.random.Generator,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    num_frames: int = 1,
    seed: int = 0,
    motion: str = "expressions",
) -> None:
    """Write one subject folder (calibration, tracking, 16 images-2x JPEGs per frame) in the NeRSemble layout.

    Frame 0 is the identity's neutral frame; frames 1..num_frames-1 (:func:`sequence_params` with the dataset
    ``seed``) are rendered from the same ground-truth head driven by their FLAME parameters, all in one tracking npz.
    """

    subject_dir = Path(subject_dir)
    calib = make_rig(image_size, rig_rng)
    calib_path = subject_dir / CALIBRATION_RELPATH
    write_camera_params(calib_path, calib)
    pivot = None
    if motion == "head_turn":  # rotate about the centre of the neutral head's bounding box (world space)
        with torch.no_grad():
            v = heads.flame(identity.params)[0].double().numpy()
        pivot = 0.5 * (v.min(0) + v.max(0))
    params = identity.params if num_frames == 1 else sequence_params(identity, seed, num_frames, motion, pivot)
    save_nersemble_tracking(subject_dir / "sequences" / DEFAULT_SEQUENCE / TRACKING_RELPATH, params)
    w, h = image_size_for(image_size)
    # render through the cameras exactly as a reader gets them from the json (ratio 0.5)
    cams = load_camera_params(calib_path, image_size=(w, h), serials=list(SERIALS))
    for t in range(num_frames):
        cloud = heads.cloud(identity, None if t == 0 else params.frame(t)).to(device)
        out = render_ground_truth(cloud, list(cams.values()), identity, "studio", backend)
        img_dir = _frame_image_dir(subject_dir, t)
        img_dir.mkdir(parents=True, exist_ok=True)
        images = out["image"].cpu().numpy()
        for serial, image in zip(cams, images):
            _write_jpeg(img_dir / f"cam_{serial}.jpg", image)


def make_synthetic_dataset(
    out: str | os.PathLike,
    num_identities: int = DEFAULT_NUM_IDENTITIES,
    num_heldout: int = DEFAULT_NUM_HELDOUT,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    subdivision: int | None = None,
    device: str | torch.device = "cpu",
    num_frames: int = 1,
    motion: str = "expressions",
    eyeball_vertices: int = EYEBALL_VERTICES,
) -> Path:
    """Generate (or complete) a synthetic NeRSemble-format dataset; returns ``out``.

    Args:
        out: dataset folder (created); holds flame/, subjects/ and synthetic_info.json.
        num_identities: training identities, ids "300", "301", ...
        num_heldout: held-out identities, ids HELDOUT_IDENTITIES[:num_heldout] ("017", "030", ...).
        image_size: height of the written images-2x (width = round(S * 1100 / 1604)); calibration is for 2x that.
        seed: dataset seed (FLAME model and every identity).
        overwrite: regenerate everything (only in a folder that is a synthetic dataset or empty).
        progress: tqdm progress bar.
        subdivision: ground-truth mesh subdivision (None: auto_subdivision(image_size): 0 up to 160 px, 1 up to 400,
            2 up to 1000, else 3).
        device: where the ground truth is rendered ("cpu" keeps datasets bit-identical across machines).
        num_frames: frames of each subject's sequence: frame 0 is neutral, frames 1..N-1 carry non-neutral
            expression, jaw, neck and eye parameters (:func:`sample_frame_params`); the default 1 writes exactly the
            single-frame dataset of before (same bytes).
        motion: "expressions" (default) or "head_turn": frames 1..N-1 also turn the whole head (+-35 deg yaw,
            +-15 deg pitch about its centre, :func:`head_turn_angles`), so the frontal camera's frames form a
            monocular head-turning video and the other 15 cameras are novel views of every frame.
        eyeball_vertices: vertices of each eyeball of the synthetic FLAME model: 162 (default: the icosphere of
            generator version 2, same bytes as before) or FLAME's own 546 (a latitude/longitude sphere of 17 rings of
            32, denser at the front; utils/data/synthetic/flame_mesh.py ``eyeball_mesh``).  Stored in
            synthetic_info.json when not the default.

    Idempotent: a complete dataset as requested is left untouched; one with the same seed/image_size/subdivision
    is completed (missing subjects rendered, subjects no longer requested removed); synthetic_info.json is
    written last (absent while generating, so scripts may test for it); a different one raises unless ``overwrite``.
    """
    from tqdm import tqdm


    out = Path(out)
    image_size = int(image_size)
    image_size_for(image_size)  # validates
    subdivision = auto_subdivision(image_size) if subdivision is None else int(subdivision)
    train_ids, heldout_ids = default_subject_ids(num_identities, num_heldout)
    all_ids = heldout_ids + train_ids
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    eyeball_mesh(int(eyeball_vertices))  # validates the count before anything is written
    key = _dataset_key(seed, image_size, subdivision, int(num_frames), motion, int(eyeball_vertices))
    # what the json files hold: one frame and the default motion are left implicit so datasets written before they
    # existed stay byte-identical
    stored = {k: v for k, v in key.items() if not (k == "num_frames" and v == 1)
              and not (k == "motion" and v == "expressions")
              and not (k == "eyeball_vertices" and v == EYEBALL_VERTICES)}

    info_path, pending_path = out / INFO_NAME, out / PENDING_NAME
    old = next((_read_dataset_json(p) for p in (pending_path, info_path) if p.is_file()), None)
    if out.exists() and old is None and any(out.iterdir()):
        raise FileExistsError(
            f"{out} exists, is not empty and is not a synthetic dataset (no {INFO_NAME}); choose an empty or new folder"
        )
    if old is not None and (overwrite or _key_of(old) != key):
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a synthetic dataset generated with {_key_of(old)}, not {key}; "
                f"pass --overwrite (overwrite=True) to regenerate it, or choose another --out"
            )
        for name in ("subjects", "flame"):
            shutil.rmtree(out / name, ignore_errors=True)
        info_path.unlink(missing_ok=True)
        pending_path.unlink(missing_ok=True)
        old = None

    subjects_dir = out / "subjects"
    flame_dir = out / "flame"
    flame_files = ("flame2023.pkl", "flame_static_embedding.pkl", "flame_dynamic_embedding.npy",
                   "FLAME_mask_vertexID.npy")
    flame_ok = all((flame_dir / f).is_file() for f in flame_files)
    stale = set(old.get("subjects", [])) - set(all_ids) if old else set()
    todo = [sid for sid in all_ids if not _subject_complete(subjects_dir / sid, key["num_frames"])]
    if info_path.is_file() and not pending_path.is_file() and flame_ok and not stale and not todo \
            and old.get("subjects") == all_ids and old.get("training_ids") == train_ids:
        return out  # complete and as requested: nothing to do (files untouched)

    subjects_dir.mkdir(parents=True, exist_ok=True)
    # claim the folder first; synthetic_info.json is removed until the dataset is complete again (scripts test for
    # it), and an interrupted run leaves the pending file that the next run resumes from
    pending = dict(stored, subjects=sorted(set(old.get("subjects", []) if old else []) | set(all_ids)),
                   identities=old.get("identities", {}) if old else {})
    _write_json(pending_path, pending)
    info_path.unlink(missing_ok=True)
    if not flame_ok:
        tmp = out / ".tmp-flame"
        shutil.rmtree(tmp, ignore_errors=True)
        write_flame_files(tmp, make_flame_model(seed, eyeball_vertices=key["eyeball_vertices"]), seed)
        shutil.rmtree(flame_dir, ignore_errors=True)
        os.replace(tmp, flame_dir)

    # drop subjects an earlier run generated that are not requested now (they would join training otherwise)
    for sid in stale:  # ids checked by _read_dataset_json; safe_child also refuses a link pointing out
        _remove_tree(safe_child(subjects_dir, sid, "subject id", pending_path))
    for leftover in subjects_dir.glob(".tmp-*"):  # interrupted earlier runs
        shutil.rmtree(leftover, ignore_errors=True)

    summaries = dict(old.get("identities", {})) if old else {}
    # the model is built only when something is missing (a re-run with the same arguments is a quick no-op)
    missing = todo or any(sid not in summaries for sid in all_ids)
    model = make_flame_model(seed, eyeball_vertices=key["eyeball_vertices"]) if missing else None
    heads = GroundTruthHeads(flame_dir, model, subdivision) if todo else None
    bar = tqdm(todo, desc=f"synthetic subjects ({image_size_for(image_size)[0]}x{image_size} px)", disable=not progress)
    for sid in bar:
        bar.set_postfix_str(sid)
        identity = sample_identity(model, seed, sid)
        tmp = subjects_dir / f".tmp-{sid}"
        shutil.rmtree(tmp, ignore_errors=True)
        write_subject(tmp, heads, identity, image_size, identity_rngs(seed, sid)["rig"], device,
                      num_frames=key["num_frames"], seed=seed, motion=motion)
        _remove_tree(subjects_dir / sid)
        os.replace(tmp, subjects_dir / sid)  # a subject folder appears only when complete
        summaries[sid] = identity.summary()
    for sid in all_ids:
        if sid not in summaries:
            summaries[sid] = sample_identity(model, seed, sid).summary()

    w, h = image_size_for(image_size)
    info = dict(
        stored,
        format="NeRSemble subject layout (synthetic)",
        image_width=w,
        image_height=h,
        calibration_size=[2 * w, 2 * h],
        num_identities=len(train_ids),
        num_heldout=len(heldout_ids),
        training_ids=train_ids,
        heldout_ids=heldout_ids,
        subjects=all_ids,
        serials=list(SERIALS),
        frontal_serial=FRONTAL_SERIAL,
        heldout_serials=list(HELDOUT_SERIALS),
        sequence=DEFAULT_SEQUENCE,
        frame=0,
        subjects_dir="subjects",
        flame_dir="flame",
        identities={sid: summaries[sid] for sid in all_ids},
    )
    _write_json(info_path, info)
    pending_path.unlink(missing_ok=True)
    return out


def _write_json(path: Path, data: dict) -> None:
    atomic_write_json(data, path)


def _remove_tree(path: Path) -> None:
    """Delete a folder of the dataset; a symbolic link in its place is removed itself, never followed."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def load_ground_truth(root: str | os.PathLike, subject_id: str, frame: int = 0, params: Any = None
                      ) -> tuple[GaussianCloud, SyntheticIdentity]:
    """Rebuild the ground-truth Gaussian head of a generated subject (deterministic; nothing is stored).

    ``frame``: the frame of its sequence (0 = neutral; frames >= 1 as :func:`sample_frame_params` makes them, whether
    or not the dataset wrote that many); ``params``: FlameParams (T = 1) to pose the head with instead (any motion,
    e.g. a synthetic driving video).
    Returns:
        (cloud in world space, the identity).  Render it with :func:`render_ground_truth` through any cameras.
    """

    root = Path(root)
    info = read_info(root)
    if subject_id not in info["subjects"]:
        raise KeyError(f"subject {subject_id!r} is not in the synthetic dataset {root} (it has {info['subjects']})")
    eyeball_vertices = int(info.get("eyeball_vertices", EYEBALL_VERTICES))
    key = (str(root.resolve()), info["seed"], info["subdivision"], eyeball_vertices)
    if key not in _HEADS_CACHE:
        model = make_flame_model(info["seed"], eyeball_vertices=eyeball_vertices)
        _HEADS_CACHE.clear()  # keep one dataset's model in memory
        _HEADS_CACHE[key] = GroundTruthHeads(root / info["flame_dir"], model, info["subdivision"])
    heads = _HEADS_CACHE[key]
    identity = sample_identity(heads.model, info["seed"], subject_id)
    if params is None and frame > 0:
        params = sample_frame_params(info["seed"], subject_id, frame, identity.params)
    return heads.cloud(identity, params), identity


_HEADS_CACHE: dict[tuple, GroundTruthHeads] = {}
