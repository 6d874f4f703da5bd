"""Why the expression path does (not) learn: the data it sees and the gradients it gets, in one run.

Prints JSON:

* ``codes``: over the training split's samples, the spread of each part of the 135-d code
  (std of the dims, mean over the part), how much a target's code differs from its inputs' mean
  code per part (the change the network is asked to produce), the jaw opening (decoded angle)
  change target vs inputs and the share of samples where it exceeds 0.05 rad, and how well
  expression dim 0 tracks the jaw angle.
* ``input_choice``: the sampler alone over the training split's timesteps (nothing decoded), plain,
  with ``input_contrast`` and with ``input_pool: subject`` (``trained_with``: the one this run
  trains with): the mean jaw change target vs inputs' mean, the share of samples asking for more
  than 0.05 rad, and the share where *no* input view is within 0.05 rad of the target's jaw (the
  samples where only the code can tell the network what the mouth does).
* ``cross_attention_at_init``: on a few validation samples, the freshly initialised network's
  cross-attention layers: the spread of the attention weights over the image tokens, the share
  of each layer's output that differs between image tokens (the rest is one vector added to
  every token), and how far the target's code moves that output from the inputs' code.
* ``gradients``: a short training run of the given config on the shards, per component
  (tokenizer, self-attention blocks, cross-attention, expression MLP, head): the mean gradient
  norm the optimiser saw (after clipping, which scales all parts alike), its RMS per parameter and
  the relative change of the weights ``‖θ_end − θ_0‖ / ‖θ_0‖`` — the reference is the rest of
  the network measured in the same run.
* ``gradients.validation``: validation PSNR with the target's code vs the inputs' / a neutral
  code during the run.
* ``evaluation`` (with ``--frames`` and ``--ground-truth``): the evaluation's expression
  sensitivity of the final model on ``--split`` (mouth / eye boxes from the ground-truth landmarks,
  MediaPipe lip gap per sequence), :func:`stages.evaluate.run_evaluate` with ``--eval-samples``.
* ``summary``: the figures that say whether the code is used: validation PSNR with the target's /
  the inputs' / a neutral code at the last step, and from the evaluation the target-minus-inputs
  code PSNR over the view and in the mouth box and, per sequence, the lip gap's correlation and
  range ratio (target code, and the correlation with the inputs' code).

* ``overfit`` (``--overfit SUBJECT``, instead of the sections above): can the code be learned at all? One
  person's training samples with every sample's inputs replaced by the first one's (so only the code tells
  the targets apart), ``--steps`` training steps of the config on those samples alone, then on the same
  samples the mouth-box PSNR (the face model's mouth projected into each target view) with the target's code
  vs the (fixed) inputs' code, the same on the samples whose jaw differs by more than 0.05 rad, and
  ``--overfit-holdout`` samples left out of training (does it generalise to unseen expressions).

``--input-pool subject`` trains with inputs from the person's other sequences
(``LoaderConfig.input_pool``), ``--mouth-weight W`` with the mouth box weighted 1 + W in the loss
(``TrainDataConfig.mouth_weight``; the box from ``--face-model``, by default the studio head beside
the shards).

    python benchmarks/expression_path.py --shards data/shards --steps 150 [--model '{"...": ...}'] \
        [--frames data/frames/frames.parquet --ground-truth data/ground_truth/synthetic] \
        [--input-pool subject] [--mouth-weight 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataclasses import replace  # noqa: E402

from avat3r_core.config import build, merge  # noqa: E402
from avat3r_core.dataset.loader import Avat3rDataset, Avat3rSampler, LoaderConfig  # noqa: E402
from avat3r_core.dataset.pack import shard_urls  # noqa: E402
from avat3r_core.tracking import expression_code as ec  # noqa: E402
from avat3r_core.train.config import TrainConfig
from avat3r_core.train.loop import train_loop
from stages.train import ShardSource, TrainDataConfig, model_overrides_from_shards  # noqa: E402

PARTS = {"expr": ec.EXPR, "eyes": ec.EYES, "neck": ec.NECK, "jaw": ec.JAW, "head_rot": ec.HEAD_ROT,
         "head_trans": ec.HEAD_TRANS}


def jaw_angle(codes: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ec.decode(codes.reshape(-1, ec.DIM))["jaw"], axis=-1).reshape(codes.shape[:-1])


def code_statistics(shards: str, data: TrainDataConfig, samples: int) -> dict:
    source = ShardSource(shards, data, 1, split="train", validation=True)
    source.data = TrainDataConfig(loader=data.loader, epoch_length=data.epoch_length, val_samples=samples)
    targets, inputs = [], []
    for batch in source():
        targets.append(batch.expression.numpy())
        inputs.append(batch.input_expressions.numpy())
    t, i = np.concatenate(targets), np.concatenate(inputs)  # (N, 135), (N, V, 135)
    delta = t - i.mean(1)
    jt, ji = jaw_angle(t), jaw_angle(i).mean(1)
    return {
        "samples": len(t),
        "std_per_dim": {k: float(t[:, s].std(0).mean()) for k, s in PARTS.items()},
        "target_minus_inputs_abs_per_dim": {k: float(np.abs(delta[:, s]).mean()) for k, s in PARTS.items()},
        "jaw_angle_rad": {"min": float(jt.min()), "max": float(jt.max()),
                          "mean_abs_change_target_vs_inputs": float(np.abs(jt - ji).mean()),
                          "share_change_over_0.05": float((np.abs(jt - ji) > 0.05).mean())},
        "corr_expr0_vs_jaw_angle": float(np.corrcoef(t[:, 0], jt)[0, 1]) if t[:, 0].std() > 0 else None,
    }


#: the sampler settings input_choice compares (LoaderConfig overrides)
SAMPLERS = {"plain": {"input_contrast": False, "input_pool": "sequence"},
            "contrast": {"input_contrast": True, "input_pool": "sequence"},
            "subject": {"input_contrast": False, "input_pool": "subject"}}


def input_choice_statistics(shards: str, loader: LoaderConfig) -> dict:
    import random

    timesteps = list(Avat3rDataset(shard_urls(shards, "train"), loader.read_once(), seed=0).samples())
    out = {}
    for name, settings in SAMPLERS.items():
        sampler = Avat3rSampler(replace(loader, **settings), random.Random(0))
        mean_change, nearest_change, other_sequence = [], [], []
        for ts in timesteps:
            for plan in sampler.push(ts):
                jt = jaw_angle(plan.target.expression)
                ji = jaw_angle(np.stack([t.expression for t, _ in plan.inputs]))
                mean_change.append(abs(jt - ji.mean()))
                nearest_change.append(np.abs(jt - ji).min())
                other_sequence.append(np.mean([t.sequence != plan.target.sequence for t, _ in plan.inputs]))
        m, n = np.array(mean_change), np.array(nearest_change)
        share = lambda x: float(x.mean()) if len(x) else None  # noqa: E731 - no sample: no figure
        out[name] = {"samples": len(m), "jaw_change_mean_rad": share(m), "share_change_over_0.05": share(m > 0.05),
                     "share_no_input_within_0.05": share(n > 0.05),
                     "share_inputs_from_other_sequences": share(np.array(other_sequence))}
    out["trained_with"] = next((name for name, settings in SAMPLERS.items()
                                if all(getattr(loader, k) == v for k, v in settings.items())), "other")
    return out


def cross_attention_at_init(config: TrainConfig, shards: str, data: TrainDataConfig, samples: int = 3) -> dict:
    from avat3r_core.animation.sensitivity import input_code
    from avat3r_core.inference.predict import model_inputs
    from avat3r_core.train.config import build_model

    torch.manual_seed(config.seed)
    model = build_model(config).eval()
    captured: dict[int, dict] = {}

    def hook(index):
        def record(module, args, out):
            x, context = args
            q = module.q(module.norm_q(x))
            k = module.kv(module.norm_kv(context)).chunk(2, dim=-1)[0]
            b, n, d = q.shape
            h = module.heads
            logits = q.view(b, n, h, d // h).transpose(1, 2) @ k.view(b, -1, h, d // h).transpose(1, 2).transpose(-1, -2)
            captured[index] = {"weights": torch.softmax(logits / (d // h) ** 0.5, -1), "out": out - x, "x": x}
        return record

    for i, layer in enumerate(model.transformer.cross):
        layer.register_forward_hook(hook(i))
    rows: dict[str, list[float]] = defaultdict(list)
    source = ShardSource(shards, build(TrainDataConfig, {"loader": data.loader, "val_samples": samples}), 1,
                         split=data.val_split, validation=True)
    with torch.no_grad():
        for batch in source():
            model(model_inputs(batch), input_code(batch))
            inputs_code = {i: c["out"] for i, c in captured.items()}
            model(model_inputs(batch), batch.expression)
            for i, c in captured.items():
                out, x = c["out"], c["x"]
                varying = out - out.mean(1, keepdim=True)
                rows[f"layer{i}_attention_weight_std_over_tokens"].append(float(c["weights"].std(2).mean()))
                rows[f"layer{i}_output_share_varying_over_tokens"].append(float(varying.pow(2).sum() / out.pow(2).sum()))
                rows[f"layer{i}_output_over_token_norm"].append(float(out.norm(dim=-1).mean() / x.norm(dim=-1).mean()))
                rows[f"layer{i}_code_change_over_token_norm"].append(
                    float((out - inputs_code[i]).norm(dim=-1).mean() / x.norm(dim=-1).mean()))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def component(name: str) -> str:
    for prefix, part in (("tokenizer.", "tokenizer"), ("transformer.blocks.", "self_attention"),
                         ("transformer.cross.", "cross_attention"), ("transformer.expression.", "expression_mlp"),
                         ("head.", "head")):
        if name.startswith(prefix):
            return part
    return "other"


def gradient_run(config: TrainConfig, data: TrainDataConfig, shards: str, evaluate: dict | None = None) -> dict:
    norms: dict[str, list[float]] = defaultdict(list)
    state: dict = {}

    original_adam = torch.optim.Adam

    class RecordingAdam(original_adam):  # the optimiser train_loop builds, recording what each part gets
        def step(self, closure=None):
            model = state["model"]
            sq: dict[str, float] = defaultdict(float)
            count: dict[str, int] = defaultdict(int)
            for n, p in model.named_parameters():
                if p.grad is not None:
                    sq[component(n)] += float(p.grad.detach().pow(2).sum())
                    count[component(n)] += p.numel()
            for k in sq:
                norms[k].append(sq[k] ** 0.5)
                norms[k + "_rms"].append((sq[k] / count[k]) ** 0.5)
            return super().step(closure)

    # train_loop builds its network through the name it imported
    from avat3r_core.train import loop as training_loop

    original_build = training_loop.build_model

    def build_and_keep(cfg):
        model = original_build(cfg)
        state["model"] = model
        state["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    training_loop.build_model, torch.optim.Adam = build_and_keep, RecordingAdam
    try:
        with tempfile.TemporaryDirectory() as tmp:
            metrics = train_loop(config, ShardSource(shards, data, config.batch_size, seed=config.seed), tmp,
                                 val_source=ShardSource(shards, data, 1, split=data.val_split, validation=True))
            val = list(csv_rows(Path(tmp) / "plots" / "val.csv"))
            evaluation = None
            if evaluate:
                from avat3r_core.evaluation import EvalConfig
                from stages.evaluate import run_evaluate

                m = run_evaluate(Path(tmp) / "checkpoints", shards, Path(tmp) / "eval", evaluate["split"],
                                 frames_manifest=evaluate["frames"], ground_truth=evaluate["ground_truth"],
                                 config=EvalConfig(max_samples=evaluate["samples"], target_views=4))
                evaluation = {"psnr": m["ours"]["psnr"], "baseline_psnr": m["baseline"]["psnr"],
                              "expression_sensitivity": m["expression_sensitivity"]}
    finally:
        training_loop.build_model, torch.optim.Adam = original_build, original_adam
    model = state["model"]
    change: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for n, p in model.named_parameters():
        c = component(n)
        change[c][0] += float((p.detach() - state["initial"][n]).pow(2).sum())
        change[c][1] += float(state["initial"][n].pow(2).sum())
    return {
        "steps": metrics["steps"],
        "grad_norm_mean": {k: float(np.mean(v)) for k, v in norms.items() if not k.endswith("_rms")},
        "grad_rms_per_parameter_mean": {k[:-4]: float(np.mean(v)) for k, v in norms.items() if k.endswith("_rms")},
        "relative_weight_change": {k: (a / b) ** 0.5 if b > 0 else None for k, (a, b) in change.items()},
        "validation": val,
        "evaluation": evaluation,
    }


def summary(gradients: dict) -> dict:
    """The expression figures of a run in one place (see the module docstring)."""
    last = gradients["validation"][-1] if gradients["validation"] else {}
    out = {"val_psnr": {k: last.get(c) for k, c in (("target_code", "psnr"), ("inputs_code", "psnr_inputs_code"),
                                                    ("inputs_expression", "psnr_inputs_expression"),
                                                    ("neutral_code", "psnr_neutral_code"))}}
    ev = gradients.get("evaluation")
    if ev:
        es = ev["expression_sensitivity"]
        delta, expression = es["target_minus_inputs"], es["target_minus_inputs_expression"]
        out.update(eval_psnr=ev["psnr"], target_minus_inputs_psnr=delta["psnr"],
                   target_minus_inputs_mouth_psnr=delta["mouth_psnr"],
                   target_minus_inputs_expression_psnr=expression["psnr"],
                   target_minus_inputs_expression_mouth_psnr=expression["mouth_psnr"],
                   mouth_psnr={c: es["codes"][c]["mouth_psnr"] for c in es["codes"]},
                   lip_gap=[{k: q[k] for k in ("subject", "sequence", "frames", "correlation", "range_ratio",
                                               "inputs_code_correlation", "inputs_code_range_ratio")}
                            for q in es["lip_gap_sequences"]], lip_gap_status=es["lip_gap_status"])
    return out


#: the fields of a batch that describe its inputs (replaced by the reference sample's in ``overfit``)
INPUT_FIELDS = ("images", "alphas", "cameras", "position_maps", "confidence", "features", "input_frames",
                "input_head_to_world", "input_expressions")


def overfit_run(config: TrainConfig, data: TrainDataConfig, shards: str, subject: str, face_model: str,
                holdout: int = 0, eval_every: int = 0) -> dict:
    import random

    from avat3r_core.animation.sensitivity import MOUTH, MouthWeights, input_code, region_boxes, region_scores
    from avat3r_core.inference.predict import predict_images, targets_on_background
    from avat3r_core.losses import Avat3rLoss
    from avat3r_core.metrics import psnr
    from avat3r_core.synthetic.studio import face_model_paths
    from avat3r_core.train.config import build_model, build_optimizer
    from avat3r_core.train.loop import train_step

    source = ShardSource(shards, build(TrainDataConfig, {"loader": data.loader, "val_samples": 10**6}), 1,
                         split="train", validation=True)
    samples = [b for b in source() if b.keys[0].split("_")[0] == subject]
    if len(samples) < 2 + holdout:
        raise ValueError(f"--overfit {subject}: {len(samples)} training samples of that person, need {2 + holdout}")
    random.Random(0).shuffle(samples)
    ref = samples[0]  # its inputs become every sample's; it is never held out (its code is the inputs')
    samples = [replace(b, **{f: getattr(ref, f) for f in INPUT_FIELDS}) for b in samples]
    mouth = MouthWeights(1.0, *face_model_paths(face_model))
    H, W = ref.target_images.shape[-2:]
    boxes = [region_boxes(*mouth.projected_landmarks(b), MOUTH, H, W) for b in samples]
    held = set(random.Random(1).sample(range(1, len(samples)), holdout))
    train = [i for i in range(len(samples)) if i not in held]

    torch.manual_seed(config.seed)
    model = build_model(config).train()
    optimizer, scheduler = build_optimizer(model, config)
    loss_fn = Avat3rLoss(config.loss)
    background = torch.tensor(config.background)

    @torch.no_grad()
    def measure(indices: list[int]) -> dict:
        model.eval()
        rows = []
        for i in indices:
            b = samples[i]
            target = targets_on_background(b, background).float().clamp(0, 1)
            render = {name: predict_images(replace(b, expression=code), model, config.background).float()
                      for name, code in (("target", b.expression), ("inputs", input_code(b)))}
            jaw = jaw_angle(torch.stack([b.expression[0], input_code(b)[0]]).numpy())
            rows.append({"big_jaw": bool(abs(jaw[0] - jaw[1]) > 0.05),
                         **{f"{n}_psnr": float(psnr(r, target).mean()) for n, r in render.items()},
                         **{f"{n}_mouth_psnr": float(np.nanmean(region_scores(r, target, boxes[i])[0]))
                            for n, r in render.items()}})
        model.train()
        mean = lambda key, rs: float(np.mean([r[key] for r in rs])) if rs else None  # noqa: E731
        big = [r for r in rows if r["big_jaw"]]
        return {"samples": len(rows), "big_jaw_samples": len(big),
                **{k: mean(k, rows) for k in ("target_psnr", "inputs_psnr", "target_mouth_psnr", "inputs_mouth_psnr")},
                "mouth_gain": mean("target_mouth_psnr", rows) - mean("inputs_mouth_psnr", rows),
                "mouth_gain_big_jaw": (mean("target_mouth_psnr", big) - mean("inputs_mouth_psnr", big)) if big else None}

    history, order = [], []
    for step in range(config.schedule.steps):
        if not order:
            order = random.Random(step).sample(train, len(train))
        train_step(model, samples[order.pop()], optimizer, loss_fn, config, step, scheduler)
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < config.schedule.steps:
            history.append({"step": step + 1, **measure(train)})
    return {"subject": subject, "steps": config.schedule.steps, "history": history, "final": measure(train),
            "held_out": measure(sorted(held)) if held else None}


def csv_rows(path: Path):
    import csv

    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            yield {k: (float(v) if v not in ("", None) else None) for k, v in r.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default="data/shards")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--samples", type=int, default=64, help="training samples for the code statistics")
    ap.add_argument("--model", default="{}", help="Avat3rConfig overrides (JSON)")
    ap.add_argument("--train", default="{}", help="TrainConfig overrides (JSON)")
    ap.add_argument("--val-samples", type=int, default=8)
    ap.add_argument("--frames", default="", help="frames.parquet (with --ground-truth: evaluate the final model)")
    ap.add_argument("--ground-truth", default="")
    ap.add_argument("--split", default="test")
    ap.add_argument("--eval-samples", type=int, default=20)
    ap.add_argument("--loader", default="{}", help="LoaderConfig overrides (JSON), e.g. {\"input_contrast\": true}")
    ap.add_argument("--input-pool", choices=("sequence", "subject"), default="sequence",
                    help="training inputs from the target's sequence or the person's other sequences")
    ap.add_argument("--mouth-weight", type=float, default=0.0, help="loss weight added inside the mouth box (0: off)")
    ap.add_argument("--face-model", default="", help="face model directory for --mouth-weight "
                    "(default: models/studio_head beside the shards directory)")
    ap.add_argument("--overfit", default="", help="a training person: run only the overfit check on them")
    ap.add_argument("--overfit-holdout", type=int, default=0, help="overfit: samples left out of training")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on tiny data (the test suite runs it)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tmp = None
    if args.smoke:  # 3 tiny people (train / val / test), random codes and priors, 2 steps; measures nothing
        tmp = tempfile.TemporaryDirectory(prefix="avat3r-expression-path-")
        args.shards, args.steps, args.samples, args.val_samples = smoke_shards(Path(tmp.name)), 2, 4, 1
        args.frames = args.ground_truth = ""
        args.input_pool, args.mouth_weight = "subject", 4.0  # the options' code paths run too
        args.face_model = str(Path(tmp.name) / "model")
    loader = {"preset": "demo", "target_views": 4, "input_pool": args.input_pool, **json.loads(args.loader)}
    face_model = args.face_model or str(Path(args.shards).parent / "models" / "studio_head")
    mouth = {}
    if args.mouth_weight:
        from avat3r_core.synthetic.studio import face_model_paths

        model_path, embedding = face_model_paths(face_model)
        mouth = {"mouth_weight": args.mouth_weight, "face_model": model_path, "landmark_embedding": embedding}
    data = build(TrainDataConfig, {"preset": "demo", "val_samples": args.val_samples, "loader": loader, **mouth})
    model = {**model_overrides_from_shards(args.shards), "frame": data.loader.frame, **json.loads(args.model)}
    config = build(TrainConfig, merge({"preset": "tiny", "schedule": {"steps": args.steps, "validate_every": max(1, args.steps // 3)},
                                       "checkpoint": {"every": args.steps}, "model": model}, json.loads(args.train)))
    if args.overfit or args.smoke:
        subject = args.overfit or json.loads((Path(args.shards) / "splits.json").read_text())["train"][0]
        overfit = overfit_run(config, data, args.shards, subject, face_model, args.overfit_holdout,
                              max(1, args.steps // 10))
        if not args.smoke:
            print(json.dumps({"config": {"steps": args.steps, "model": model, "train": json.loads(args.train),
                                         "loader": loader}, "overfit": overfit}, indent=1))
            return
    evaluate = ({"frames": args.frames, "ground_truth": args.ground_truth, "split": args.split,
                 "samples": args.eval_samples} if args.frames and args.ground_truth else None)
    out = {"config": {"steps": args.steps, "model": model, "train": json.loads(args.train), "loader": loader,
                      "mouth_weight": args.mouth_weight},
           "codes": code_statistics(args.shards, data, args.samples),
           "input_choice": input_choice_statistics(args.shards, data.loader),
           "cross_attention_at_init": cross_attention_at_init(config, args.shards, data),
           "gradients": gradient_run(config, data, args.shards, evaluate)}
    out["summary"] = summary(out["gradients"])
    if args.smoke:
        out["overfit"] = overfit
    print(json.dumps(out, indent=1))
    if tmp is not None:
        tmp.cleanup()


def smoke_shards(root: Path) -> str:
    from avat3r_core.dataset.pack import PackConfig
    from avat3r_core.extract import ExtractConfig
    from avat3r_core.synthetic.studio import StudioConfig
    from benchmarks.loader import make_side_manifests
    from stages.extract import run_extract
    from stages.pack import run_pack
    from stages.synth import run_synth

    run_synth(StudioConfig(subjects=3, sequences=2, frames=3, cameras=4, resolution=96), str(root / "raw"),
              str(root / "gt"), str(root / "model"), executor="local")
    run_extract(ExtractConfig(resolution=32), str(root / "raw"), str(root / "frames"), executor="local")
    make_side_manifests(root / "frames", root / "tracking", root / "priors", feature_dim=8)
    run_pack(PackConfig(shard_size_mb=1.0, min_shards=1, split_fractions=(0.34, 0.33, 0.33)),
             str(root / "frames/frames.parquet"), str(root / "tracking/tracking.parquet"),
             str(root / "priors/priors.parquet"), str(root / "shards"), executor="local")
    return str(root / "shards")


if __name__ == "__main__":
    main()
