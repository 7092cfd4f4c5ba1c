"""Motion sources (utils/motion.py): built-in and file keyframes, tracking files (NeRSemble, VHAP), subject folders,
frame selection and errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.fixtures import synthetic_root  # noqa: F401


@pytest.fixture(scope="module")
def flame(synthetic_root):  # noqa: F811
    from models.flame import FlameModel

    return FlameModel.from_data_dir(synthetic_root / "flame")


def test_builtin_keyframes_ease_through_every_key(flame):
    from utils.motion import DEFAULT_KEYFRAMES, KEYFRAMES, builtin_keyframe, keyframe_params, load_motion

    keys = [builtin_keyframe(k) for k in ("neutral", "open_mouth", "head_turn_left")]
    p = keyframe_params(keys, 4)
    assert p.num_frames == 4 * 2 + 1
    # every key is hit exactly (frames 0, 4, 8), in between the motion is eased (slow at the keys)
    assert float(p.jaw[0].abs().max()) == 0 and float(p.jaw[4, 0]) == pytest.approx(0.25)
    assert float(p.expression[4, 0]) == pytest.approx(0.5) and float(p.neck[8, 1]) == pytest.approx(0.35)
    steps = p.jaw[1:5, 0] - p.jaw[:4, 0]
    assert steps[0] < steps[1] and steps[3] < steps[2]
    # head placement is the identity transform (retarget puts it on an identity), the shape is zero
    torch.testing.assert_close(p.rotation_matrix, torch.eye(3).expand(9, 3, 3))
    assert float(p.translation.abs().max()) == 0 and float(p.scale.min()) == 1 and float(p.shape.abs().max()) == 0
    m = load_motion("keyframes", flame)
    assert m.kind == "keyframes" and m.params.num_frames == 12 * (len(DEFAULT_KEYFRAMES) - 1) + 1
    assert set(DEFAULT_KEYFRAMES) <= set(KEYFRAMES)
    with pytest.raises(ValueError, match="unknown keyframe"):
        builtin_keyframe("moonwalk")


def test_keyframes_file(tmp_path, flame):
    from utils.motion import load_motion, read_keyframes_file

    path = tmp_path / "k.yaml"
    path.write_text("frames_per_transition: 2\nkeyframes:\n  - neutral\n"
                    "  - {name: wide, expression: {1: 2.5, 7: -1}, jaw: [0.1, 0, 0], eyes: [0, 0.2, 0]}\n")
    keys, per = read_keyframes_file(path)
    assert per == 2 and [k.name for k in keys] == ["neutral", "wide"] and keys[1].eyes == (0, 0.2, 0) * 2
    m = load_motion(str(path), flame)
    assert m.params.num_frames == 3 and float(m.params.expression[2, 7]) == -1.0
    js = tmp_path / "k.json"
    js.write_text(json.dumps(["smile", "nod"]))
    assert load_motion(str(js), flame, frames_per_transition=5).params.num_frames == 6
    for text, msg in (("- {name: x, mouth: 1}", "unknown keyframe key"), ("- {expression: {100: 1}}", "out of range"),
                      ("- {jaw: [1, 2]}", "needs 3"), ("{}", "non-empty list")):
        path.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_keyframes_file(path)
    with pytest.raises(FileNotFoundError):
        read_keyframes_file(tmp_path / "none.yaml")


def test_tracking_files_and_subject_folders(synthetic_root, flame, tmp_path):  # noqa: F811
    from models.flame import FlameParams, save_nersemble_tracking, save_vhap_tracking
    from utils.data.nersemble import TRACKING_RELPATH
    from utils.motion import load_motion

    subject = synthetic_root / "subjects" / "300"
    m = load_motion(str(subject), flame)
    assert m.kind == "tracking" and m.subject is not None and m.subject.subject_id == "300"
    assert m.params.num_frames == 1 and m.photo(0, "222200037").shape[-1] == 3 and m.photo(0, "nope") is None
    m2 = load_motion(str(subject / "sequences" / "EXP-1-head" / TRACKING_RELPATH), flame)
    assert m2.subject is not None and torch.equal(m2.params.expression, m.params.expression)
    # a NeRSemble file elsewhere, with frame numbers: all frames, their numbers kept, no subject
    p = FlameParams.neutral(5)
    p.jaw[:, 0] = torch.linspace(0, 0.2, 5)
    save_nersemble_tracking(tmp_path / "seq.npz", p, frames=np.array([10, 13, 16, 19, 22]))
    m3 = load_motion(str(tmp_path / "seq.npz"), flame)
    assert m3.subject is None and m3.frame_ids.tolist() == [10, 13, 16, 19, 22]
    sel = m3.select(start=1, stride=2, max_frames=2)
    assert sel.frame_ids.tolist() == [13, 19] and torch.allclose(sel.params.jaw[:, 0], torch.tensor([0.05, 0.15]))
    with pytest.raises(ValueError, match="empty"):
        m3.select(start=5)
    # VHAP: rotation about the root joint is baked into the translation (NeRSemble convention)
    save_vhap_tracking(tmp_path / "vhap.npz", np.zeros(300), np.zeros((2, 50)), np.array([[0, 0.3, 0]] * 2),
                       np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 6)))
    v = load_motion(str(tmp_path / "vhap.npz"), flame)
    assert not v.params.rotate_about_root and v.frame_ids.tolist() == [0, 1]
    with pytest.raises(FileNotFoundError, match="no FLAME tracking"):
        load_motion(str(subject), flame, sequence="EXP-9")
    with pytest.raises(ValueError, match="expected 'keyframes'"):
        load_motion("dance", flame)
    with pytest.raises(FileNotFoundError, match="tracking file"):
        load_motion(str(tmp_path / "missing.npz"), flame)
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="reenactment"):
        load_motion(str(tmp_path / "clip.mp4"), flame)
