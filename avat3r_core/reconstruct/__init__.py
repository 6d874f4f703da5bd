"""Reconstruction: avatar libraries, which avatars to build from what, and everything done to one avatar.

A team builds avatars in bulk from a *library manifest* (CSV, YAML or Parquet; one row per avatar):

============  ======================================================================================
column        meaning
============  ======================================================================================
avatar_id     optional; dot-free ``[A-Za-z0-9_-]`` (it names ``avatars/<id>/``). Absent: derived
              deterministically from mode, subject / source name, sequence and frame.
mode          ``capture`` | ``photos`` | ``image`` | ``video``
source        capture: the capture's ``frames.parquet``; photos: a folder of images (or several
              image paths joined by ``;``); image: one image; video: one video file
subject       capture only (required there); ``sequence``, ``frame``: optional narrowing
expressions   optional expression track for ``animation.mp4``: ``builtin``, a ``tracking.parquet``
              (``path#<subject>/<sequence>`` picks one tracked sequence) or a ``.npy`` of (T, 135) codes
priors        capture only: ``priors.parquet`` (default ``<frames dir>/../priors/priors.parquet``)
tracking      capture only: ``tracking.parquet`` (default ``<frames dir>/../tracking/tracking.parquet``)
============  ======================================================================================

Relative paths are relative to the library file (like every manifest of the project), so a library
can be moved together with its inputs. Errors name the file, the row and the field.

Per mode, :class:`Preparer` turns one library row into the model's inputs (:class:`PreparedAvatar`):

* ``capture`` — views of a preprocessed capture: ``frames.parquet`` crops, ``priors.parquet``
  position maps / features (whatever sources the priors stage used, recorded), chosen by
  farthest viewpoints over the subject's (frame, camera) candidates, preferring distinct
  timesteps (as training did: the model was trained on inputs at other timesteps).
* ``photos`` / ``image`` / ``video`` — uncalibrated pictures, read one at a time with caps checked
  first (:func:`read_picture`): landmarks (MediaPipe, or landmark files beside the pictures:
  backend ``file``) → :func:`~avat3r_core.tracking.fit.fit_uncalibrated`
  (face-model shape, per-image expression, one camera per image, head at the origin) → square
  head crops with exact crop cameras (the same ``frame_boxes``/``crop_image`` as extraction) →
  priors: DUSt3R position maps when a checkpoint is given, else the ``face_model`` stand-in (the
  fitted mesh rendered into each crop); features from EfficientNet (stand-in), Sapiens or none,
  projected with the training data's ``feature_projection.npz``. Video mode fits a subsample of the
  frames and picks the frames whose head poses differ most (farthest camera directions in the head
  frame). Photos beyond ``num_views`` are picked the same way. A person matte (MediaPipe's
  selfie segmentation, or the labelled face-model silhouette) keeps Gaussians off the background;
  :func:`picture_fidelity` measures each such avatar against its photo (input-view PSNR in the
  matte, dlib identity at 0, ±20, ±40° yaw) into ``meta.json`` and the index.

Failures are named exceptions carrying the path and the reason (:class:`NoFaceError`,
:class:`UnreadableInputError`, :class:`TooFewFramesError`, :class:`FitFailedError`,
:class:`FaceTooSmallError`, :class:`ExtremePoseError`), so the error
manifest says which file of which avatar was at fault.

:func:`build_avatar` then runs the network once (``Avat3r.encode``; the encoder cache is saved so
driving later runs only the decoder), decodes the neutral expression (Gaussians → ``.ply``,
``preview.png``, ``turntable.mp4``) and an expression track (``animation.mp4``).
:func:`animate_avatar` drives a built avatar from its cache alone (``avat3r animate``).

Pure torch/numpy: no Ray, no Prefect (``stages/reconstruct.py`` adds the fan-out).

Modules: :mod:`.library` (manifests), :mod:`.errors` (named input failures), :mod:`.pictures`
(picture / video / landmark-file reading), :mod:`.prepared` (config, prepared inputs, view choice),
:mod:`.prepare` (:class:`~.prepare.Preparer`) with :mod:`.prepare_capture` and :mod:`.prepare_pictures`,
:mod:`.expressions` (expression tracks, head motion), :mod:`.build` (build and animate). The
network is loaded and driven through :mod:`avat3r_core.inference` only.
"""
