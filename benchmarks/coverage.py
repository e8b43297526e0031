"""Which models convert exactly: one model per timm model module plus every torchvision classification model
(and, as a separate set, every torchvision video classification model).

Per model (random weights, eval mode, input = the model's pretrained-cfg size, batch 2):
``slim.convert(model, WidthSpec.range(0.25, 1.0), example_input=x)`` (a ``SlimWarning`` counts as a silent
fallback), BN post-statistics at 0.25 / 0.5 from one random batch, width 1.0 against the original, then 0.25 /
0.5 / 1.0, and ``slim.export(model, 0.5)`` against the dynamic model at 0.5. Verdicts:

- ``exact``: every comparison within ``1e-4`` of the output's scale;
- ``refused``: a typed ``slim_plugins`` error (the reason names the op / module);
- ``untyped``: any other exception (a defect); ``fallback``: a ``SlimWarning``; ``mismatch``: outputs differ;
  ``unslimmed``: exact, but the export at 0.5 is no smaller than the model (nothing was slimmed).

Rule for timm: for every module of ``timm.models`` that registers models, the registered model with the fewest
parameters (counted on the meta device, no weights); families whose smallest model has more than 150 M parameters
are skipped (listed as ``skipped``), as are torchvision models over 150 M. Each model runs in its own process
with a time limit.

Usage::

    python benchmarks/coverage.py                  # both sets -> benchmarks/coverage_{timm,torchvision}.csv
    python benchmarks/coverage.py --set timm --only vit convnext          # -> coverage_timm_partial.csv
    python benchmarks/coverage.py --set timm --only levit --merge        # update those rows of coverage_timm.csv
    python benchmarks/coverage.py --set timm-variants          # the popular models of VARIANTS
    python benchmarks/coverage.py --set timm-sample            # 45 other timm models, a seeded random sample
    python benchmarks/coverage.py --set torchvision-video      # torchvision's video models (Conv3d, 3-d Swin, MViT)
    python benchmarks/coverage.py --set torchvision-dense      # its detectors (scope="backbone") and segmentation
    python benchmarks/coverage.py --one timm:convnext_atto    # one model, JSON to stdout
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_PARAMS = 150e6
TOL = 1e-4


def timm_picks() -> list[tuple[str, str, float]]:
    """``(module, model, params)`` per timm model module: the smallest registered model."""
    import timm
    import torch

    out = []
    for mod in sorted(timm.list_modules()):
        names = timm.list_models(module=mod)
        best = None
        for name in names:
            try:
                with torch.device("meta"):
                    m = timm.create_model(name, pretrained=False)
                n = sum(p.numel() for p in m.parameters())
            except Exception:  # a model that cannot even be built on the meta device: try the next
                continue
            if best is None or n < best[1]:
                best = (name, n)
        if best is not None:
            out.append((mod, best[0], best[1]))
    return out


# Popular timm models beyond the smallest of each module (``--set timm-variants``): variants users fine-tune today
# (DINOv2 / v3, SigLIP, CLIP, EVA-02, rotary ViTs, register tokens, NaFlexViT) and current CNN / hybrid baselines.
VARIANTS = [
    "vit_small_patch16_224", "deit3_small_patch16_224", "flexivit_small", "vit_medium_patch16_gap_256",
    "vit_little_patch16_reg4_gap_256", "vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
    "vit_small_patch16_dinov3", "vit_base_patch16_siglip_224", "vit_base_patch16_siglip_gap_224",
    "vit_base_patch16_clip_224", "eva02_tiny_patch14_224", "vit_small_patch16_rope_224",
    "vit_betwixt_patch16_rope_reg4_gap_256", "vit_pe_core_tiny_patch16_384", "naflexvit_base_patch16_gap",
    "convnextv2_atto", "fastvit_t8", "levit_128s", "efficientvit_b0", "mobilenetv4_conv_small", "hiera_tiny_224",
    "caformer_s18", "tiny_vit_5m_224", "repvit_m1", "efficientformerv2_s0", "regnety_002", "mambaout_femto",
    "resnet50d", "efficientnet_b0", "mobilevitv2_050", "coatnet_0_rw_224", "maxvit_tiny_rw_224", "nest_tiny",
    "ghostnetv3_050", "inception_next_tiny", "rdnet_tiny", "starnet_s1", "botnet26t_256", "halonet26t",
    "lambda_resnet26t",
]


def variant_picks() -> list[tuple[str, str, float]]:
    """``(module, model, params)`` of :data:`VARIANTS` (parameters counted on the meta device)."""
    import timm
    import torch

    out = []
    for name in VARIANTS:
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False)
        mod = timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]
        out.append((mod, name, float(sum(p.numel() for p in m.parameters()))))
    return out


SAMPLE_SEED, SAMPLE_SIZE, SAMPLE_MAX_PARAMS = 20261207, 45, 40e6


def sample_picks() -> list[tuple[str, str, float]]:
    """``(module, model, params)`` of a random sample of timm models that neither other timm set holds: the
    registered models shuffled with seed :data:`SAMPLE_SEED`, the first :data:`SAMPLE_SIZE` with fewer than 40 M
    parameters (meta device; models that cannot be built there are passed over). Not chosen by us: models the
    converter was never tuned on."""
    import random

    import timm
    import torch

    taken = {name for _, name, _ in timm_picks()} | set(VARIANTS)
    names = [n for n in timm.list_models() if n not in taken]
    random.Random(SAMPLE_SEED).shuffle(names)
    out = []
    for name in names:
        try:
            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False)
        except Exception:  # cannot be built on the meta device: not sampled
            continue
        n = float(sum(p.numel() for p in m.parameters()))
        if n < SAMPLE_MAX_PARAMS:
            out.append((timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1], name, n))
        if len(out) == SAMPLE_SIZE:
            break
    return out


def torchvision_picks() -> list[tuple[str, str, float]]:
    """Every torchvision classification model, with its parameter count (meta device)."""
    import torch
    import torchvision

    import warnings

    out = []
    for n in sorted(torchvision.models.list_models(module=torchvision.models)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                with torch.device("meta"):
                    m = torchvision.models.get_model(n, weights=None)
            except NotImplementedError:  # a builder that computes widths with tensors (RegNet): build it for real
                m = torchvision.models.get_model(n, weights=None)
        out.append(("torchvision", n, float(sum(p.numel() for p in m.parameters()))))
        del m
    return out


def video_picks() -> list[tuple[str, str, float]]:
    """Every torchvision video classification model (``torchvision.models.video``), with its parameter count."""
    import torch
    import torchvision

    out = []
    for n in sorted(torchvision.models.list_models(module=torchvision.models.video)):
        with torch.device("meta"):
            m = torchvision.models.get_model(n, weights=None)
        out.append(("torchvision-video", n, float(sum(p.numel() for p in m.parameters()))))
    return out


def dense_picks() -> list[tuple[str, str, float]]:
    """Every torchvision detection and semantic segmentation model (``torchvision.models.detection`` /
    ``.segmentation``), with its parameter count (meta device): the detectors converted by ``scope="backbone"``
    (their transform does not trace) from their own list of images, the segmentation models whole."""
    import torch
    import torchvision

    out = []
    for module in (torchvision.models.detection, torchvision.models.segmentation):
        for n in sorted(torchvision.models.list_models(module=module)):
            with torch.device("meta"):
                m = torchvision.models.get_model(n, weights=None, weights_backbone=None)
            out.append(("torchvision-dense", n, float(sum(p.numel() for p in m.parameters()))))
    return out


def _is_detector(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models.detection)


def _input(model, source: str, name: str = ""):
    import torch

    size = (3, 224, 224)
    if source == "torchvision-video":  # clips of 16 frames: the 3-d ResNets at 112 px, the others at 224 px
        size = (3, 16, 112, 112) if type(model).__name__ == "VideoResNet" else (3, 16, 224, 224)
    elif source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = tuple(cfg.get("input_size", size))
    elif "inception" in type(model).__name__.lower():
        size = (3, 299, 299)
    g = torch.Generator().manual_seed(0)
    if source == "torchvision-dense" and _is_detector(name):
        return ([torch.rand(3, 240, 320, generator=g), torch.rand(3, 320, 240, generator=g)],)  # a list of images
    return torch.randn(2, *size, generator=g)


def check_one(spec: str) -> dict:
    """Convert / calibrate / compare one model; returns ``{model, verdict, reason, ...}``."""
    import torch

    import slim_plugins as slim
    from slim_plugins.convert import SlimWarning

    source, name = spec.split(":", 1)
    torch.manual_seed(0)
    row = {"source": source, "model": name, "verdict": "", "reason": "", "params_m": "", "params_050_m": "",
           "max_rel_diff": ""}
    try:
        if source == "timm":
            import timm

            import slim_plugins.integrations.timm  # noqa: F401  (timm's layers)

            model = timm.create_model(name, pretrained=False)
        else:
            import torchvision

            kw = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
            if source == "torchvision-dense":  # detectors keep every box (random weights score low): none empty
                thresh = {"fasterrcnn": "box_score_thresh", "maskrcnn": "box_score_thresh",
                          "keypointrcnn": "box_score_thresh"}.get(name.split("_")[0], "score_thresh")
                kw = {"weights_backbone": None, **({thresh: 0.0} if _is_detector(name) else {})}
            model = torchvision.models.get_model(name, weights=None, **kw)  # (image, video and dense models)
    except Exception as e:
        row.update(verdict="skipped", reason=f"cannot build: {type(e).__name__}: {e}"[:300])
        return row
    model.eval()
    row["params_m"] = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}"
    x = _input(model, source, name)
    dense = source == "torchvision-dense"
    # a dense model's output is a dict / list of dicts (boxes, scores, labels, masks, keypoints): every tensor in it
    # is compared (a detector's list of images is one positional input: x is then the tuple of inputs)
    args = x if isinstance(x, tuple) else (x,)
    scoped = {"scope": "backbone"} if dense and _is_detector(name) else {}
    with torch.no_grad():
        ref = model(*args)
    if not dense:
        ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    scale = max([t.abs().max().item() for t in _leaves(ref) if t.numel()] + [0.0]) + 1e-6
    worst = 0.0

    def diff(a, b):
        """Max difference of ``a`` from the reference ``b``: relative to the model's output scale, for a dense
        model per output tensor (boxes in pixels, scores, masks), which must not all be empty."""
        if not dense:
            a = a[0] if isinstance(a, (tuple, list)) else a
            b = b[0] if isinstance(b, (tuple, list)) else b
        la, lb = _leaves(a), _leaves(b)
        if [t.shape for t in la] != [t.shape for t in lb]:
            raise AssertionError(f"shapes {[tuple(t.shape) for t in la]} vs {[tuple(t.shape) for t in lb]}"[:200])
        if not dense:
            return max((p - q).abs().max().item() / scale for p, q in zip(la, lb))
        pairs = [(p, q) for p, q in zip(la, lb) if q.numel()]
        if not pairs:
            raise AssertionError("every output tensor is empty: nothing to compare")
        return max((p - q).abs().max().item() / (q.abs().max().item() + 1e-6) for p, q in pairs)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", SlimWarning)
            slim.convert(model, slim.WidthSpec.range(0.25, 1.0), example_input=x, **scoped)
            model.eval()
            slim.calibrate_bn(model, [x], widths=[0.25, 0.5])
            with torch.no_grad():
                worst = max(worst, diff(model(*args), ref))
                for w in (0.25, 0.5, 1.0):
                    with slim.width(w):
                        y = model(*args)
                    if w == 0.5:
                        plain = slim.export(model, 0.5, example_input=x if dense else None)
                        worst = max(worst, diff(plain(*args), y))
                        row["params_050_m"] = f"{sum(p.numel() for p in plain.parameters()) / 1e6:.2f}"
    except SlimWarning as e:
        row.update(verdict="fallback", reason=f"SlimWarning: {e}"[:300])
        return row
    except slim.SlimError as e:
        row.update(verdict="refused", reason=f"{type(e).__name__}: {e}".replace("\n", " ")[:300])
        return row
    except Exception as e:
        row.update(verdict="untyped", reason=f"{type(e).__name__}: {e}".replace("\n", " ")[:300])
        return row
    row["max_rel_diff"] = f"{worst:.2e}"
    row["verdict"] = "exact" if worst <= TOL else "mismatch"
    if row["verdict"] == "exact" and float(row["params_050_m"]) >= float(row["params_m"]):
        row.update(verdict="unslimmed", reason="the export at 0.5 has as many parameters as the model")
    return row


def _leaves(out) -> list:
    """The tensors of an output (a tensor, or a tuple / list / dict of them, nested), as float."""
    from torch.utils._pytree import tree_leaves

    return [t.float() for t in tree_leaves(out) if hasattr(t, "shape") and hasattr(t, "float")]


FIELDS = ["family", "model", "params_m", "params_050_m", "verdict", "max_rel_diff", "seconds", "reason"]


def run(picks, out_csv: Path, timeout: int, merge: bool = False):
    rows = []
    for mod, name, n in picks:
        if n > MAX_PARAMS:
            rows.append({"source": mod, "model": name, "verdict": "skipped",
                         "reason": f"smallest model of the family has {n / 1e6:.0f} M parameters (> 150 M)",
                         "params_m": f"{n / 1e6:.2f}", "max_rel_diff": ""})
            continue
        src = mod if mod in ("torchvision", "torchvision-video", "torchvision-dense") else "timm"
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", f"{src}:{name}"], capture_output=True, text=True,
                               timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
                                   "OMP_NUM_THREADS", "2")})
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(line[-1]) if line else {
                "source": src, "model": name, "verdict": "untyped",
                "reason": f"process died (rc {p.returncode}): {p.stderr.strip().splitlines()[-1:]}"[:300]}
        except subprocess.TimeoutExpired:
            row = {"source": src, "model": name, "verdict": "timeout", "reason": f"over {timeout} s"}
        row["family"] = mod
        row["seconds"] = f"{time.time() - t0:.1f}"
        rows.append(row)
        print(f"{mod:28s} {name:40s} {row['verdict']:9s} {row.get('reason', '')[:110]}", flush=True)
    fields = FIELDS
    if merge and out_csv.exists():  # re-measured models replace their rows; the others stay
        with open(out_csv, newline="") as f:
            old = list(csv.DictReader(f))
        new = {r["model"]: r for r in rows}
        rows = [new.pop(r["model"], r) for r in old] + list(new.values())
    tmp = out_csv.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            r.setdefault("family", r.get("source", ""))
            w.writerow(r)
    os.replace(tmp, out_csv)
    counts: dict = {}
    for r in rows:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    print(out_csv.name, counts)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=["timm", "torchvision", "both", "timm-variants", "timm-sample",
                                      "torchvision-video", "torchvision-dense"],
                    default="both", help="timm-variants: the popular models of VARIANTS -> coverage_timm-variants.csv; "
                    "timm-sample: a seeded random sample of other timm models -> coverage_timm-sample.csv; "
                    "torchvision-video: torchvision's video models -> coverage_torchvision-video.csv; "
                    "torchvision-dense: its detection and segmentation models -> coverage_torchvision-dense.csv")
    ap.add_argument("--only", nargs="*", help="timm modules / torchvision models to run (default: all)")
    ap.add_argument("--one", help="source:model, run in this process, JSON to stdout")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model")
    ap.add_argument("--merge", action="store_true", help="with --only: update those rows of coverage_<set>.csv")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for coverage_<set>.csv")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(check_one(args.one)))
        return
    sets = ["timm", "torchvision"] if args.set == "both" else [args.set]
    for s in sets:
        picks = {"timm": timm_picks, "torchvision": torchvision_picks, "timm-variants": variant_picks,
                 "timm-sample": sample_picks, "torchvision-video": video_picks,
                 "torchvision-dense": dense_picks}[s]()
        if args.only:
            picks = [p for p in picks if p[0] in args.only or p[1] in args.only]
        suffix = "" if not args.only or args.merge else "_partial"
        run(picks, args.out / f"coverage_{s}{suffix}.csv", args.timeout, merge=args.merge)


if __name__ == "__main__":
    main()
