"""Shared helpers of the benchmarks: models, the plain reference of the same channels, interleaved timing.

Every benchmark compares a slimmable timm model against *plain timm models of exactly the same channels*,
measured in the same process and interleaved (A B B A ...) so that background load hits both sides alike.
Ratios are the median of per-round paired ratios; the ratio of the minima is printed as a second estimate.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import timm
from torch import nn

from slim_plugins.context import find_state

import slim_plugins as slim
import slim_plugins.integrations.timm  # noqa: F401  registers us_/s_ timm models

WIDTHS = [1.0, 0.75, 0.5, 0.25]
MODELS = {"mobilenetv2": "mobilenetv2_100", "resnet50": "resnet50",
          # index-gathered channel selections (concatenations, grouped convs + shuffles): `--models densenet121
          # s_shufflenet` (not in the default set; S-ShuffleNet is an S-Net with switches 0.5/1.0/2.0)
          "densenet121": "densenet121", "s_shufflenet": "s_shufflenet_g3",
          # transformers / modern CNNs (heads, channels-last LayerNorm): `--models deit_tiny convnext_atto`
          "deit_tiny": "deit_tiny_patch16_224", "convnext_atto": "convnext_atto"}
# US-only registered entry points (no S-Net variant)
US_ONLY = {"deit_tiny": "us_deit_tiny_patch16_224", "convnext_atto": "us_convnext_atto"}
DEFAULT_MODELS = ["mobilenetv2", "resnet50"]
MODEL_WIDTHS = {"s_shufflenet": [2.0, 1.0, 0.5]}


def widths_of(arch: str, default=None) -> list:
    """The widths a benchmark sweeps for ``arch`` (S-ShuffleNet: its three switches)."""
    return MODEL_WIDTHS.get(arch, default if default is not None else WIDTHS)


# ---- environment ------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def env_line() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"# torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}, "
            f"CPU {cpu_name()} x{os.cpu_count()}, torch threads {torch.get_num_threads()}, clock {CLOCK[0]}, "
            f"load avg (1 min) {load:.2f}, slim_plugins from {os.path.dirname(slim.__file__)}")


# perf_counter (wall) by default. With --threads 1 all work runs on the calling thread, so its CPU time
# (thread_time) is the latency without the time slices other processes on the shared machine take.
CLOCK = ["wall"]


def now() -> float:
    return time.thread_time() if CLOCK[0] == "thread" else time.perf_counter()


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=list(MODELS))
    p.add_argument("--kind", default="us", choices=["us", "s"], help="US-Net (range) or S-Net (switches)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", default="wall", choices=["wall", "thread"],
                   help="wall: perf_counter; thread: CPU time of the calling thread (only with --threads 1)")
    return p


def setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("--clock thread measures the calling thread only: use it with --threads 1")
    CLOCK[0] = args.clock
    torch.manual_seed(args.seed)
    print(env_line(), flush=True)
    print("# " + " ".join(sys.argv), flush=True)


# ---- models -----------------------------------------------------------------------------------------------
def slim_model(arch: str, kind: str = "us", num_classes: int = 1000) -> nn.Module:
    """``us_<arch>`` with widths 0.25-1.0 (US-Net) or ``s_<arch>`` with switches [0.25, 0.5, 0.75, 1.0]."""
    name = MODELS[arch]
    if arch in US_ONLY:
        return timm.create_model(US_ONLY[arch], width_range=[0.25, 1.0], num_classes=num_classes)
    if arch == "s_shufflenet":
        return timm.create_model(name, num_classes=num_classes)
    if arch == "densenet121":
        net = timm.create_model(name, num_classes=num_classes)
        spec = slim.WidthSpec.range(0.25, 1.0) if kind == "us" else slim.WidthSpec.switches(WIDTHS)
        return slim.convert(net, spec)
    if kind == "us":
        return timm.create_model(f"us_{name}", width_range=[0.25, 1.0], num_classes=num_classes)
    return timm.create_model(f"s_{name}", widths=[0.25, 0.5, 0.75, 1.0], num_classes=num_classes)


def calibrate(model: nn.Module, widths=(0.25, 0.5, 0.75), size: int = 64) -> None:
    """BN post-statistics for the US widths below max on a few random batches (only timing matters here)."""
    if find_state(model).spec.is_switches:
        return
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, size, size, generator=g) for _ in range(2)]
    slim.calibrate_bn(model, batches, widths=list(widths), num_samples=16)


def stock_timm(arch: str, width: float, num_classes: int = 1000, exported: nn.Module | None = None) -> nn.Module:
    """A plain timm model built by timm's own builders with the channels of the slim model at ``width``.

    MobileNetV2: ``timm.create_model("mobilenetv2_050/_075/_100")``, and timm's MobileNetV2 generator at 0.25.
    ResNet-50: timm's ``ResNet`` with ``channels`` scaled and the stem / first stage rebuilt by timm's
    ``make_blocks`` for the narrower stem (timm hard-codes a 64-channel stem).
    """
    if arch in US_ONLY:  # timm's own arguments for that width (embed_dim / num_heads, dims)
        from slim_plugins.integrations.timm import stock_kwargs

        return timm.create_model(MODELS[arch], num_classes=num_classes, **stock_kwargs(exported))
    if arch == "mobilenetv2":
        names = {1.0: "mobilenetv2_100", 0.75: "mobilenetv2_075", 0.5: "mobilenetv2_050"}
        if width in names:
            return timm.create_model(names[width], num_classes=num_classes)
        from timm.models.efficientnet import _gen_mobilenet_v2

        return _gen_mobilenet_v2(f"mobilenetv2_{int(width * 100):03d}", width, num_classes=num_classes,
                                 pretrained_cfg=timm.models.get_pretrained_cfg("mobilenetv2_100"))
    if arch == "s_shufflenet":
        return timm.create_model("shufflenet_v1_g3", width_mult=width, num_classes=num_classes)
    if arch == "densenet121":  # DenseNet-121 at a width: growth, stem and bottleneck scale together
        from timm.models.densenet import DenseNet

        g = slim.WidthSpec.range(0.25, 1.0).channels(32, width)
        return DenseNet(growth_rate=g, block_config=(6, 12, 24, 16),  # stem: 2 x growth, as timm builds it
                        num_classes=num_classes)
    if arch == "resnet50":
        from timm.models.resnet import Bottleneck, ResNet, make_blocks

        spec = slim.WidthSpec.range(0.25, 1.0)
        ch = tuple(spec.channels(c, width) for c in (64, 128, 256, 512))
        r = ResNet(Bottleneck, [3, 4, 6, 3], channels=ch, num_classes=num_classes)
        if ch[0] != 64:
            r.conv1 = nn.Conv2d(3, ch[0], 7, 2, 3, bias=False)
            r.bn1 = nn.BatchNorm2d(ch[0])
            stages, _ = make_blocks((Bottleneck,) * 4, ch, [3, 4, 6, 3], ch[0])
            for n, st in stages:
                setattr(r, n, st)
        return r
    raise ValueError(arch)


def plain_pair(model: nn.Module, arch: str, width: float, example: torch.Tensor):
    """``(stock, exported)``: the stock timm model of the same channels carrying the exported weights, and
    ``slim.export(model, width)``. Raises if the channels differ (then the comparison would be meaningless)."""
    exported = slim.export(model, width, example_input=example[:1]).eval()
    stock = stock_timm(arch, width, num_classes=exported.num_classes, exported=exported)
    sd = exported.state_dict()
    ref = stock.state_dict()
    bad = [k for k in ref if k not in sd or sd[k].shape != ref[k].shape] + [k for k in sd if k not in ref]
    if bad:
        raise RuntimeError(f"{arch} at {width}: stock timm model has different channels at {bad[:3]}")
    stock.load_state_dict(sd)
    # timm adds a residual where a narrow block happens to get in == out channels (MobileNetV2 0.25x blocks.0);
    # the slim model keeps the base model's graph, so the stock model is given the same graph.
    skips = {n: m.has_skip for n, m in exported.named_modules() if hasattr(m, "has_skip")}
    for n, m in stock.named_modules():
        if n in skips:
            m.has_skip = skips[n]
    return stock.eval(), exported


# ---- timing -----------------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], object]], rounds: int, inner: int = 1, warmup: int = 1):
    """Time each callable ``rounds`` times, interleaved, rotating the order every round (A B C, B C A, ...).

    Returns ``{name: [seconds per call, one per round]}`` (each round times ``inner`` calls).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if r % 2:
            order = order[::-1]
        for n in order:
            f = fns[n]
            t0 = now()
            for _ in range(inner):
                f()
            out[n].append((now() - t0) / inner)
    return out


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of per-round ratios ``num[i] / den[i]`` (robust to load that drifts between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den))


def min_ratio(num: list[float], den: list[float]) -> float:
    return min(num) / min(den)


def med(xs) -> float:
    return statistics.median(xs)


def verdict(ratio: float, target: float) -> str:
    return "met" if ratio <= target else "NOT met"


def table(rows: list[dict], cols: list[str]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)
