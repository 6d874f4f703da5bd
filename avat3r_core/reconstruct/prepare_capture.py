"""Capture mode: views of a preprocessed capture (``frames.parquet`` crops, ``priors.parquet`` position
maps / features), chosen by farthest viewpoints over the subject's (frame, camera) candidates,
preferring distinct timesteps (as training did)."""

from __future__ import annotations

import io

import numpy as np
import torch

from avat3r_core import storage
from avat3r_core.cameras import Cameras
from avat3r_core.geometry import HeadFrameError, camera_centers, farthest_views, head_frames, to_head_frame
from avat3r_core.errors import FormatError, check_finite
from avat3r_core.reconstruct.errors import AvatarInputError
from avat3r_core.reconstruct.library import LibraryEntry
from avat3r_core.reconstruct.pictures import read_image
from avat3r_core.reconstruct.prepared import PreparedAvatar, _framing
from avat3r_core.tracking import check_tracking_rows


class CapturePreparation:
    """The capture path of :class:`~avat3r_core.reconstruct.prepare.Preparer` (its ``self``: the config,
    image size, frame and the lazily loaded models)."""

    # ------------------------------------------------------------------ capture mode
    # Long (~90 lines): one linear path (rows → views → crops → priors → frame → framing), moved
    # here whole from library.py so other branches' changes port; to split along those steps.
    def prepare_capture(self, entry: LibraryEntry) -> PreparedAvatar:
        """Farthest viewpoints of a preprocessed capture (frames + priors [+ tracking] manifests)."""
        import cv2

        frames_manifest = entry.source
        frames_dir = str(storage.as_path(frames_manifest).parent)
        priors_manifest = entry.priors or str(storage.as_path(frames_dir).parent / "priors" / "priors.parquet")
        tracking_manifest = entry.tracking or str(storage.as_path(frames_dir).parent / "tracking" / "tracking.parquet")
        for p, what in ((frames_manifest, "frames manifest"), (priors_manifest, "priors manifest")):
            if not storage.exists(p):
                raise AvatarInputError(p, f"{what} not found")
        rows = [r for r in storage.read_parquet(frames_manifest).to_pylist() if str(r["subject"]) == entry.subject]
        if entry.sequence is not None:
            rows = [r for r in rows if str(r["sequence"]) == entry.sequence]
        elif rows:
            first = sorted({str(r["sequence"]) for r in rows})[0]
            rows = [r for r in rows if str(r["sequence"]) == first]
        if entry.frame is not None:
            rows = [r for r in rows if int(r["frame"]) == entry.frame]
        if not rows:
            raise AvatarInputError(frames_manifest, f"no frames of subject {entry.subject!r}"
                                   f"{f' sequence {entry.sequence!r}' if entry.sequence else ''}"
                                   f"{f' frame {entry.frame}' if entry.frame is not None else ''}")
        priors = {r["id"]: r for r in storage.read_parquet(priors_manifest).to_pylist()}
        rows = sorted((r for r in rows if r["id"] in priors), key=lambda r: r["id"])
        if not rows:
            raise AvatarInputError(priors_manifest, f"no priors for any frame of subject {entry.subject!r}")
        tracked = self._tracking_rows(tracking_manifest, entry.subject)
        # the tracked frames this avatar uses (head frames of its rows, the reference pose)
        check_tracking_rows((tracked[k] for k in sorted({(str(r["sequence"]), int(r["frame"])) for r in rows})
                             if k in tracked), tracking_manifest)
        heads = self._capture_head_frames(rows, tracked, tracking_manifest)
        w2c = np.array([r["world_to_cam"] for r in rows], np.float64).reshape(-1, 4, 4)
        if heads is not None:
            w2c = w2c @ heads
        centers = camera_centers(w2c)
        picks = farthest_views(centers, self.config.num_views, groups=np.array([int(r["frame"]) for r in rows]))
        chosen = [rows[i] for i in picks]
        priors_dir = str(storage.as_path(priors_manifest).parent)
        S = self.image_size
        images, cams, pos, conf, feats, views = [], [], [], [], [], []
        for i, r in zip(picks, chosen):
            img_path = storage.join(frames_dir, r["image"])
            image = read_image(img_path)
            p = priors[r["id"]]
            pos_path = storage.join(priors_dir, p["position"])
            with np.load(io.BytesIO(storage.read_bytes(pos_path)), allow_pickle=False) as z:
                position, confidence = z["position"].astype(np.float32), z["confidence"].astype(np.float32)
            check_finite(position, pos_path, "position")  # named here, not later in a temporary .ply
            check_finite(confidence, pos_path, "confidence")
            if heads is not None:
                position = to_head_frame(position, heads[i])
            cam = Cameras(torch.tensor(w2c[i:i + 1]), torch.tensor(np.reshape(r["K"], (1, 3, 3))),
                          int(r["width"]), int(r["height"]))
            if image.shape[:2] != (S, S) or position.shape[:2] != (S, S):
                # the network's crop size differs from the capture's: resize (cameras scale exactly)
                image = cv2.resize(image, (S, S), interpolation=cv2.INTER_AREA)
                position = cv2.resize(position, (S, S), interpolation=cv2.INTER_NEAREST)
                confidence = cv2.resize(confidence, (S, S), interpolation=cv2.INTER_NEAREST)
                cam = cam.resize(S, S)
            images.append(image)
            cams.append(cam)
            pos.append(position)
            conf.append(confidence)
            if self.features_enabled:
                if not p.get("features"):
                    raise AvatarInputError(priors_manifest, f"row {r['id']} has no features (feature_source "
                                           f"{p.get('feature_source')!r}) but the model takes {self.feature_dim} channels")
                with np.load(io.BytesIO(storage.read_bytes(storage.join(priors_dir, p["features"]))), allow_pickle=False) as z:
                    f = z["features"].astype(np.float32)
                if f.shape[0] != self.feature_dim:
                    raise FormatError(storage.join(priors_dir, p["features"]), "features",
                                      f"{f.shape[0]} channels, the model takes {self.feature_dim}")
                feats.append(f)
            views.append({"id": r["id"], "frame": int(r["frame"]), "camera": str(r["camera"]), "image": img_path})
        reference = {"rotation": np.zeros(3), "translation": np.zeros(3)}
        first = tracked.get((str(chosen[0]["sequence"]), int(chosen[0]["frame"])))
        if first is not None:
            reference = {"rotation": np.asarray(first["rotation"], np.float64),
                         "translation": np.asarray(first["translation"], np.float64)}
        cameras = Cameras.cat(cams)
        position, confidence = np.stack(pos), np.stack(conf)
        world_to_cam = cameras.world_to_cam.double().numpy()
        center, radius, front, up = _framing(position, confidence, world_to_cam, priors_manifest)
        sources = sorted({str(priors[r["id"]]["position_source"]) for r in chosen})
        fsources = sorted({str(priors[r["id"]]["feature_source"]) for r in chosen})
        meta = {"mode": "capture", "views": views, "position_source": ",".join(sources),
                "feature_source": ",".join(fsources) if self.features_enabled else "none",
                "landmarks": "", "frames_manifest": frames_manifest, "priors_manifest": priors_manifest, "frame": self.frame,
                "tracking_manifest": tracking_manifest if storage.exists(tracking_manifest) else ""}
        return PreparedAvatar(entry.avatar_id, np.stack(images), world_to_cam, cameras.K.double().numpy(), position,
                              confidence, np.stack(feats) if feats else None, reference, center, radius, front, up, meta)

    @staticmethod
    def _tracking_rows(tracking_manifest: str, subject: str) -> dict[tuple[str, int], dict]:
        """The subject's tracked frames by (sequence, frame); empty without a tracking manifest."""
        if not storage.exists(tracking_manifest):
            return {}
        table = storage.read_parquet(tracking_manifest)
        return {(str(t["sequence"]), int(t["frame"])): t for t in table.to_pylist() if str(t["subject"]) == subject}

    def _capture_head_frames(self, rows: list[dict], tracked: dict, tracking_manifest: str) -> np.ndarray | None:
        """(N, 4, 4) head-to-world of each frames row's timestep (head-frame models), else None."""
        if self.frame != "head":
            return None
        if not tracked:
            raise AvatarInputError(tracking_manifest, "the model works in the tracked head frame, but there is no "
                                   "tracking for this subject (run the track stage, or give the entry's tracking)")
        found = [tracked.get((str(r["sequence"]), int(r["frame"]))) or {} for r in rows]
        try:
            return head_frames([t.get("head_to_world") for t in found])
        except HeadFrameError as bad:
            r = rows[bad.first]
            if bad.first_missing:
                raise AvatarInputError(tracking_manifest, f"no head_to_world for {r['subject']}/{r['sequence']} frame "
                                       f"{r['frame']} (tracking from before head frames: re-run the track stage)") from None
            raise AvatarInputError(tracking_manifest, f"head_to_world of {r['subject']}/{r['sequence']} frame "
                                   f"{r['frame']} is not a rigid transform: {list(found[bad.first]['head_to_world'])}") from None
