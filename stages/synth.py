"""The synth stage: film every subject of the synthetic studio, in parallel over subjects.

One item = one subject (all its sequences and cameras). The face model is written once by the
driver; each worker loads it in ``setup()`` through the FLAME loader, exactly as a user-supplied
FLAME file would be loaded. A subject is committed only after all its files are written, so a
killed run redoes at most the subjects that were in flight.
"""

from __future__ import annotations

import numpy as np

from avat3r_core import storage
from avat3r_core.formats.calibration import write_nersemble_calibration
from avat3r_core.inference.visuals import png_bytes
from avat3r_core.color import color_calibration_json
from avat3r_core.synthetic import studio
from avat3r_core.synthetic.studio import BACKGROUND, StudioConfig
from avat3r_core.video import encode_video
from stages.runner import Stage, StageContext, StageResources, StageSummary, run_stage


#: Bumped when the stage's output changes meaning; part of the flow task's cache key (pipelines/caching.py).
VERSION = "1"


class SynthStage(Stage):
    name = "synth"
    version = VERSION

    def __init__(self, config: StudioConfig, raw_root: str, gt_root: str, face_model_dir: str):
        self.config, self.raw_root, self.gt_root, self.face_model_dir = config, raw_root, gt_root, face_model_dir

    def setup(self) -> None:
        self.head = studio.HeadAssets.load(*studio.face_model_paths(self.face_model_dir))
        self.serials, self.cams = studio.make_rig(self.config)
        self.plates = np.stack([studio.background_plate(c, self.config.width, self.config.height)
                                for c in range(len(self.serials))])
        self.casts = studio.camera_color_casts(self.config.seed, self.serials) if self.config.color_calibration else None

    def _write(self, ctx: StageContext, uri: str, data: bytes) -> None:
        ctx.add_file(uri, storage.atomic_write_bytes(uri, data))

    def process(self, item: dict, ctx: StageContext) -> list[dict]:
        from avat3r_core.synthetic.appearance import sample_appearance
        from avat3r_core.synthetic.head import sample_identity

        cfg, pid = self.config, item["subject"]
        subject_root = storage.join(self.raw_root, pid)
        gt_root = storage.join(self.gt_root, pid)
        identity = sample_identity(studio.subject_seed(cfg.seed, pid, "identity") % 2**32)
        appearance = sample_appearance(studio.subject_seed(cfg.seed, pid, "appearance") % 2**32)

        storage.makedirs(storage.join(subject_root, "calibration"))
        write_nersemble_calibration(storage.join(subject_root, "calibration", "camera_params.json"),
                                    self.serials, self.cams)
        if self.casts is not None:
            ccms = {s: np.linalg.inv(m) for s, m in self.casts.items()}
            self._write(ctx, storage.join(subject_root, "calibration", "color_calibration.json"),
                        color_calibration_json(ccms))
        self._write(ctx, storage.join(gt_root, "identity.json"), studio.json_bytes(
            {"subject": pid, "shape": identity, "appearance": appearance.to_dict(), "studio": studio.config_json(cfg)}))

        rows = []
        for serial, frames in studio.film_background(cfg, pid, self.serials, self.plates, self.casts).items():
            rel = f"{pid}/sequences/{BACKGROUND}/images/cam_{serial}.mp4"
            self._write(ctx, storage.join(self.raw_root, rel), encode_video(frames, cfg.fps, cfg.crf))
            rows.append(dict(id=f"{pid}_{BACKGROUND}_{serial}", subject=pid, sequence=BACKGROUND, camera=serial,
                             images=rel, alpha=None, frames=len(frames)))
        for sequence in cfg.sequence_names:
            filmed = studio.film_sequence(cfg, self.head, pid, sequence, self.serials, self.cams, self.plates,
                                          self.casts, identity, appearance)
            seq_gt = storage.join(gt_root, "sequences", sequence)
            self._write(ctx, storage.join(seq_gt, "flame_params.npz"), studio.npz_bytes(**filmed.params))
            self._write(ctx, storage.join(seq_gt, "landmarks2d.npz"), studio.npz_bytes(
                landmarks=filmed.landmarks, visible=filmed.visible, serials=np.array(self.serials)))
            for serial in self.serials:
                images = f"{pid}/sequences/{sequence}/images/cam_{serial}.mp4"
                alpha = f"{pid}/sequences/{sequence}/alpha/cam_{serial}.mp4"
                self._write(ctx, storage.join(self.raw_root, images), encode_video(filmed.frames[serial], cfg.fps, cfg.crf))
                self._write(ctx, storage.join(self.raw_root, alpha),
                            encode_video(filmed.alphas[serial], cfg.fps, crf=0, gray=True))
                self._write(ctx, storage.join(seq_gt, "depth", f"cam_{serial}.npz"),
                            studio.npz_bytes(depth=filmed.depth[serial]))
                rows.append(dict(id=studio_id(pid, sequence, serial), subject=pid, sequence=sequence, camera=serial,
                                 images=images, alpha=alpha, frames=cfg.frames))
            if cfg.preview and sequence == cfg.sequence_names[0]:
                frontal = self.serials[int(np.argmin(np.abs(self.cams.centers[:, 0].numpy())))]
                sheet = studio.contact_sheet(filmed, self.serials, frontal)
                self._write(ctx, storage.join(self.gt_root, "previews", f"{pid}.png"), png_bytes(sheet))
        return rows


def studio_id(pid: str, sequence: str, serial: str) -> str:
    from avat3r_core.ids import make_id

    return make_id(pid, sequence, serial)


def run_synth(config: StudioConfig, raw_root: str, gt_root: str, face_model_dir: str,
              resources: StageResources | None = None, executor: str = "ray") -> StageSummary:
    """Write the face model, then film every subject (resumable: finished subjects are skipped)."""
    studio.write_face_model(face_model_dir, config.seed)
    storage.atomic_write_bytes(storage.join(raw_root, "studio.json"), studio.json_bytes(studio.config_json(config)))
    items = [{"id": pid, "subject": pid} for pid in studio.subject_ids(config)]
    return run_stage(lambda: SynthStage(config, raw_root, gt_root, face_model_dir), items, raw_root, "synth",
                     resources=resources, executor=executor)
