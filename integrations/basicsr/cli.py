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

from slim_plugins.adapter import OpenedCheckpoint
from slim_plugins.errors import ConfigError
from slim_plugins.config import parse_overrides

CONFIG_SUFFIXES = (".yml", ".yaml")


def claims_config(path: str, cfg) -> bool:
    """A BasicSR options file: a mapping with ``model_type`` and ``network_g``."""
    return isinstance(cfg, dict) and "model_type" in cfg and "network_g" in cfg


def _check_resume_state(path: str) -> None:
    """Raises CheckpointError: ``path`` is not a BasicSR training state (``experiments/<name>/training_states/
    <iter>.state``: ``iter``, ``epoch``, ``optimizers``, ``schedulers``)."""
    import torch

    from slim_plugins.errors import CheckpointError

    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # optimizer states: the user's own file
    except Exception as e:  # noqa: BLE001  not a torch file at all
        raise CheckpointError(f"--resume {path!r} is not a BasicSR training state ({type(e).__name__})") from None
    if not (isinstance(state, dict) and {"iter", "epoch", "optimizers"} <= set(state)):
        raise CheckpointError(f"--resume {path!r} is not a BasicSR training state (give experiments/<name>/"
                              "training_states/<iter>.state)")


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
        _check_resume_state(args.resume)
        o["path.resume_state"] = os.path.abspath(args.resume)
    o.update(parse_overrides(args.set))
    return o


def cmd_train(args, file_cfg) -> int:
    """``slim train OPTIONS.yml``: BasicSR's ``train_pipeline`` with the slim types registered. ``--epochs`` does
    not apply (BasicSR counts iterations: ``--set train.total_iter=N``)."""
    from .train import run_pipeline

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
    from .stock import convert_kwargs

    net = build_network(dict(opt["network_g"]))
    net = slim.convert(net, settings.spec, **convert_kwargs(opt["network_g"], net))
    ck = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    net.load_state_dict(ck.get("params_ema", ck["params"]))
    device = getattr(args, "device", None) or "cpu"
    return opt, net.to(device).eval(), settings


def _n(opt, settings, w) -> int:
    """The body width (``num_feat``, SwinIR's ``embed_dim``, ...) at width ``w``."""
    from .stock import base_width

    base = base_width(opt["network_g"])
    return settings.spec.channels(base[1] if base else 64, w)


#: The options each verb reads (the adapter protocol, :mod:`slim_plugins.adapter`); the core refuses the others.
HONOURS = {
    "train": {"config", "resume", "output", "batch_size", "lr", "workers", "seed", "device", "set"},
    "eval": {"device", "config", "data_dir"},
    "calibrate": set(),
    "export": {"onnx", "device", "config"},
    "profile": {"input_size", "batch_size", "device", "config"},
    "serve": {"input_size", "batch_size", "device", "config"},
}
REFUSALS = {"default": "--default runs the embedded timm job", "epochs": "BasicSR counts iterations: "
            "--set train.total_iter=N", "data_dir": "the options' datasets.*.dataroot_* name the training data",
            "onnx": "export a width with `slim export --onnx`", "fuse_bn": "WDSR has no BatchNorm",
            "calib_samples": "WDSR has no BatchNorm", "no_calibrate": "WDSR has no BatchNorm",
            "batch_size": "BasicSR validates one image at a time", "workers": "BasicSR validates one image at a time"}
NOT_APPLICABLE = {"calibrate": "the generator has no BatchNorm (weight normalisation keeps no statistics)"}


