"""One-off derivation of utils/face/landmarks.py's IBUG68_FROM_MEDIAPIPE (mediapipe face mesh -> iBUG-68 points).

    pip install dlib-bin==20.0.1 face_recognition_models==0.1.3 scikit-image   # this script only, never the project
    python benchmarks/derive_landmark_map.py [--out benchmarks/results/landmark_map.md]

Reference: dlib's 68-point shape predictor (trained on the iBUG 300-W annotation, whose point definitions FLAME's
landmark embeddings follow; its training data's terms restrict commercial use, which is why it is used here once and
is no dependency of the project).  Photos: the two public-domain portraits that ship in packages (scikit-image's
astronaut, matplotlib's grace_hopper), their mirror images (a mirrored face is another face for both detectors: no
index mirroring is involved), each rescaled, rotated, shifted and re-lit (gamma) with a fixed seed.  Both detectors
run on every image; an image counts when both find a face.

Per iBUG point: every mesh point j (mean error e_j over the images, in inter-ocular distances: outer eye corners of
dlib's points), and every pair (j, k) among the 25 best single points with weight w on a 0.05 grid; the pair is kept
when it lowers the mean error by more than ``--pair_gain`` (a table of mostly single points is easier to check).
Leave-one-identity-out: the table derived from one portrait (+ its mirror and variants) evaluated on the other says
how much of the residual is over-fitting to two faces.  Prints the table (Python literal) and writes the residuals.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.face.landmarks import NUM_IBUG, NUM_MESH, LandmarkDetector  # noqa: E402

REGIONS = {"jaw contour 0-16": range(0, 17), "brows 17-26": range(17, 27), "nose 27-35": range(27, 36),
           "eyes 36-47": range(36, 48), "outer lips 48-59": range(48, 60), "inner lips 60-67": range(60, 68)}


def portraits() -> dict[str, np.ndarray]:
    import cv2
    import matplotlib.cbook
    import skimage.data

    grace = cv2.imread(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": np.ascontiguousarray(grace[..., ::-1])}


def variants(img: np.ndarray, rng: np.random.Generator, n: int) -> list[tuple[str, np.ndarray]]:
    """The image, then n random similarity warps (scale 0.5-1.4, rotation +-14 deg, shift +-8 %) with gamma 0.7-1.4."""
    import cv2

    h, w = img.shape[:2]
    out = [("orig", img)]
    for i in range(n):
        s, a = rng.uniform(0.5, 1.4), rng.uniform(-14, 14)
        M = cv2.getRotationMatrix2D((w / 2, h / 2), a, s)
        M[:, 2] += rng.uniform(-0.08, 0.08, 2) * (w, h)
        W, H = int(w * min(s, 1.0)) or 1, int(h * min(s, 1.0)) or 1
        M[:, 2] -= ((w - W) / 2, (h - H) / 2)
        warped = cv2.warpAffine(img, M, (W, H), flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=(128, 128, 128))
        g = rng.uniform(0.7, 1.4)
        warped = np.clip(255.0 * (warped / 255.0) ** g, 0, 255).astype(np.uint8)
        out.append((f"s{s:.2f}_r{a:+.0f}_g{g:.2f}", warped))
    return out


def dlib_points(img: np.ndarray, detector, predictor) -> np.ndarray | None:
    import dlib

    rects = detector(img, 1)
    if len(rects) == 0:
        return None
    r = max(rects, key=lambda b: b.width() * b.height())
    shape = predictor(img, dlib.rectangle(r.left(), r.top(), r.right(), r.bottom()))
    # dlib's integer part coordinates index pixels; +0.5 puts them at pixel centres like models/camera.py
    return np.array([[p.x + 0.5, p.y + 0.5] for p in shape.parts()], dtype=np.float64)


def collect(n_variants: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(mesh (S, 468, 2), ibug (S, 68, 2), identity (S,) 0/1, names)."""
    import dlib
    import face_recognition_models

    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
    rng = np.random.default_rng(seed)
    meshes, ibugs, ids, names = [], [], [], []
    with LandmarkDetector(static_images=True, max_faces=4, min_face_px=0) as det:
        for k, (name, img) in enumerate(portraits().items()):
            for mirrored in (False, True):
                base = np.ascontiguousarray(img[:, ::-1]) if mirrored else img
                for vname, im in variants(base, rng, n_variants):
                    faces = det.detect_all(im)
                    ref = dlib_points(im, detector, predictor)
                    if not faces or ref is None:
                        continue
                    # the same face for both: mediapipe's face whose centre is nearest to dlib's
                    mesh = min(faces, key=lambda m: np.linalg.norm(m[:NUM_MESH, :2].mean(0) - ref.mean(0)))
                    meshes.append(mesh[:NUM_MESH, :2])
                    ibugs.append(ref)
                    ids.append(k)
                    names.append(f"{name}{'_mirror' if mirrored else ''}_{vname}")
    return np.stack(meshes), np.stack(ibugs), np.array(ids), names


