"""The interactive browser viewer behind viewer.py: a viser server that shows the Gaussians of a trained identity
field in the page and lets the user pick, blend, truncate and pose identities.

    state.py    ViewerConfig, ViewState, the pose sliders (POSE_CONTROLS, pose_params, keyframe_pose), constants
    session.py  ViewerSession: the headless part (model and code loading, identity -> pose -> display frame, the one
                worker thread that coalesces updates, Save PLY); usable without a browser
    access.py   who may use the server: the per-session token gate, loopback hosts, folders the page may name,
                what the page may say about a bad file
    server.py   HeadViewer: the viser page (controls, keyframes, messages) on top of the session
"""
from utils.apps.viewer.access import check_request, is_loopback, page_error
from utils.apps.viewer.server import HeadViewer
from utils.apps.viewer.session import DisplayFrame, ViewerSession, find_codes, identity_head
from utils.apps.viewer.state import (
    MAX_MESSAGES,
    NO_MODEL,
    POSE_CONTROLS,
    PRESET_PROMPT,
    VIEW_DISTANCE,
    VIEW_FOV_DEG,
    VIEWER_LISTS,
    PoseControl,
    ViewerConfig,
    ViewState,
    keyframe_pose,
    pose_params,
)

__all__ = [
    "DisplayFrame", "HeadViewer", "MAX_MESSAGES", "NO_MODEL", "POSE_CONTROLS", "PRESET_PROMPT", "PoseControl",
    "VIEWER_LISTS", "VIEW_DISTANCE", "VIEW_FOV_DEG", "ViewState", "ViewerConfig", "ViewerSession", "check_request",
    "find_codes", "identity_head", "is_loopback", "keyframe_pose", "page_error", "pose_params",
]
