"""``slim train / eval / export / profile`` for mmdet configs (``.py``), registered under the entry-point group
``slim_plugins.frameworks`` as ``mmdet``. Each command builds mmengine's ``Runner`` (``SlimRunner``) from the
config exactly as mmdet's ``tools/train.py`` / ``tools/test.py`` do, so both paths give the same run.

    slim train configs/mmdet/faster-rcnn_r50_fpn_s-net_coco128.py --epochs 2 --set train_dataloader.batch_size=4
    slim eval work_dirs/faster-rcnn_r50_fpn_s-net_coco128/epoch_12.pth --widths 0.25 1.0
    slim export work_dirs/faster-rcnn_r50_fpn_s-net_coco128/epoch_12.pth --width 0.5
    slim profile work_dirs/faster-rcnn_r50_fpn_s-net_coco128/epoch_12.pth
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from slim_plugins.errors import ConfigError
from slim_plugins.config import parse_overrides
from slim_plugins.spectrum import print_table
from slim_plugins.config import requested_widths as _widths

CONFIG_SUFFIXES = (".py",)


def claims_config(path: str, cfg) -> bool:
    """mmengine configs are Python files."""
    return Path(path).suffix == ".py"


def claims_checkpoint(path: str) -> bool:
    """An mmengine checkpoint (``state_dict`` + ``meta`` holding the config text) of a slimmable detector."""
    try:
        ck = _load(path)
    except Exception:  # truncated, not a torch file, unsafe globals: not ours to claim; the caller reports it
        return False
    if not (isinstance(ck, dict) and "state_dict" in ck):
        return False
    text = str(ck.get("meta", {}).get("cfg", ""))
    return any(s in text for s in ("slimmable", "SlimResNet", "USResNet"))


@functools.lru_cache(maxsize=1)
def _load_cached(path: str, mtime: float):
    return torch.load(path, map_location="cpu", weights_only=True)


def _load(path: str):
    return _load_cached(os.path.abspath(path), os.path.getmtime(path))


def _config(path_or_text: str, from_checkpoint: bool = False):
    from mmengine.config import Config

    if from_checkpoint:
        return Config.fromstring(path_or_text, file_format=".py")
    return Config.fromfile(path_or_text)


def _runner(cfg):
    from mmengine.registry import RUNNERS

    import slim_plugins.integrations.mmdet  # noqa: F401  registers SlimRunner and the model types

    cfg.runner_type = "SlimRunner"
    return RUNNERS.build(cfg)


def _apply_train_args(cfg, args) -> None:
    if args.output:
        cfg.work_dir = args.output
    elif cfg.get("work_dir") is None:  # mmdet tools/train.py's default layout
        cfg.work_dir = os.path.join("./work_dirs", Path(args.config).stem)
    if args.epochs is not None:
        if "max_epochs" not in cfg.train_cfg:
            raise ConfigError("--epochs needs an epoch-based train_cfg; set train_cfg.max_iters with --set")
        cfg.train_cfg.max_epochs = args.epochs
    if args.batch_size is not None:
        cfg.train_dataloader.batch_size = args.batch_size
    if args.lr is not None:
        cfg.optim_wrapper.optimizer.lr = args.lr
    if args.workers is not None:
        for k in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if cfg.get(k):
                cfg[k].num_workers = args.workers
                if args.workers == 0:
                    cfg[k].persistent_workers = False
    if args.seed is not None:
        cfg.randomness = dict(cfg.get("randomness", {}), seed=args.seed)
    if args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.set:
        cfg.merge_from_dict(parse_overrides(args.set))


def cmd_train(args, file_cfg) -> int:
    """``slim train CONFIG.py``: what ``tools/train.py CONFIG.py`` does, with the slimmable runner."""
    if args.default:
        raise ConfigError("--default runs the embedded timm job; give an mmdet config without it")
    if args.onnx:
        raise ConfigError("--onnx is not available for detectors; export a width with `slim export`")
    cfg = _config(args.config)
    _apply_train_args(cfg, args)
    runner = _runner(cfg)
    runner.train()
    return 0


def _from_checkpoint(args):
    ck = _load(args.checkpoint)
    text = ck.get("meta", {}).get("cfg") if getattr(args, "config", None) is None else None
    cfg = _config(text, True) if text else _config(args.config)
    return ck, cfg


def _loaded(args):
    """``(cfg, runner, model, settings, widths)`` of ``args.checkpoint`` loaded into a ``SlimRunner``; the widths
    are ``--widths`` / ``--step`` or the config's eval widths."""
    from .model import slim_settings

    _, cfg = _from_checkpoint(args)
    runner = _runner(cfg)
    runner.load_checkpoint(args.checkpoint)
    settings = slim_settings(runner.model)
    return cfg, runner, runner.model, settings, _widths(args, settings)