def fit_table(mesh: np.ndarray, ibug: np.ndarray, pair_gain: float, top: int = 25
              ) -> tuple[list[tuple[tuple[int, float], ...]], np.ndarray]:
    """Per iBUG point the best single mesh point or pair; returns (table, mean error per point in IOD)."""
    iod = np.linalg.norm(ibug[:, 36] - ibug[:, 45], axis=-1)  # (S,)
    table, errs = [], []
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    for i in range(NUM_IBUG):
        e_single = (np.linalg.norm(mesh - ibug[:, i:i + 1], axis=-1) / iod[:, None]).mean(0)  # (468,)
        best = int(np.argmin(e_single))
        entry, err = ((best, 1.0),), float(e_single[best])
        cand = np.argsort(e_single)[:top]
        best_pair = (err, None)
        for a in range(top):
            for b in range(a + 1, top):
                j, k = int(cand[a]), int(cand[b])
                p = mesh[:, j][None] * grid[:, None, None] + mesh[:, k][None] * (1 - grid[:, None, None])
                e = (np.linalg.norm(p - ibug[None, :, i], axis=-1) / iod[None]).mean(1)  # (G,)
                g = int(np.argmin(e))
                if e[g] < best_pair[0]:
                    best_pair = (float(e[g]), ((j, float(grid[g])), (k, float(round(1 - grid[g], 2)))))
        if best_pair[1] is not None and best_pair[0] < err - pair_gain:
            entry, err = best_pair[1], best_pair[0]
        table.append(entry)
        errs.append(err)
    return table, np.array(errs)


def apply(table, mesh: np.ndarray) -> np.ndarray:
    return np.stack([sum(w * mesh[:, j] for j, w in entry) for entry in table], axis=1)


def errors_per_image(table, mesh: np.ndarray, ibug: np.ndarray) -> np.ndarray:
    """(S,) mean error of each image over the 68 points, in inter-ocular distances."""
    iod = np.linalg.norm(ibug[:, 36] - ibug[:, 45], axis=-1)
    return (np.linalg.norm(apply(table, mesh) - ibug, axis=-1) / iod[:, None]).mean(1)


def errors(table, mesh: np.ndarray, ibug: np.ndarray) -> np.ndarray:
    """(68,) mean error per point in inter-ocular distances."""
    iod = np.linalg.norm(ibug[:, 36] - ibug[:, 45], axis=-1)
    return (np.linalg.norm(apply(table, mesh) - ibug, axis=-1) / iod[:, None]).mean(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=int, default=40, help="random variants per portrait and mirror (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the variants (default 0)")
    ap.add_argument("--pair_gain", type=float, default=0.002,
                    help="a pair replaces the best single point only if it lowers the mean error by more than this "
                         "many inter-ocular distances (default 0.002)")
    ap.add_argument("--reject", type=float, default=0.15,
                    help="drop images whose mean error under the originals' table exceeds this many inter-ocular "
                         "distances (a detector failed on them; default 0.15)")
    ap.add_argument("--out", default="benchmarks/results/landmark_map.md", help="residual report (Markdown)")
    args = ap.parse_args(argv)
    t0 = time.time()
    mesh, ibug, ids, names = collect(args.variants, args.seed)
    print(f"{len(names)} images with a face found by both detectors "
          f"({int((ids == 0).sum())} astronaut, {int((ids == 1).sum())} grace_hopper), {time.time() - t0:.0f} s")
    # a variant where the two detectors disagree wholesale (one of them failed on a warped face) would dominate the
    # mean: images off by more than --reject inter-ocular distances under the table of the four unwarped photos go
    orig = np.array([n.endswith("_orig") for n in names])
    e0 = errors_per_image(fit_table(mesh[orig], ibug[orig], args.pair_gain)[0], mesh, ibug)
    keep = e0 < args.reject
    rejected = [f"{n} ({e:.2f})" for n, e, k in zip(names, e0, keep) if not k]
    print(f"rejected {len(rejected)}: {rejected}")
    mesh, ibug, ids, names = mesh[keep], ibug[keep], ids[keep], [n for n, k in zip(names, keep) if k]
    table, _ = fit_table(mesh, ibug, args.pair_gain)
    e_all = errors(table, mesh, ibug)
    loo = []
    for k in (0, 1):
        t_k, _ = fit_table(mesh[ids == k], ibug[ids == k], args.pair_gain)
        loo.append(errors(t_k, mesh[ids != k], ibug[ids != k]))
    e_loo = np.mean(loo, axis=0)
    lines = ["# mediapipe face mesh -> iBUG-68: derivation residuals", "",
             f"`python benchmarks/derive_landmark_map.py --variants {args.variants} --seed {args.seed} "
             f"--pair_gain {args.pair_gain}`: {len(names)} images (astronaut and grace_hopper, each mirrored, "
             f"{args.variants} random variants each plus the original) where both mediapipe 0.10.21 and dlib's "
             f"68-point predictor found the same face; rejected as a detector failure: {len(rejected)} "
             f"({', '.join(rejected) or 'none'}). Errors: mean distance to dlib's point in inter-ocular distances "
             f"(outer eye corners). 'held out': the table derived from one portrait (and its mirror and variants), "
             f"evaluated on the other, averaged over both ways.", "",
             "| region | fitted (all images) | held out (other portrait) |", "|---|---:|---:|"]
    for rname, r in REGIONS.items():
        lines.append(f"| {rname} | {e_all[list(r)].mean():.4f} | {e_loo[list(r)].mean():.4f} |")
    lines.append(f"| **static 17-67 (FLAME's 51)** | **{e_all[17:].mean():.4f}** | **{e_loo[17:].mean():.4f}** |")
    lines.append(f"| all 68 | {e_all.mean():.4f} | {e_loo.mean():.4f} |")
    lines += ["", "| iBUG | mediapipe (weight) | error (all) | error (held out) |", "|---:|---|---:|---:|"]
    for i, entry in enumerate(table):
        desc = " + ".join(f"{j} ({w:.2f})" for j, w in entry)
        lines.append(f"| {i} | {desc} | {e_all[i]:.4f} | {e_loo[i]:.4f} |")
    report = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    print(report)
    print("IBUG68_FROM_MEDIAPIPE = (")
    for i, entry in enumerate(table):
        print(f"    ({', '.join(f'({j}, {w:.2f})' for j, w in entry)},),  # {i}")
    print(")")


if __name__ == "__main__":
    main()
