"""The timm trainer behind ``slim train``: timm's ``train.py`` with a multi-width step.

Laid out like timm's ``train.py`` (``main`` -> :func:`train`, :func:`train_one_epoch`, :func:`validate`) and built
on timm's library pieces: ``timm.create_model``, ``timm.data`` (``create_dataset``, ``create_loader``, ``Mixup``,
``resolve_data_config``), ``timm.loss``, ``timm.optim.create_optimizer_v2`` / ``optimizer_kwargs``,
``timm.scheduler.create_scheduler_v2`` / ``scheduler_kwargs``, ``timm.utils`` (``CheckpointSaver``, ``ModelEmaV3``,
``NativeScaler``, ``init_distributed_device_so``, ``distribute_bn``, ``update_summary``, ``random_seed``). Ours:
the model is converted (:func:`slim_plugins.convert`, in ``model.py``); each optimizer step trains several widths
(:class:`slim_plugins.MultiWidthStep`: every switch for S-Nets, Slimmable Networks Sec. 3.3; sandwich rule and
inplace distillation for US-Nets, US-Nets Sec. 4); evaluation runs per width; after training, BN post-statistics
(:func:`slim_plugins.calibrate_bn`, US-Nets Sec. 3.2), the FLOPs-accuracy spectrum and the export of plain models.

Run directory (``output``), timm's layout plus the width outputs::

    args.yaml / config.yaml   resolved config       last.pth.tar, checkpoint-<epoch>.pth.tar, model_best.pth.tar
    summary.csv               per epoch: train_loss, eval_<metric>_w<width> (+ eval_ema_...), lr
    spectrum.csv / .png       width, mflops, params_m, top1, top5 (after calibration; spectrum_ema.csv with EMA)
    exported/                 width_<w>.pth (+ .onnx): plain timm models       tb/: TensorBoard per width

Config keys: ``config.DEFAULTS`` (timm's 172 ``train.py`` arguments + the slimmable keys). DDP: ``torchrun
--nproc_per_node N -m slim_plugins.cli train CONFIG``; only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import functools
import os
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console  # at import: rich draws from `random` when first imported, not after seeding
from torch import nn

import slim_plugins as slim
from slim_plugins.errors import ConfigError

from slim_plugins.config import expand_env
from slim_plugins.spectrum import print_table
from .model import build_model, create_loss
from .utils import checkpoint_saver, distribute_bn, rng_state, set_rng_state
from .config import DEFAULTS, DIGITS_JOB, config_widths, resolve_config, resolve_widths
from .data import _data_config, build_datasets, make_loader, subset_indices
from .outputs import to_input as _to_input, write_spectrum, write_yaml

__all__ = ["DEFAULTS", "DIGITS_JOB", "resolve_config", "build_model", "build_datasets", "make_loader",
           "resolve_widths", "train", "train_one_epoch", "validate", "TrainHooks"]


# ---- one epoch, validation -------------------------------------------------------------------------------------
class TrainHooks:
    """Extension points for experiments (override what you need; ``run`` is the trainer's state: cfg, model,
    device, epoch, num_updates, updates_per_epoch, tracked_widths, output, main, validate).

    ``keep_outputs = True`` keeps each width's detached output in ``result.outputs`` for :meth:`after_update`.
    """

    keep_outputs = False

    def after_update(self, run, result, target) -> None:
        """After each optimizer step; ``result`` is the last micro-batch's :class:`slim_plugins.StepResult`."""

    def epoch_metrics(self, run) -> dict:
        """Extra ``train_<key>`` columns of this epoch's summary.csv row."""
        return {}


@contextlib.contextmanager
def _default_width(module, w):
    """The model's default width set too: timm's gradient checkpointing recomputes in backward, which may run on
    an autograd worker thread that does not see the ``slim.width`` context."""
    old = slim.get_width(module)
    slim.set_width(module, w)
    try:
        yield
    finally:
        slim.set_width(module, old)