class SRCheckpoint(OpenedCheckpoint):
    """A ``SlimSRModel`` generator checkpoint (EMA weights when present) with the experiment's options."""

    framework = "basicsr"
    cost_columns = (("width", "width", "{:g}"), ("n", "n", "{}"), ("mflops", "MFLOPs", "{:.0f}"),
                    ("params_m", "params (M)", "{:.3f}"))

    def __init__(self, args, opt, net, settings):
        exp = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint)))
        super().__init__(args.checkpoint, net, settings.spec, settings.eval_widths, args.checkpoint, exp,
                         next(net.parameters()).device)
        self.opt, self.settings = opt, settings
        self.input_size = (3, *settings.flops_lq_size)
        self.default_eval_csv = os.path.join(exp, "spectrum.csv")

    def example_input(self, batch_size, input_size=None):
        import torch

        g = torch.Generator().manual_seed(0)
        return (torch.rand(batch_size, *self.resolve_input_size(input_size), generator=g).to(self.device),)

    def costs(self, widths, inputs):
        rows = super().costs(widths, inputs)
        return [{"width": r["width"], "n": _n(self.opt, self.settings, r["width"]), "mflops": r["mflops"],
                 "params_m": r["params_m"]} for r in rows]

    def evaluate(self, widths, args):
        """PSNR / SSIM (the options' ``val.metrics``: crop border, Y channel) on every ``val*`` / ``test*`` dataset
        of the options, or on ``--data-dir`` (:func:`user_eval_set`); the bicubic baseline of each set is printed
        beside it. MFLOPs at the options' ``flops_lq_size`` LR input."""
        from basicsr.data import build_dataloader, build_dataset

        from .model import evaluate_widths

        opt = self.opt
        metrics = (opt.get("val") or {}).get("metrics")
        if not metrics:
            raise ConfigError("the options have no val.metrics to evaluate (e.g. psnr: {type: calculate_psnr, ...})")
        rows = {c["width"]: c for c in self.costs(widths, self.example_input(1))}
        sets = user_eval_set(args.data_dir, int(opt["scale"])) if args.data_dir else \
            [d for phase, d in opt["datasets"].items() if phase.startswith(("val", "test"))]
        for d in sets:
            d = dict(d, phase="val", scale=opt["scale"])
            loader = build_dataloader(build_dataset(d), d, num_gpu=0, dist=False)
            for w, vals in evaluate_widths(self.model, loader, widths, metrics, self.device).items():
                rows[w].update({f"{d['name']}/{m}": v for m, v in vals.items()})
            base = evaluate_widths(_Bicubic(int(opt["scale"])), loader, [None], metrics, "cpu")[None]
            print(f"bicubic on {d['name']} (the same images and metric settings): "
                  + ", ".join(f"{m} {v:.4f}" for m, v in base.items()))
        rows = [rows[w] for w in sorted(rows)]
        keys = [k for k in rows[0] if "/" in k]
        self.metric_columns = [(k, k, "{:.2f}" if k.endswith("psnr") else "{:.4f}") for k in keys]
        self.title = f"{self.path} (MFLOPs at a {self.input_size[1]}x{self.input_size[2]} LR input)"
        return [{k: v for k, v in r.items() if k != "n"} for r in rows]

    def default_export_path(self, width, fuse_bn):
        return os.path.join(self.run_dir, "exported", f"net_g_n{_n(self.opt, self.settings, width)}.pth")

    def export(self, w, out, onnx, fuse_bn):
        """The plain network of width ``w`` (WDSR stays weight-normed) as a BasicSR checkpoint (``{'params': ...}``)
        plus BasicSR test options for it (``basicsr/test.py -opt``): ``network_g`` is the stock arch at that width
        (``num_feat = n``; RRDBNet also ``num_grow_ch``, SwinIR ``embed_dim`` and ``num_heads``), checked to load
        the weights with ``strict=True`` before anything is written (:func:`.stock.stock_network_g`)."""
        import torch
        import yaml

        import slim_plugins as slim
        from slim_plugins.checkpoint import atomic_write

        from .stock import stock_network_g

        opt, n = self.opt, _n(self.opt, self.settings, w)
        x = torch.zeros(1, *self.input_size)
        plain = slim.export(self.model.cpu(), w, example_input=x)
        net_g = stock_network_g(opt["network_g"], plain.state_dict())  # CheckpointError before anything is written
        test_opt = {"name": f"{opt.get('name', 'wdsr')}_n{n}", "model_type": "SRModel", "scale": opt["scale"],
                    "num_gpu": "auto", "manual_seed": opt.get("manual_seed", 0),
                    "datasets": {f"test_{i + 1}": d for i, d in
                                 enumerate(v for k, v in opt["datasets"].items() if k.startswith(("val", "test")))},
                    "network_g": net_g,
                    "path": {"pretrain_network_g": os.path.abspath(out), "strict_load_g": True,
                             "param_key_g": "params"},
                    "val": {"save_img": True, "suffix": None, "metrics": (opt.get("val") or {}).get("metrics")}}
        opts_path = os.path.splitext(out)[0] + "_test.yml"
        atomic_write(out, lambda f: torch.save({"params": plain.state_dict()}, f))
        atomic_write(opts_path, lambda f: yaml.safe_dump(test_opt, f, sort_keys=False), mode="w")
        paths = [out, opts_path]
        if onnx:
            paths.append(slim.export_onnx(plain, x, os.path.splitext(out)[0] + ".onnx", dynamic_hw=True))
        print(f"width {w:g}: " + ", ".join(f"{k} {v}" for k, v in net_g.items()
                                           if v != opt["network_g"].get(k) and k != "type"))
        return paths


