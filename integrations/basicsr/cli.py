"""``slim train / eval / export / profile / serve`` for BasicSR options YAMLs (entry-point group ``slim_plugins.frameworks``,
name ``basicsr``)::

    slim train configs/basicsr/us_wdsr_x2_sr.yml --set train.total_iter=100 --output experiments/try
    slim eval experiments/try/models/net_g_latest.pth --widths 0.5 0.75 1.0
    slim export experiments/try/models/net_g_latest.pth --width 0.5       # plain WDSR(num_feat=32) + test options
    slim profile experiments/try/models/net_g_latest.pth --input-size 48 48
    slim serve experiments/try/models/net_g_latest.pth --budget-ms 40 --input-size 64 64

``train`` runs BasicSR's own ``train_pipeline`` (as ``python -m slim_plugins.integrations.basicsr.train -opt ...``);
the others read the options file BasicSR copied into the experiment folder (or ``--config``).
"""
from __future__ import annotations

import os

from slim_plugins.errors import ConfigError
from slim_plugins.config import parse_overrides
from slim_plugins.config import requested_widths as _widths

CONFIG_SUFFIXES = (".yml", ".yaml")


def claims_config(path: str, cfg) -> bool:
    """A BasicSR options file: a mapping with ``model_type`` and ``network_g``."""
    return isinstance(cfg, dict) and "model_type" in cfg and "network_g" in cfg


def _train_overrides(args) -> dict:
    o = {}
    if args.output:
        out = os.path.abspath(args.output)
        o["name"], o["path.experiments_root"] = os.path.basename(out), os.path.dirname(out)
    if args.batch_size is not None:
        o["datasets.train.batch_size_per_gpu"] = args.batch_size
    if args.lr is not None:
        o["train.optim_g.lr"] = args.lr
    if args.workers is not None:
        o["datasets.train.num_worker_per_gpu"] = args.workers
    if args.seed is not None:
        o["manual_seed"] = args.seed
    if args.device is not None:
        if args.device != "cpu" and not args.device.startswith("cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {args.device!r}")
        o["num_gpu"] = 0 if args.device == "cpu" else "auto"
    if args.resume:
        o["path.resume_state"] = os.path.abspath(args.resume)
    o.update(parse_overrides(args.set))
    return o


def cmd_train(args, file_cfg) -> int:
    """``slim train OPTIONS.yml``: BasicSR's ``train_pipeline`` with the slim types registered. ``--epochs`` does
    not apply (BasicSR counts iterations: ``--set train.total_iter=N``)."""
    from .train import run_pipeline

    if args.default:
        raise ConfigError("--default runs the embedded timm job; give a BasicSR options file without it")
    for flag in ("epochs", "data_dir", "onnx"):
        if getattr(args, flag, None):
            raise ConfigError(f"--{flag.replace('_', '-')} does not apply to BasicSR options; BasicSR counts "
                              "iterations (--set train.total_iter=N) and takes data roots from datasets.*.dataroot_*")
    run_pipeline(args.config, overrides=_train_overrides(args))
    return 0


# ---- eval / export / profile on a BasicSR checkpoint ----------------------------------------------------------
def _options_next_to(ckpt: str) -> str | None:
    """The options file BasicSR copied into the experiment folder (``<exp>/models/net_g_X.pth`` -> ``<exp>/*.yml``)."""
    exp = os.path.dirname(os.path.dirname(os.path.abspath(ckpt)))
    ymls = sorted(f for f in os.listdir(exp) if f.endswith((".yml", ".yaml"))) if os.path.isdir(exp) else []
    return os.path.join(exp, ymls[0]) if len(ymls) == 1 else None


def claims_checkpoint(path: str) -> bool:
    """A BasicSR generator checkpoint (``{'params': ..., ['params_ema': ...]}``) of a ``SlimSRModel`` experiment."""
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file / not ours: the dispatcher reports the checkpoint error
        return False
    opts = _options_next_to(path)
    if not (isinstance(ck, dict) and "params" in ck and opts):
        return False
    from slim_plugins.config import load_yaml_config

    try:
        return load_yaml_config(opts).get("model_type") == "SlimSRModel"
    except Exception:
        return False