def cmd_eval(args) -> int:
    """``slim eval CKPT``: the test loop at every width (``tools/test.py`` with ``SlimRunner``), COCO AP per width,
    the spectrum CSV in the work dir (and at ``--csv``)."""
    from .model import parse_slimmable

    ck, cfg = _from_checkpoint(args)
    cfg.load_from = args.checkpoint
    cfg.work_dir = cfg.get("work_dir") or os.path.dirname(os.path.abspath(args.checkpoint))
    if args.widths or args.step:
        s = dict(cfg.get("slimmable") or {})
        if s:
            spec = parse_slimmable(s)
            s["eval_widths"] = _widths(args, spec)
            cfg.slimmable = s
    if args.calib_samples:
        cfg.slimmable = dict(cfg.get("slimmable") or {}, calib_samples=args.calib_samples)
    if args.batch_size:
        cfg.test_dataloader.batch_size = args.batch_size
    if args.workers is not None:
        cfg.test_dataloader.num_workers = args.workers
    runner = _runner(cfg)
    metrics = runner.test()
    from slim_plugins.spectrum import read_spectrum_csv

    rows = read_spectrum_csv(os.path.join(runner.work_dir, "spectrum.csv"))
    cols = [("width", "width", "{:g}"), ("mflops", "MFLOPs", "{:.0f}"), ("params_m", "params (M)", "{:.2f}")]
    cols += [(k, k, "{:.1f}") for k in rows[0] if k.endswith(("_AP", "_AP50"))]
    print_table(rows, title=f"{args.checkpoint}", columns=cols)
    if args.csv:
        import shutil

        shutil.copyfile(os.path.join(runner.work_dir, "spectrum.csv"), args.csv)
    if args.plot:
        from slim_plugins.spectrum import plot_spectrum

        plot_spectrum([os.path.join(runner.work_dir, "spectrum.csv")], args.plot)
    return 0 if metrics is not None else 1


def cmd_export(args) -> int:
    """``slim export CKPT --width W [--out DIR]``: a plain mmdet config + checkpoint of one width."""
    from .export import export_detector

    if args.onnx or args.fuse_bn:
        raise ConfigError("--onnx / --fuse-bn are not available for detectors (mmdeploy exports mmdet models)")
    ck, cfg = _from_checkpoint(args)
    cfg.load_from = args.checkpoint
    cfg.work_dir = cfg.get("work_dir") or os.path.dirname(os.path.abspath(args.checkpoint))
    runner = _runner(cfg)
    runner.load_checkpoint(args.checkpoint)
    model = runner.model
    from .model import slim_settings

    w = slim_settings(model).spec.validate(args.width)
    if not slim_settings(model).spec.is_switches:
        from .evaluation import calibrate_widths as _calibrate

        _calibrate(runner, model, [w], slim_settings(model))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "exported", f"width_{w:g}")
    res = export_detector(model, cfg, w, out, dataset_meta=ck.get("meta", {}).get("dataset_meta"))
    print(f"wrote {res['config']} and {res['checkpoint']} (width {w:g}: {res['channels']})")
    return 0


def cmd_profile(args) -> int:
    """``slim profile CKPT``: MFLOPs of backbone + FPN at the test size, params and latency per width."""
    import slim_plugins as slim

    from .cost import detector_input_size, width_cost as _cost

    cfg, runner, model, settings, widths = _loaded(args)
    if args.input_size:
        size = args.input_size[-2:] if len(args.input_size) >= 2 else args.input_size * 2
        cfg.test_dataloader.dataset.pipeline = [dict(type="Resize", scale=(max(size), min(size)))]
    h, w_ = detector_input_size(cfg)
    model.eval()
    rows = []
    x = torch.zeros(args.batch_size, 3, h, w_)
    for w in widths:
        row = {"width": w, **_cost(runner, w)}
        if not args.no_latency:
            with slim.width(w), torch.no_grad():
                row["latency_ms"] = slim.measure_latency(lambda: model.extract_feat(x), repeats=args.repeats)
        rows.append(row)
    cols = [("width", "width", "{:g}"), ("mflops", "MFLOPs", "{:.0f}"), ("params_m", "params (M)", "{:.2f}"),
            ("latency_ms", "backbone+FPN ms", "{:.1f}")]
    print_table(rows, title=f"{args.checkpoint} at {h}x{w_}", columns=cols)
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)
    return 0


def cmd_serve(args) -> int:
    """``slim serve CKPT --budget-ms B``: ``inference_detector`` on the first test image (pipeline, model and
    post-processing: the whole call is what the budget covers) under a :class:`~slim_plugins.WidthController`;
    live display, PNG and CSV of latency and width per call."""
    import slim_plugins as slim
    from mmdet.apis import inference_detector
    from slim_plugins.control import serve_command

    from .evaluation import calibrate_widths as _calibrate

    cfg, runner, model, settings, widths = _loaded(args)
    if args.table:
        table = slim.ProfileTable.from_csv(args.table)
        widths = [r.width for r in table]
    if not settings.spec.is_switches:
        _calibrate(runner, model, widths, settings)  # BN post-statistics from the training images
    model.cfg = cfg  # inference_detector builds its test pipeline from model.cfg
    model.eval()
    img = runner.build_dataloader(cfg.test_dataloader).dataset.get_data_info(0)["img_path"]
    call = lambda: inference_detector(model, img)  # noqa: E731
    if not args.table:
        print(f"profiling widths {[f'{w:g}' for w in widths]}: inference_detector on {img}")
        table = {}
        for w in widths:
            with slim.width(w):
                table[w] = slim.measure_latency(call, warmup=1, repeats=5)
    ctl = slim.WidthController(model, args.budget_ms, table, percentile=args.percentile, fn=call)
    serve_command(ctl, lambda i: (), args.calls, live=not args.no_live, csv_path=args.csv, plot_path=args.plot)
    return 0