def calibration_line(used: dict, what: str, n: int, seconds: float) -> str:
    """The log line after ``calibrate_bn`` (which returns 0 samples per width for a model without BN layers)."""
    if not any(used.values()):
        return "no BN layers (LayerNorm / GroupNorm / RMSNorm keep no running statistics): no post-statistics"
    return f"calibrated BN post-statistics{what} on {n} training images ({seconds:.1f}s)"


def _opt_step(cfg, model, optimizer, loss_scaler):
    if loss_scaler is not None:  # NativeScaler steps inside its call; our backward passes ran per width before
        loss_scaler._scaler.unscale_(optimizer)
    if cfg["clip_grad"] is not None:
        from timm.models import model_parameters
        from timm.utils import dispatch_clip_grad

        params = model_parameters(getattr(model, "module", model), exclude_head="agc" in cfg["clip_mode"])
        dispatch_clip_grad(params, cfg["clip_grad"], mode=cfg["clip_mode"])
    if loss_scaler is not None:
        loss_scaler._scaler.step(optimizer)
        loss_scaler._scaler.update()
    else:
        optimizer.step()


def train_one_epoch(epoch, model, loader, optimizer, cfg, step: slim.MultiWidthStep, device, lr_scheduler=None,
                    saver=None, amp_autocast=contextlib.nullcontext, loss_scaler=None, mixup_fn=None,
                    model_ema=None, hooks: Sequence[TrainHooks] = (), run=None, log=print) -> OrderedDict:
    """One epoch as timm's ``train_one_epoch``; each micro-batch runs the step's widths (one width schedule per
    optimizer step: every micro-batch of ``grad_accum_steps`` trains the same widths, each loss divided by the
    number of micro-batches). Returns ``{"loss": mean summed-over-widths loss, "loss_w<width>": ...}``."""
    if cfg["mixup_off_epoch"] and epoch >= cfg["mixup_off_epoch"] and mixup_fn is not None:
        mixup_fn.mixup_enabled = False
    criterion = run.criterion
    module = getattr(model, "module", model)
    accum = cfg["grad_accum_steps"]
    updates_per_epoch = (len(loader) + accum - 1) // accum
    num_updates = epoch * updates_per_epoch
    last_accum = len(loader) % accum or accum
    loss_sum, loss_n, width_losses = 0.0, 0, {}
    keep = any(h.keep_outputs for h in hooks)
    second_order = getattr(optimizer, "is_second_order", False)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    t0 = time.time()
    for batch_idx, (x, y) in enumerate(loader):
        update_idx = batch_idx // accum
        n_micro = last_accum if update_idx == updates_per_epoch - 1 else accum
        need_update = batch_idx == len(loader) - 1 or (batch_idx + 1) % accum == 0
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup_fn is not None:
            x, y = mixup_fn(x, y)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        sync = contextlib.nullcontext() if need_update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            for p in step.iterate(num_updates, keep_outputs=keep):  # the same widths for every micro-batch
                with p, (_default_width(module, p.width) if cfg["grad_checkpointing"] else contextlib.nullcontext()):
                    with amp_autocast():
                        out = model(x)
                    loss = p.loss(out.float(), lambda o: criterion(o, y)) / n_micro
                    (loss_scaler._scaler.scale(loss) if loss_scaler is not None else loss).backward(
                        create_graph=second_order)
        res = step.last
        step_loss, *per_width = torch.stack([res.loss, *res.losses.values()]).tolist()  # one host sync per step
        per_width = dict(zip(res.losses, per_width))
        loss_sum, loss_n = loss_sum + step_loss * len(x), loss_n + len(x)  # mean over samples
        for w, v in per_width.items():
            width_losses.setdefault(w, []).append(v)
        if not need_update:
            continue
        _opt_step(cfg, model, optimizer, loss_scaler)
        optimizer.zero_grad(set_to_none=True)
        num_updates += 1
        if model_ema is not None:
            model_ema.update(module, step=num_updates)
        if cfg["synchronize_step"] and device.type == "cuda":
            torch.cuda.synchronize()
        run.num_updates = num_updates
        if lr_scheduler is not None:
            lr_scheduler.step_update(num_updates=num_updates, metric=loss_sum / loss_n)
        for h in hooks:
            h.after_update(run, res, y)
        if saver is not None and cfg["recovery_interval"] and (update_idx + 1) % cfg["recovery_interval"] == 0:
            saver.save_recovery(epoch, batch_idx=update_idx)
        if run.main and (update_idx % cfg["log_interval"] == 0 or batch_idx == len(loader) - 1):
            lr = np.mean([g["lr"] for g in optimizer.param_groups])
            log(f"Train: {epoch} [{update_idx:>4d}/{updates_per_epoch}]  Loss: {step_loss:#.3g} "
                f"({loss_sum / loss_n:#.3g})  {(time.time() - t0) / (update_idx + 1):.3f}s/update  LR: {lr:.3e}")
            if run.writer is not None:
                run.writer.add_scalar("train/loss_sum", step_loss, num_updates)
                for w, v in per_width.items():
                    run.writer.add_scalar(f"train/loss_w{w:g}", v, num_updates)
            if cfg["save_images"] and run.output:
                import torchvision

                torchvision.utils.save_image(x, os.path.join(run.output, f"train-batch-{batch_idx}.jpg"), padding=0,
                                             normalize=True)
    if hasattr(optimizer, "sync_lookahead"):
        optimizer.sync_lookahead()
    metrics = [loss_sum / max(loss_n, 1)] + [float(np.mean(width_losses.get(w, [np.nan])))
                                             for w in run.tracked_widths]
    if run.distributed:
        t = torch.tensor(metrics, dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        metrics = (t / dist.get_world_size()).tolist()
    return OrderedDict([("loss", metrics[0]), *((f"loss_w{w:g}", v) for w, v in zip(run.tracked_widths,
                                                                                     metrics[1:]))])


@torch.no_grad()
def validate(model, loader, widths: Sequence[float], device, channels_last: bool = False,
             amp_autocast=contextlib.nullcontext, distributed: bool = False) -> dict:
    """timm's ``validate`` at each width (every batch runs every width: one pass over the data). Under DDP each
    rank evaluates its shard and the sums are all-reduced.

    Returns:
        ``{width: {"loss": cross-entropy, "top1": %, "top5": %, "n": samples}}``.
    Raises:
        UncalibratedWidthError: a US-Net width without BN statistics. EmptyLoaderError: no samples.
    """
    was = model.training
    model.eval()
    sums = torch.zeros(len(widths), 3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    n = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for x, y in loader:
            x, y = _to_input(x, device, {"channels_last": channels_last}), y.to(device, non_blocking=True)
            for i, w in enumerate(widths):
                with slim.width(w), amp_autocast():
                    out = model(x).float()
                hit = out.topk(min(5, out.shape[-1]), dim=-1).indices.eq(y[:, None])
                sums[i] += torch.stack([nn.functional.cross_entropy(out, y, reduction="sum"), hit[:, 0].sum(),
                                        hit.any(-1).sum()]).double()  # no host sync per batch
            n += len(y)
    finally:
        model.train(was)
    if distributed:
        t = torch.cat([sums.flatten(), n[None]])
        dist.all_reduce(t)
        sums, n = t[:-1].view(len(widths), 3), t[-1]
    sums, n = sums.cpu(), int(n)
    if n == 0:
        raise slim.EmptyLoaderError("the evaluation loader yielded no samples")
    return {w: {"loss": float(s[0]) / n, "top1": 100.0 * float(s[1]) / n, "top5": 100.0 * float(s[2]) / n, "n": n}
            for w, s in zip(widths, sums)}


# ---- main ------------------------------------------------------------------------------------------------------
def _resolve_device(spec: str) -> str:
    if spec in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available; use device: cpu or auto")
    return spec


def train(user_cfg: dict | None = None, overrides: dict | None = None, resume: str | dict | None = None,
          default: bool = False, hooks: Sequence[TrainHooks] = (), datasets_fn=None) -> dict:
    """Train a slimmable timm classifier, then calibrate, evaluate, profile and export every requested width.

    Args:
        user_cfg: config keys (a YAML file's contents, e.g. timm's ``args.yaml`` + slimmable keys).
        overrides: keys applied on top (command-line flags / ``--set``).
        resume: a checkpoint path or payload (timm's ``resume`` key works too): model, optimizer, scheduler, EMA,
            loss scaler, width schedule and RNG states are restored, so the run continues as if never interrupted
            (exactly, with ``workers: 0`` on CPU). Without ``user_cfg`` the checkpoint's own config is used.
        default: start from :data:`DIGITS_JOB` (the embedded scikit-learn digits job).
        hooks, datasets_fn: for experiments: :class:`TrainHooks`, and ``datasets_fn(cfg, splits, log)`` instead of
            :func:`~slim_plugins.integrations.timm.data.build_datasets`.

    Returns:
        ``{"output", "checkpoint", "rows": [{width, mflops, params_m, top1, top5}], "rows_ema", ...}`` (rank 0;
        other ranks get the keys without files).

    Raises:
        ConfigError: bad config. WidthSpecMismatchError: ``resume`` holds another width spec (nothing written).
        FileNotFoundError: missing data.
    """
    from timm.utils.distributed import init_distributed_device_so

    t_start = time.time()
    resume = resume or (user_cfg or {}).get("resume") or (overrides or {}).get("resume") or None
    ck = None
    if isinstance(resume, (str, os.PathLike)):
        resume = str(Path(expand_env(str(resume))).resolve())
    if resume is not None:
        ck = slim.read_checkpoint(resume) if isinstance(resume, (str, os.PathLike)) else resume
        if user_cfg is None and not default:
            user_cfg = ck.get("config")
            if isinstance(resume, (str, os.PathLike)) and "output" not in (overrides or {}):
                overrides = {**(overrides or {}), "output": str(Path(resume).resolve().parent)}
    cfg = resolve_config(user_cfg, overrides, default=default or (user_cfg is None and resume is None))
    cfg["resume"] = ""
    if cfg["num_threads"] is not None and cfg["num_threads"] < 1:
        raise ConfigError(f"num_threads must be a positive integer, got {cfg['num_threads']}")
    for mod in cfg["device_modules"] or []:
        __import__(mod)
    d = init_distributed_device_so(device=_resolve_device(cfg["device"]))
    run = SimpleNamespace(distributed=d["distributed"], main=d["global_rank"] == 0, rank=d["global_rank"],
                          world=d["world_size"], writer=None, output=None, num_updates=0)
    device = torch.device(d["device"])
    threads = torch.get_num_threads()
    if cfg["num_threads"] is not None:
        torch.set_num_threads(cfg["num_threads"])
    try:
        return _train(cfg, ck, resume, run, device, t_start, hooks, datasets_fn or build_datasets)
    finally:
        torch.set_num_threads(threads)
        if run.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, ck, resume, run, device, t_start, hooks, datasets_fn) -> dict:
    from timm.optim import create_optimizer_v2, optimizer_kwargs
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm.utils import ModelEmaV3, NativeScaler, random_seed, update_summary

    console = Console(highlight=False)
    log = (lambda *a: console.print(*a, soft_wrap=True)) if run.main else (lambda *a, **k: None)
    random_seed(cfg["seed"], run.rank)
    if cfg["fast_norm"]:
        from timm.layers import set_fast_norm

        set_fast_norm()
    if run.main:  # rank 0 extracts / decodes once, the others then read the cache
        datasets = datasets_fn(cfg, ("train", "val"), log)
    if run.distributed:
        dist.barrier()
    if not run.main:
        datasets = datasets_fn(cfg, ("train", "val"), log)
    if cfg["num_classes"] is None:
        reader = getattr(datasets["train"], "reader", None)
        classes = getattr(reader, "class_to_idx", None) or getattr(datasets["train"], "classes", None)
        if not classes:
            raise ConfigError("num_classes is not set and cannot be read from the dataset; set num_classes")
        cfg["num_classes"] = len(classes)
    sync_bn = cfg["sync_bn"] and run.distributed
    # resuming: the checkpoint holds the weights (no pretrained download / initial checkpoint needed)
    no_init = {"pretrained": False, "initial_checkpoint": "", "pretrained_path": None}
    model = build_model(cfg if ck is None else {**cfg, **no_init}, sync_bn=sync_bn)
    spec = slim.width_spec(model)
    if ck is not None:
        try:
            slim.load_checkpoint(ck, model)  # before anything is written
        except slim.WidthSpecMismatchError as e:
            name = resume if isinstance(resume, (str, os.PathLike)) else "the checkpoint"
            raise slim.WidthSpecMismatchError(f"cannot resume from {name}: {e}") from None
        slim.clear_statistics(model)  # post-statistics of the previous weights are stale once training goes on
    cfg.update(_data_config(cfg, model))
    eval_widths = config_widths(spec, cfg, "eval_widths")
    export_widths = eval_widths if cfg["export_widths"] is None else config_widths(spec, cfg, "export_widths")
    calib_widths = sorted(set(eval_widths) | set(export_widths))
    if not spec.is_switches and cfg["calib_samples"] == 0 and set(calib_widths) - {spec.min, spec.max}:
        raise ConfigError(f"calib_samples: 0 leaves US-Net widths {sorted(set(calib_widths) - {spec.min, spec.max})} "
                          f"without BN statistics; only {spec.min} and {spec.max} are tracked during training")
    rule = cfg["sample_rule"] or ("all" if spec.is_switches else "sandwich")
    # widths evaluated per epoch: every switch, or the US-Net bounds the rule trains every step (only those have
    # running BN statistics before calibration)
    tracked = {"sandwich": (spec.min, spec.max), "min_random": (spec.min,), "max_random": (spec.max,)}.get(rule, ())
    run.tracked_widths = list(spec.widths) if spec.is_switches else sorted(set(tracked))
    if cfg["grad_checkpointing"]:
        model.set_grad_checkpointing(enable=True)
    model.to(device)
    if cfg["channels_last"]:
        model.to(memory_format=torch.channels_last)

    n_train, n_val = len(datasets["train"]), len(datasets["val"])
    train_idx = subset_indices(n_train, cfg["train_num_samples"], cfg["seed"])
    val_idx = subset_indices(n_val, cfg["val_num_samples"], cfg["seed"])
    if len(train_idx) < cfg["batch_size"] * run.world:
        raise ConfigError(f"the training set has {len(train_idx)} images, fewer than one global batch "
                          f"({cfg['batch_size']} x {run.world} ranks); lower batch_size")
    loader_train = make_loader(cfg, datasets["train"], train_idx, True, cfg["batch_size"], device, run.distributed)
    loader_eval = make_loader(cfg, datasets["val"], val_idx[run.rank::run.world], device=device)
    calib_n = len(train_idx) if cfg["calib_samples"] is None else min(cfg["calib_samples"], len(train_idx))
    calib_idx = train_idx[subset_indices(len(train_idx), calib_n, cfg["seed"] + 1)] if calib_n else train_idx[:0]
    loader_calib = make_loader(cfg, datasets["train"], calib_idx[run.rank::run.world], device=device)

    # optimizer: timm's factory; switchable-BN parameters (one row per switch: 2-D) get no weight decay either
    norm = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    no_wd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    no_wd |= {f"{n}.{p}" for n in norm for p in ("weight", "bias")}
    model.no_weight_decay = lambda: no_wd  # instance attribute: read by create_optimizer_v2
    if cfg["lr"] is None:  # timm: lr from lr_base scaled by the global batch
        ratio = cfg["batch_size"] * run.world * cfg["grad_accum_steps"] / cfg["lr_base_size"]
        scale = cfg["lr_base_scale"] or ("sqrt" if any(o in cfg["opt"].lower() for o in ("ada", "lamb")) else "linear")
        cfg["lr"] = cfg["lr_base"] * (ratio ** 0.5 if scale == "sqrt" else ratio)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=SimpleNamespace(**cfg)),
                                    **(cfg["opt_kwargs"] or {}))
    del model.no_weight_decay
    amp_dtype = torch.bfloat16 if cfg["amp_dtype"] == "bfloat16" else torch.float16
    amp_autocast, loss_scaler = contextlib.nullcontext, None
    if cfg["amp"]:
        amp_autocast = functools.partial(torch.autocast, device_type=device.type, dtype=amp_dtype)
        if device.type == "cuda" and amp_dtype == torch.float16:
            loss_scaler = NativeScaler(device=device.type)
    model_ema = None
    if cfg["model_ema"]:  # after .to(device), before DDP (as timm)
        model_ema = ModelEmaV3(model, decay=cfg["model_ema_decay"], use_warmup=cfg["model_ema_warmup"],
                               device="cpu" if cfg["model_ema_force_cpu"] else None)
    if cfg["torchcompile"]:  # one graph per width: dynamo guards on the width (US random widths recompile)
        model = torch.compile(model, backend=cfg["torchcompile"], mode=cfg["torchcompile_mode"])
    train_model = model
    if run.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=not cfg["no_ddp_bb"])
    module = getattr(model, "_orig_mod", model)
    step = slim.MultiWidthStep(train_model, spec=spec, num_widths=cfg["num_widths"], rule=rule,
                               distill=cfg["inplace_distill"], temperature=cfg["distill_temperature"],
                               seed=cfg["seed"])
    run.mixup_fn, run.criterion = create_loss(cfg)
    run.criterion = run.criterion.to(device)
    accum = cfg["grad_accum_steps"]
    updates_per_epoch = (len(loader_train) + accum - 1) // accum
    decreasing = cfg["eval_metric"] == "loss"
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(SimpleNamespace(**cfg), decreasing_metric=decreasing),
        updates_per_epoch=updates_per_epoch)
    start_epoch, rng = 0, rng_state()
    if ck is not None:
        start_epoch = int(ck.get("epoch", 0))
        if not cfg["no_resume_opt"] and ck.get("optimizer") is not None:
            optimizer.load_state_dict(ck["optimizer"])
            if loss_scaler is not None and ck.get("amp_scaler"):
                loss_scaler.load_state_dict(ck["amp_scaler"])
        if ck.get("scheduler") is not None and lr_scheduler is not None:
            lr_scheduler.load_state_dict(ck["scheduler"])
        if model_ema is not None and ck.get("state_dict_ema") is not None:
            model_ema.module.load_state_dict(ck["state_dict_ema"])
            slim.clear_statistics(model_ema.module)
        rng = ck.get("rng") or rng
    if cfg["start_epoch"] is not None:
        start_epoch = cfg["start_epoch"]
    if start_epoch > 0 and lr_scheduler is not None:
        if cfg["sched_on_updates"]:
            lr_scheduler.step_update(start_epoch * updates_per_epoch)
        else:
            lr_scheduler.step(start_epoch)

    saver = None
    if not cfg["output"]:  # timm: ./output/train/<experiment or date-model-size>
        name = [cfg["experiment"] or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg['model']}-{cfg['input_size'][-1]}"]
        if run.distributed:
            dist.broadcast_object_list(name, src=0)
        cfg["output"] = str(Path("output", "train", name[0]).resolve())
    output = Path(cfg["output"])
    run.output = str(output)
    if run.main:
        output.mkdir(parents=True, exist_ok=True)

        write_yaml(cfg, output / "config.yaml")
        write_yaml({k: cfg[k] for k in DEFAULTS}, output / "args.yaml")
        if cfg["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            run.writer = SummaryWriter(str(output / "tb"))

        def payload():
            return dict(framework="timm", arch=cfg["model"], config=cfg, epoch=run.epoch + 1,
                        iteration=run.num_updates, optimizer=optimizer.state_dict(),
                        scheduler=_state(lr_scheduler), rng=rng_state(), metrics=run.metrics, calibrated=[],
                        amp_scaler=loss_scaler.state_dict() if loss_scaler is not None else None, finished=False)
        saver = checkpoint_saver(module, optimizer, cfg, model_ema, loss_scaler, str(output), decreasing, payload)
        if ck is not None and ck.get("saver"):
            saver.load_state_dict(ck["saver"])
    run.cfg, run.model, run.device, run.updates_per_epoch, run.metrics = cfg, module, device, updates_per_epoch, {}
    run.lr = lambda: optimizer.param_groups[-1]["lr"]
    run.validate = lambda widths, loader: validate(module, loader, widths, device, cfg["channels_last"],
                                                   amp_autocast, run.distributed)
    log(f"slim train {cfg['model']} ({'S-Net switches' if spec.is_switches else 'US-Net range'} "
        f"{list(spec.widths)}, rule={rule}, n={cfg['num_widths']}, distill={cfg['inplace_distill']}) "
        f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}M params | data {cfg['dataset'] or cfg['data_dir']}: "
        f"{len(train_idx)} train / {len(val_idx)} val, input {cfg['input_size']} | {cfg['opt']} lr={cfg['lr']:.4g} "
        f"bs={cfg['batch_size']}x{run.world}x{accum} | {num_epochs} epochs from {start_epoch} | device {device} | "
        f"output {output}")

    if ck is not None and run.world == 1:  # last: nothing else may draw from the restored generators
        set_rng_state(rng)
    elif ck is not None:
        random_seed(cfg["seed"] + 1000 * start_epoch, run.rank)
    rng_at_epoch_end = rng
    for epoch in range(start_epoch, num_epochs):
        run.epoch = epoch
        if hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        t0 = time.time()
        train_metrics = train_one_epoch(epoch, train_model, loader_train, optimizer, cfg, step, device, lr_scheduler,
                                        saver, amp_autocast, loss_scaler, run.mixup_fn, model_ema, hooks, run, log)
        train_metrics["time_s"] = round(time.time() - t0, 2)
        for h in hooks:
            train_metrics.update(h.epoch_metrics(run))
        if run.distributed and cfg["dist_bn"] and not sync_bn:
            distribute_bn(module, run.world, cfg["dist_bn"] == "reduce")
        if (epoch + 1) % cfg["val_interval"] and epoch + 1 != num_epochs:  # timm: no eval, summary or checkpoint
            if lr_scheduler is not None:
                lr_scheduler.step(epoch + 1, None)
            continue
        eval_metrics = {}
        ema_eval = model_ema is not None and not cfg["model_ema_force_cpu"]  # timm: no EMA eval on the CPU copy
        for tag, m in (("", module), ("ema_", model_ema.module if ema_eval else None)):
            if m is None or not run.tracked_widths:
                continue
            if tag and run.distributed and cfg["dist_bn"]:
                distribute_bn(m, run.world, cfg["dist_bn"] == "reduce")
            ev = validate(m, loader_eval, run.tracked_widths, device, cfg["channels_last"], amp_autocast,
                          run.distributed)
            eval_metrics.update({f"{tag}{k}_w{w:g}": round(r[k], 4) for w, r in ev.items()
                                 for k in ("loss", "top1", "top5")})
            log(f"Test{' (EMA)' if tag else ''}: epoch {epoch} " +
                " ".join(f"top-1@{w:g} {r['top1']:.2f}%" for w, r in ev.items()))
        wmax = max(run.tracked_widths) if run.tracked_widths else None
        ema_key = "ema_" if ema_eval else ""
        metric = eval_metrics.get(f"{ema_key}{cfg['eval_metric']}_w{wmax:g}") if wmax is not None else None
        run.metrics = {"epoch": epoch, **{f"train_{k}": v for k, v in train_metrics.items()},
                       **{f"eval_{k}": v for k, v in eval_metrics.items()}}
        rng_at_epoch_end = rng_state()  # what the checkpoint of this epoch holds (after evaluation)
        if run.main:
            lr = float(np.mean([g["lr"] for g in optimizer.param_groups]))
            update_summary(epoch, train_metrics, eval_metrics, str(output / "summary.csv"), lr=lr)
            if run.writer is not None:
                for k, v in {**train_metrics, **eval_metrics}.items():
                    run.writer.add_scalar(f"{'eval' if k in eval_metrics else 'train'}/{k}", v, epoch + 1)
            saver.save_checkpoint(epoch, metric=metric)
        if lr_scheduler is not None:
            lr_scheduler.step(epoch + 1, metric)
    train_end = time.time()

    # ---- post-statistics, per-width evaluation, spectrum, export (US-Nets Sec. 3.2) ---------------------------
    models = {"": module, **({"ema": model_ema.module.to(device)} if model_ema is not None else {})}
    results = {}
    for tag, m in models.items():
        if cfg["calib_samples"] != 0:
            t0 = time.time()
            used = slim.calibrate_bn(m, loader_calib, widths=calib_widths, num_samples=cfg["calib_samples"],
                                     method=cfg["calib_method"],
                                     forward=lambda mm, b: mm(_to_input(b[0], device, cfg)))
            log(calibration_line(used, f"{' of the EMA' if tag else ''} at {len(calib_widths)} widths", calib_n,
                                 time.time() - t0))
        results[tag] = validate(m, loader_eval, eval_widths, device, cfg["channels_last"], amp_autocast,
                                run.distributed)
    out = {"output": str(output), "checkpoint": str(output / "last.pth.tar"), "eval_widths": eval_widths,
           "rows": [], "rows_ema": [], "train_time_s": train_end - t_start}
    if run.main:
        payload = dict(framework="timm", arch=cfg["model"], config=cfg, epoch=num_epochs, iteration=run.num_updates,
                       optimizer=optimizer.state_dict(), scheduler=_state(lr_scheduler), rng=rng_at_epoch_end,
                       metrics=run.metrics, calibrated=calib_widths if cfg["calib_samples"] != 0 else [],
                       results={f"{w:g}": r for w, r in results[""].items()}, finished=True,
                       amp_scaler=loss_scaler.state_dict() if loss_scaler is not None else None,
                       saver=saver.state_dict())
        if model_ema is not None:
            payload.update(state_dict_ema=model_ema.module.state_dict(),
                           results_ema={f"{w:g}": r for w, r in results["ema"].items()})
        slim.save_checkpoint(str(output / "last.pth.tar"), module, **payload)
        val_x = next(iter(loader_eval))[0][:8].to(device)
        out["rows"] = write_spectrum(module, cfg, eval_widths, export_widths, results[""], output, val_x, log,
                                     run.writer)
        if model_ema is not None:
            out["rows_ema"] = write_spectrum(model_ema.module, cfg, eval_widths, [], results["ema"], output, None,
                                             log, None, suffix="_ema")
        if run.writer is not None:
            run.writer.close()
        for tag, rows in (("", out["rows"]), (" (EMA)", out["rows_ema"])):
            if rows:
                print_table(rows, title=f"{cfg['model']}{tag} on {cfg['dataset'] or Path(cfg['data_dir']).name}: "
                            f"{len(val_idx)} test images")
        out["total_time_s"] = time.time() - t_start
        log(f"done in {out['total_time_s']:.1f}s (training {train_end - t_start:.1f}s) -> {output}")
    if run.distributed:
        dist.barrier()
    return out


def _state(obj):
    return obj.state_dict() if obj is not None else None
