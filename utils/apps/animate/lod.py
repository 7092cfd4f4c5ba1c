"""animate.py's ``--lod`` (issue 24, opt-in): per frame the level of detail to render an animated head at, and the
merged Gaussians of the frames that need them (models/level_of_detail.py does the merging)."""
from __future__ import annotations

import time

import torch

from models.camera import Camera
from models.gaussians import GaussianCloud
from models.level_of_detail import FOOTPRINT_PX, LevelOfDetail, coarsest_level
from utils.core.device import synchronize


class FrameLod:
    """``--lod`` of animate.py: per frame the level to render at, and the merged Gaussians of the frames that need
    them (models/level_of_detail.py).

    The animated head is re-posed every frame, so a merged frame needs its own merge; the merge's shares (its sparse
    matrices) are built once.  ``auto`` builds a :class:`LevelOfDetail` of the first frame's head and picks each
    frame's level from that frame's own full-detail footprint (``LevelOfDetail.estimate_index``), so frames that keep
    full detail are never merged.  A frame whose head equals the previous frame's reuses its merge (the cached-head
    case).  Counters for animation.json: ``frames`` per level rendered, ``merges``, ``reused``, ``merge_seconds``.
    """

    def __init__(self, setting: str | int, plan, full_level: int, per_vertex: int, first: GaussianCloud,
                 camera: Camera, levels: int = 1, footprint: float = FOOTPRINT_PX) -> None:
        """``first``: the first frame's full-detail head (N,) (``auto``: its levels are merged once here);
        ``camera``: the animation's camera."""
        self.setting, self.camera, self.full_level = setting, camera, full_level
        self.lod = LevelOfDetail(plan, full_level, per_vertex, threshold=footprint)
        if setting == "auto" and full_level > 0:
            t = time.perf_counter()
            self.lod.update(first, coarsest_level(setting, full_level, levels))
            self.setup_seconds = time.perf_counter() - t
            self.first_footprints = self.lod.footprints(camera)  # px per level, coarsest first (animation.json)
        else:
            self.setup_seconds, self.first_footprints = 0.0, []
        self.frames: dict[int, int] = {}
        self.merges, self.reused, self.merge_seconds = 0, 0, 0.0
        self._last: tuple[GaussianCloud, int, GaussianCloud] | None = None  # (full head, level, merged head)

    def level(self, cloud: GaussianCloud) -> int:
        """The subdivision level one frame's full-detail head (N,) is rendered at."""
        if self.setting == "auto":
            return self.full_level if self.full_level == 0 else \
                self.lod.level_numbers[self.lod.estimate_index(cloud, self.camera)]
        return int(self.setting)

    def clouds(self, cloud: GaussianCloud) -> list[tuple[list[int], GaussianCloud]]:
        """A batch's full-detail heads (B, N) -> [(frame indices in the batch, their heads at one level (b, M))]."""
        picked = [self.level(cloud[k]) for k in range(cloud.batch_shape[0])]
        groups: list[tuple[list[int], GaussianCloud]] = []
        for lvl in sorted(set(picked)):
            idx = [k for k, p in enumerate(picked) if p == lvl]
            self.frames[lvl] = self.frames.get(lvl, 0) + len(idx)
            if lvl == self.full_level:
                groups.append((idx, cloud[torch.as_tensor(idx, device=cloud.device)]))
                continue
            # a head equal to the last one merged at this level reuses its merge: the source of each frame is
            # either a merged head or its position among the heads merged now
            source: list[GaussianCloud | int] = []
            todo: list[int] = []
            last = self._last if self._last is not None and self._last[1] == lvl else None
            for k in idx:
                if last is not None and _same_cloud(last[0], cloud[k]):
                    source.append(last[2])
                    self.reused += 1
                else:
                    source.append(len(todo))
                    todo.append(k)
                last = (cloud[k], lvl, source[-1])
            if todo:
                t = time.perf_counter()
                out = self.lod.merge(cloud[torch.as_tensor(todo, device=cloud.device)], lvl)
                synchronize(cloud.device)
                self.merge_seconds += time.perf_counter() - t
                self.merges += len(todo)
            merged = [out[m] if isinstance(m, int) else m for m in source]
            self._last = (cloud[idx[-1]], lvl, merged[-1])
            groups.append((idx, GaussianCloud(*(torch.stack([getattr(m, f) for m in merged])
                                                 for f in ("means", "quats", "scales", "opacities", "sh")))))
        return groups

    def summary(self) -> dict:
        """The --lod figures of animation.json."""
        return {"setting": self.setting, "full_level": self.full_level,
                "frames_per_level": {str(k): v for k, v in sorted(self.frames.items())}, "merges": self.merges,
                "reused_merges": self.reused, "merge_seconds": self.merge_seconds,
                "setup_seconds": self.setup_seconds, "footprint_px": self.lod.threshold,
                "first_frame_footprints_px": dict(zip(map(str, self.lod.level_numbers), self.first_footprints))}


def _same_cloud(a: GaussianCloud, b: GaussianCloud) -> bool:
    """Whether two unbatched heads are equal (the same pose of the same identity: its merge can be reused)."""
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("means", "quats", "scales", "opacities", "sh"))