def _loaded(args):
    """``(opt, net, settings)``: the options (``--config`` or the experiment's copy), the converted generator with
    the checkpoint's EMA weights (``params`` when it has none), its :class:`SRSlimSettings`."""
    import torch
    from basicsr.archs import build_network

    import slim_plugins as slim
    import slim_plugins.integrations.basicsr  # noqa: F401  registers WDSR
    from slim_plugins.config import load_yaml_config

    from .model import parse_slimmable

    path = getattr(args, "config", None) or _options_next_to(args.checkpoint)
    if path is None:
        raise ConfigError(f"no options file next to {args.checkpoint!r} (expected one .yml in the experiment "
                          "folder above models/); give it with --config")
    opt = load_yaml_config(path)
    if not opt.get("slimmable"):
        raise ConfigError(f"{path!r} has no `slimmable` block: not a slimmable BasicSR experiment")
    settings = parse_slimmable(opt["slimmable"], seed=int(opt.get("manual_seed") or 0))
    net = slim.convert(build_network(dict(opt["network_g"])), settings.spec)
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(ck.get("params_ema", ck["params"]))
    device = getattr(args, "device", None) or "cpu"
    return opt, net.to(device).eval(), settings


def _n(opt, settings, w) -> int:
    return settings.spec.channels(int(opt["network_g"].get("num_feat", 64)), w)


def cmd_eval(args) -> int:
    """``slim eval CKPT``: PSNR / SSIM (the options' ``val.metrics``) on every ``val*`` dataset of the options at
    each width; rich table, spectrum CSV (``--csv``, default ``<exp>/spectrum.csv``) and plot (``--plot``)."""
    import torch
    from basicsr.data import build_dataloader, build_dataset

    import slim_plugins as slim
    from slim_plugins.spectrum import plot_spectrum, print_table, write_spectrum_csv

    from .model import evaluate_widths

    opt, net, settings = _loaded(args)
    widths = _widths(args, settings)
    metrics = (opt.get("val") or {}).get("metrics")
    if not metrics:
        raise ConfigError("the options have no val.metrics to evaluate (e.g. psnr: {type: calculate_psnr, ...})")
    device = next(net.parameters()).device
    x = torch.zeros(1, 3, *settings.flops_lq_size, device=device)
    rows = {r.width: {"width": r.width, "n": _n(opt, settings, r.width), "mflops": r.mflops, "params_m": r.params_m}
            for r in slim.profile(net, x, widths=widths, latency=False)}
    for phase, d in opt["datasets"].items():
        if not phase.startswith(("val", "test")):
            continue
        d = dict(d, phase="val", scale=opt["scale"])
        loader = build_dataloader(build_dataset(d), d, num_gpu=0, dist=False)
        for w, vals in evaluate_widths(net, loader, widths, metrics, device).items():
            rows[w].update({f"{d['name']}/{m}": v for m, v in vals.items()})
    rows = [rows[w] for w in sorted(rows)]
    cols = [("width", "width", "{:g}"), ("n", "n", "{}"), ("mflops", "MFLOPs", "{:.0f}"),
            ("params_m", "params (M)", "{:.3f}")]
    cols += [(k, k, "{:.2f}" if k.endswith("psnr") else "{:.4f}") for k in rows[0] if "/" in k]
    print_table(rows, title=f"{args.checkpoint} (MFLOPs at a {x.shape[2]}x{x.shape[3]} LR input)", columns=cols)
    out = args.csv or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))),
                                   "spectrum.csv")
    write_spectrum_csv([{k: v for k, v in r.items() if k != "n"} for r in rows], out)
    if args.plot:
        plot_spectrum([out], args.plot)
    return 0


