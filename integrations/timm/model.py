"""The model and the training loss of a timm config, as timm's ``train.py`` builds them, made slimmable.

:func:`build_model`: ``timm.create_model`` with timm's model arguments (drop rates, ``gp``, ``pretrained_path``,
``initial_checkpoint``, ``head_init_scale`` / ``head_init_bias``, SyncBatchNorm), then :func:`slim_plugins.convert`
with the config's widths. :func:`create_loss`: the loss timm's ``train.py`` picks (Mixup/CutMix soft targets, BCE,
label smoothing, cross-entropy).
"""
from __future__ import annotations

import torch
from torch import nn

import slim_plugins as slim

from . import PAPER_SWITCHES, apply_cifar_stem, example_input, fixed_layers, set_units, spec_from_args
from .transformers import US_ENTRIES

__all__ = ["build_model", "create_loss"]


# ---- model -----------------------------------------------------------------------------------------------------
def build_model(cfg: dict, sync_bn: bool = False) -> nn.Module:
    """The converted (slimmable) timm model of a resolved config, on CPU.

    ``model`` is any timm CNN, or the adapter's ``s_<name>`` / ``us_<name>`` (the paper's switches / range when
    ``widths`` / ``width_range`` are not given). Built as timm's ``train.py`` builds it (drop rates, ``gp``,
    ``pretrained_path``, ``initial_checkpoint`` of a plain model, ``head_init_scale`` / ``head_init_bias``,
    SyncBatchNorm), then converted.

    Raises:
        WidthError: bad widths. WidthSpecMismatchError: ``initial_checkpoint`` of a slim run with another width
        spec. RuntimeError (timm): unknown model name.
    """
    import timm

    name, kind = cfg["model"], "switches" if cfg["widths"] is not None else "range"
    for prefix, k in (("us_", "range"), ("s_", "switches")):
        if name.startswith(prefix) and (name[len(prefix):] in PAPER_SWITCHES or f"us_{name[len(prefix):]}" in
                                        US_ENTRIES and prefix == "us_"):
            name, kind = name[len(prefix):], k
    spec = spec_from_args(cfg["widths"], cfg["width_range"], cfg["divisor"], name, kind)
    init = cfg["initial_checkpoint"]
    init_ck = None  # a slim run's own checkpoint: loaded after conversion (read once, here)
    if init and not init.endswith(".safetensors"):
        ck = torch.load(init, map_location="cpu", weights_only=False)
        init_ck = ck if isinstance(ck, dict) and "width_spec" in ck else None
    slim_init = init_ck is not None
    kw = dict(pretrained=cfg["pretrained"], num_classes=cfg["num_classes"],
              in_chans=cfg["in_chans"] or (cfg["input_size"][0] if cfg["input_size"] else 3), drop_rate=cfg["drop"],
              drop_path_rate=cfg["drop_path"],
              drop_block_rate=cfg["drop_block"], global_pool=cfg["gp"], bn_momentum=cfg["bn_momentum"],
              bn_eps=cfg["bn_eps"], checkpoint_path=None if slim_init else init or None)
    if cfg["pretrained_path"]:
        kw["pretrained_cfg_overlay"] = dict(file=cfg["pretrained_path"], num_classes=-1)
    model = timm.create_model(name, **{k: v for k, v in kw.items() if v is not None}, **cfg["model_kwargs"])
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    with torch.no_grad():
        if cfg["head_init_scale"] is not None and getattr(head, "weight", None) is not None:
            head.weight.mul_(cfg["head_init_scale"])  # 0 = zero init: uniform predictions at the start
            if getattr(head, "bias", None) is not None:
                head.bias.mul_(cfg["head_init_scale"])
        if cfg["head_init_bias"] is not None and getattr(head, "bias", None) is not None:
            head.bias.fill_(cfg["head_init_bias"])
    if cfg["cifar_stem"]:
        apply_cifar_stem(model)
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before conversion: slim keeps SyncBatchNorm
    model = slim.convert(model, spec, fixed=[*fixed_layers(model), *cfg["fixed_layers"]], bn=cfg["bn"],
                         output_averaging=cfg["output_averaging"], example_input=example_input(model))
    set_units(model)  # timm's channel rounding (expansion convs, MLP ratios, Swin stages)
    if slim_init:
        slim.load_checkpoint(init_ck, model)
    return model


def create_loss(cfg: dict):
    """``(mixup_fn or None, train_loss_fn)`` as timm's train.py picks them (Mixup/CutMix -> soft targets; BCE;
    label smoothing; cross-entropy)."""
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    bce = dict(target_threshold=cfg["bce_target_thresh"], sum_classes=cfg["bce_sum"], pos_weight=cfg["bce_pos_weight"])
    if cfg["mixup"] > 0 or cfg["cutmix"] > 0 or cfg["cutmix_minmax"] is not None:
        mixup = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], cutmix_minmax=cfg["cutmix_minmax"],
                      prob=cfg["mixup_prob"], switch_prob=cfg["mixup_switch_prob"], mode=cfg["mixup_mode"],
                      label_smoothing=cfg["smoothing"], num_classes=cfg["num_classes"])
        return mixup, BinaryCrossEntropy(**bce) if cfg["bce_loss"] else SoftTargetCrossEntropy()
    if cfg["smoothing"]:  # as timm: BCE only with soft targets (mixup) or smoothing, else cross-entropy
        return None, (BinaryCrossEntropy(smoothing=cfg["smoothing"], **bce) if cfg["bce_loss"] else
                      LabelSmoothingCrossEntropy(smoothing=cfg["smoothing"]))
    return None, nn.CrossEntropyLoss()
