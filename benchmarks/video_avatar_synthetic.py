"""Video avatar on a synthetic head-turning clip with ground truth (issue 23): novel-camera PSNR of the video fit
against the one-image fit of the same identity.

Inputs are folders written by the commands in README ("A personal avatar from a video"): the head-turning dataset
(make_synthetic_dataset.py --motion head_turn), the video fit (track.py --frames) and the one-image fit (track.py
--subject_dir).  Both codes are rendered on the ground-truth FLAME of the chosen frames through the 15 cameras the
video never saw and compared with the ground-truth images inside the projected face mask; the mean code likewise.

    python benchmarks/video_avatar_synthetic.py --checkpoint output/cpu/model.pt --data output/turn017 \\
        --video_fit output/video017 --photo_fit output/photo017
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.apps.track.video import novel_camera_psnr  # noqa: E402
from utils.data.code_file import FittedCode, load_code  # noqa: E402
from utils.data.model_file import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model.pt both codes were fitted with")
    p.add_argument("--data", required=True, help="head-turning synthetic dataset (--motion head_turn)")
    p.add_argument("--subject", default="017", help="identity of the clip")
    p.add_argument("--video_fit", required=True, help="--out folder of track.py --frames (holds code.pt)")
    p.add_argument("--photo_fit", required=True, help="--out folder of track.py --subject_dir (holds code.pt)")
    p.add_argument("--frames", default="heldout",
                   help="frames evaluated: 'heldout' (the video fit's held-out frames), 'all', or a comma list")
    args = p.parse_args(argv)

    import torch


    model = load_model(args.checkpoint, "cpu")
    vm = json.loads((Path(args.video_fit) / "metrics.json").read_text())
    if args.frames == "heldout":
        frames = vm["heldout_frames"]
    elif args.frames == "all":
        frames = list(range(vm["frames"]))
    else:
        frames = [int(t) for t in args.frames.split(",")]
    video = load_code(Path(args.video_fit) / "code.pt", model)
    photo = load_code(Path(args.photo_fit) / "code.pt", model)
    with torch.no_grad():
        w_mean = model.field.style(model.field.mean_code()[None], update_w_avg=False)[0]
    mean = FittedCode(w=w_mean, z=None, base_vertices=video.base_vertices)
    res = {"frames": frames}
    for name, code in (("video_fit", video), ("photo_fit", photo), ("mean_code", mean)):
        res[f"novel_psnr_face_{name}"] = round(novel_camera_psnr(model, code, args.data, args.subject, frames), 3)
    res["gain_video_over_photo_db"] = round(res["novel_psnr_face_video_fit"] - res["novel_psnr_face_photo_fit"], 3)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