def cmd_export(args) -> int:
    """``slim export CKPT --width W``: the plain weight-normed network of that width as a BasicSR checkpoint
    (``{'params': ...}``, loadable by the stock arch with ``num_feat = n``) plus BasicSR test options for it
    (``basicsr/test.py -opt``); ``--onnx`` also writes the ONNX graph. Files are written atomically."""
    import torch
    import yaml

    import slim_plugins as slim
    from slim_plugins.checkpoint import atomic_write

    if args.fuse_bn:
        raise ConfigError("--fuse-bn does not apply: WDSR has no BN (weight normalisation stays in the export)")
    opt, net, settings = _loaded(args)
    w = settings.spec.validate(args.width)
    n = _n(opt, settings, w)
    x = torch.zeros(1, 3, *settings.flops_lq_size)
    plain = slim.export(net.cpu(), w, example_input=x)
    exp = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint)))
    out = args.out or os.path.join(exp, "exported", f"net_g_n{n}.pth")
    atomic_write(out, lambda f: torch.save({"params": plain.state_dict()}, f))
    net_g = dict(opt["network_g"])
    if "num_feat" in net_g:
        net_g["num_feat"] = n
    test_opt = {"name": f"{opt.get('name', 'wdsr')}_n{n}", "model_type": "SRModel", "scale": opt["scale"],
                "num_gpu": "auto", "manual_seed": opt.get("manual_seed", 0),
                "datasets": {f"test_{i + 1}": d for i, d in
                             enumerate(v for k, v in opt["datasets"].items() if k.startswith(("val", "test")))},
                "network_g": net_g,
                "path": {"pretrain_network_g": os.path.abspath(out), "strict_load_g": True, "param_key_g": "params"},
                "val": {"save_img": True, "suffix": None, "metrics": (opt.get("val") or {}).get("metrics")}}
    opts_path = os.path.splitext(out)[0] + "_test.yml"
    atomic_write(opts_path, lambda f: yaml.safe_dump(test_opt, f, sort_keys=False), mode="w")
    msg = f"wrote {out} and {opts_path} (width {w:g}: num_feat {n})"
    if args.onnx:
        onnx = slim.export_onnx(plain, x, os.path.splitext(out)[0] + ".onnx", dynamic_hw=True)  # any image size
        msg += f" and {onnx}"
    print(msg)
    return 0


def cmd_profile(args) -> int:
    """``slim profile CKPT [--input-size H W]``: MFLOPs (multiply-adds), params and latency per width for an LR
    input of ``H x W`` (default the options' ``flops_lq_size``, 48x48 as US-Nets Fig. 4); ``--csv`` writes it."""
    import torch

    import slim_plugins as slim
    from slim_plugins.spectrum import print_table

    opt, net, settings = _loaded(args)
    size = tuple(args.input_size[-2:]) if args.input_size else settings.flops_lq_size
    if len(size) == 1:
        size = (size[0], size[0])
    x = torch.zeros(args.batch_size, 3, *size, device=next(net.parameters()).device)
    table = slim.profile(net, x, widths=_widths(args, settings), latency=not args.no_latency, repeats=args.repeats)
    rows = [{"width": r.width, "n": _n(opt, settings, r.width), "mflops": r.mflops, "params_m": r.params_m,
             "latency_ms": r.latency_ms} for r in table]
    print_table(rows, title=f"{args.checkpoint} at {size[0]}x{size[1]} LR, batch {args.batch_size}",
                columns=[("width", "width", "{:g}"), ("n", "n", "{}"), ("mflops", "MFLOPs", "{:.0f}"),
                         ("params_m", "params (M)", "{:.3f}"), ("latency_ms", "ms", "{:.1f}")])
    if args.csv:
        table.to_csv(args.csv)  # the format `slim serve --table` reads
    return 0


def cmd_serve(args) -> int:
    """``slim serve CKPT --budget-ms B``: super-resolve an LR input of ``--input-size H W`` (default the options'
    ``flops_lq_size``) call after call under a :class:`~slim_plugins.WidthController` that picks the widest width
    whose latency fits the budget; live display, PNG and CSV of latency and width per call."""
    import torch

    import slim_plugins as slim
    from slim_plugins.control import serve_command

    opt, net, settings = _loaded(args)
    widths = _widths(args, settings)
    size = tuple(args.input_size[-2:]) if args.input_size else settings.flops_lq_size
    if len(size) == 1:
        size = (size[0], size[0])
    x = torch.rand(args.batch_size, 3, *size, device=next(net.parameters()).device)

    @torch.no_grad()
    def call():
        return net(x)

    if args.table:
        table = slim.ProfileTable.from_csv(args.table)
    else:
        print(f"profiling widths {[f'{w:g}' for w in widths]} on a {size[0]}x{size[1]} LR input")
        table = slim.profile(net, x, widths=widths, repeats=5)
    ctl = slim.WidthController(net, args.budget_ms, table, percentile=args.percentile, fn=call)
    serve_command(ctl, lambda i: (), args.calls, live=not args.no_live, csv_path=args.csv, plot_path=args.plot)
    return 0
