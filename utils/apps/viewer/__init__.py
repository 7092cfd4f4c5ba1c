"""The interactive browser viewer behind viewer.py (server.py: the viser server, its controls and the coalesced
network update)."""
from utils.apps.viewer.server import (
    POSE_CONTROLS,
    PRESET_PROMPT,
    VIEW_DISTANCE,
    VIEW_FOV_DEG,
    VIEWER_LISTS,
    HeadViewer,
    ViewerConfig,
    check_request,
    is_loopback,
    keyframe_pose,
    pose_params,
)

__all__ = [
    "POSE_CONTROLS", "PRESET_PROMPT", "VIEWER_LISTS", "VIEW_DISTANCE", "VIEW_FOV_DEG", "HeadViewer", "ViewerConfig",
    "check_request", "is_loopback", "keyframe_pose", "pose_params",
]