def user_eval_set(folder: str, scale: int) -> list[dict]:
    """BasicSR dataset options for ``slim eval --data-dir FOLDER``: ``FOLDER/HR`` with ``FOLDER/LR_bicubic/X<scale>``
    (the Set5 / Set14 layout: a ``PairedImageDataset``), else a folder of HR images whose LR inputs are their MATLAB
    bicubic downscale (``BicubicHRDataset``, BasicSR's ``imresize``).

    Raises:
        ConfigError: no image in the folder.
    """
    from basicsr.data.data_util import paths_from_folder

    name = os.path.basename(os.path.normpath(folder))
    hr, lr = os.path.join(folder, "HR"), os.path.join(folder, "LR_bicubic", f"X{scale}")
    if os.path.isdir(hr) and os.path.isdir(lr):
        stems = {os.path.splitext(os.path.basename(p))[0] for p in paths_from_folder(lr)}
        first = os.path.splitext(os.path.basename(sorted(paths_from_folder(hr))[0]))[0]
        tmpl = f"{{}}x{scale}" if f"{first}x{scale}" in stems else "{}"  # DIV2K / Set5 name LR files <name>x2
        return [{"name": name, "type": "PairedImageDataset", "dataroot_gt": hr, "dataroot_lq": lr,
                 "filename_tmpl": tmpl, "io_backend": {"type": "disk"}}]
    if not list(paths_from_folder(folder)):
        raise ConfigError(f"--data-dir {folder!r} holds no images (give a folder of HR images, or one with HR/ and "
                          f"LR_bicubic/X{scale}/)")
    return [{"name": name, "type": "BicubicHRDataset", "dataroot_gt": folder, "io_backend": {"type": "disk"}}]


class _Bicubic:
    """The baseline: MATLAB bicubic upscaling of the LR input (BasicSR's ``imresize``), as a callable net."""

    def __init__(self, scale: int):
        self.scale = scale

    def eval(self):
        return self

    def __call__(self, lq):
        import numpy as np
        import torch
        from basicsr.utils.matlab_functions import imresize

        img = lq[0].permute(1, 2, 0).cpu().numpy().astype(np.float64)
        up = np.clip(imresize(img, self.scale), 0, 1).astype(np.float32)
        return torch.from_numpy(up).permute(2, 0, 1)[None]


def open_checkpoint(args) -> SRCheckpoint:
    """The adapter protocol's loader: the generator of ``args.checkpoint`` with the experiment's options."""
    return SRCheckpoint(args, *_loaded(args))
