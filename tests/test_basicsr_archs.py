"""BasicSR's own SR archs under SlimSRModel (issue 24): BasicSR's train_pipeline for 2 iterations with per-width
validation, `slim export` into the stock arch (strict load, equal outputs), and the test entry points (ours and
BasicSR's stock test_pipeline) on the exported options. Tiny archs, real data ($SLIM_DATA/sr)."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("basicsr")

import slim_plugins as slim  # noqa: E402
from slim_plugins.errors import ChannelGroupError, CheckpointError, NotExactError, SlimError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
US = slim.WidthSpec.range(0.5, 1.0, divisor=1)


def _coverage():
    spec = importlib.util.spec_from_file_location("coverage_basicsr", REPO / "benchmarks" / "coverage_basicsr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


COV = _coverage()
ARCHS = dict(COV.ARCHS)


# ---- the core fix SwinIR needed: int() of a shape-only value traces ------------------------------------------
class _WindowReverse(nn.Module):
    """SwinIR's window_reverse pattern: ``int(windows.shape[0] / (h * w / ws / ws))`` sizes the batch dim."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        h, w = x.shape[2], x.shape[3]
        win = y.permute(0, 2, 3, 1).reshape(-1, 2, 2, y.shape[1])  # (B*h*w/4, 2, 2, C): windows of 2x2, toy
        b = int(win.shape[0] / (h * w / 2 / 2))
        return self.b(win.reshape(b, h, w, -1).permute(0, 3, 1, 2))


class _IntChannels(nn.Module):
    """An int() of a shape used as a channel count: a literal in the graph, so the analysis refuses it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y.view(int(y.shape[0]), int(y.shape[1]), -1).view(y.shape))


def test_int_of_a_shape_traces_and_a_channel_count_from_it_is_refused(mad):
    x = torch.rand(2, 3, 8, 12)
    net = slim.convert(_WindowReverse().eval(), US, example_input=x)
    for w in (0.5, 0.75, 1.0):
        with torch.no_grad(), slim.width(w):
            y = net(x)
        assert mad(slim.export(net, w, example_input=x)(x), y) <= 1e-6
    with pytest.raises(NotExactError, match="literal channel count 8"):
        slim.convert(_IntChannels().eval(), US, example_input=x)

    class DataInt(nn.Module):  # int() of tensor data stays untraceable: a typed error naming the layer
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)

        def forward(self, x):
            return self.b(self.a(x) * int(x.sum() > 0))

    with pytest.raises(ChannelGroupError, match="int\\(\\) of a traced value"):
        slim.convert(DataInt(), US, example_input=x)


# ---- export into the stock arch ------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["EDSR", "RCAN", "RRDBNet", "MSRResNet", "SRVGGNetCompact", "SwinIR"])
def test_stock_arch_converts_and_exports_strictly_loadable(arch, mad):
    from basicsr.archs import build_network

    from slim_plugins.integrations.basicsr.stock import convert_kwargs, stock_network_g

    net_g = ARCHS[arch]
    net = build_network(dict(net_g))
    stock_cls = type(net)  # the class BasicSR registers (convert may host parameters in a subclass of it)
    us = slim.convert(net, US, **convert_kwargs(net_g, net)).eval()
    with torch.no_grad():
        for p in us.parameters():  # off the initialisation: biases, PReLU slopes
            p.add_(torch.randn_like(p) * 0.01)
    x = torch.rand(1, 3, 16, 24)
    for w in (0.5, 0.75, 1.0):
        plain = slim.export(us, w, example_input=x)
        ng = stock_network_g(net_g, plain.state_dict())
        stock = build_network(dict(ng)).eval()
        assert type(stock) is stock_cls and stock_cls.__module__.startswith("basicsr.archs.")
        stock.load_state_dict(plain.state_dict(), strict=True)
        with torch.no_grad(), slim.width(w):
            assert mad(stock(x), us(x)) <= 1e-5, (arch, w)
    if arch == "RRDBNet":
        assert (ng["num_feat"], ng["num_grow_ch"]) == (16, 8)
        assert {k: v for k, v in stock_network_g(net_g, slim.export(us, 0.5, example_input=x).state_dict()).items()
                if v != net_g.get(k)} == {"num_feat": 8, "num_grow_ch": 4}
    if arch == "SwinIR":
        half = stock_network_g(net_g, slim.export(us, 0.5, example_input=x).state_dict())
        assert (half["embed_dim"], half["num_heads"]) == (16, [2, 2])  # whole heads, head_dim 8 kept


def test_swinir_width_the_stock_arch_cannot_hold_is_refused_at_export():
    """At 0.6 the embedding rounds to whole heads (24 = 3 heads of 8) but the MLP hidden width (38 of 64) is not
    mlp_ratio x 24: no stock SwinIR holds those weights, so the export says so instead of writing options."""
    from basicsr.archs import build_network

    from slim_plugins.integrations.basicsr.stock import convert_kwargs, stock_network_g

    net_g = ARCHS["SwinIR"]
    net = build_network(dict(net_g))
    us = slim.convert(net, US, **convert_kwargs(net_g, net)).eval()
    plain = slim.export(us, 0.6, example_input=torch.rand(1, 3, 16, 16))
    with pytest.raises(CheckpointError, match=r"stock SwinIR\(embed_dim=24, num_heads=\[3, 3\]\) does not load"):
        stock_network_g(net_g, plain.state_dict())


def test_ecbsr_is_refused_with_a_typed_error():
    from basicsr.archs import build_network

    from slim_plugins.integrations.basicsr.stock import convert_kwargs

    net_g = ARCHS["ECBSR"]
    net = build_network(dict(net_g))
    with pytest.raises(ChannelGroupError, match="ECBSR.*conv1x1_3x3.*item assignment"):
        slim.convert(net, US, **convert_kwargs(net_g, net))


# ---- the coverage table's verdicts, measured through BasicSR's train_pipeline and `slim export` ----------------
@pytest.mark.parametrize("arch", ["EDSR", "RCAN", "RRDBNet", "MSRResNet", "SwinIR"])
def test_coverage_verdict(arch, tmp_path, slim_data):
    row = COV.measure(arch, ARCHS[arch], str(slim_data), tmp_path, test_entries=False)
    assert row["verdict"] == "exact", row
    assert row["strict_load"] == "ok" and float(row["export_max_diff"]) <= 1e-5
    assert 5 < float(row["val_psnr_w0.5"]) < 60 and 5 < float(row["val_psnr_w1"]) < 60  # per-width keys in the log
    log = next((tmp_path / "experiments").glob("*/train_*.log")).read_text()
    assert "Validation Set5 per width" in log and "width 0.5" in log


def test_coverage_refuses_ecbsr_typed(tmp_path, slim_data):
    row = COV.measure("ECBSR", ARCHS["ECBSR"], str(slim_data), tmp_path, test_entries=False)
    assert row["verdict"] == "refused (ChannelGroupError)", row
    assert not (tmp_path / "experiments").exists()  # refused before BasicSR made any folder


def test_shipped_coverage_csv_matches_the_verdicts():
    import csv

    rows = {r["arch"]: r for r in csv.DictReader(open(REPO / "benchmarks" / "coverage_basicsr.csv"))}
    for arch in ("EDSR", "MSRResNet", "RCAN", "RRDBNet", "SRVGGNetCompact", "SwinIR", "WDSR (ours)"):
        assert rows[arch]["verdict"] == "exact" and rows[arch]["strict_load"] == "ok", rows[arch]
    assert rows["ECBSR"]["verdict"].startswith("refused (")


# ---- test entry points on exported options --------------------------------------------------------------------
def test_test_entry_points_on_exported_options(tmp_path, slim_data):
    """`slim export` of a 2-iteration checkpoint, then `python -m slim_plugins.integrations.basicsr.test -opt` on the
    exported options (exit 0, BasicSR's results layout, PSNR in the log equal to the training validation's at that
    width), and BasicSR's stock test_pipeline in a process that imports nothing of ours: it runs EDSR's export
    (stock arch, stock datasets) and cannot run WDSR's (our arch)."""
    edsr = COV.measure("EDSR", ARCHS["EDSR"], str(slim_data), tmp_path / "edsr")
    assert edsr["verdict"] == "exact", edsr
    assert edsr["slim_test_entry"].startswith("exit 0, Set5 psnr") and "differs" not in edsr["slim_test_entry"]
    assert edsr["stock_basicsr_test"].startswith("exit 0, Set5 psnr") and "differs" not in edsr["stock_basicsr_test"]
    res = tmp_path / "edsr" / "slim_test" / "results" / "cov_edsr_n8"
    log = next(res.glob("test_cov_edsr_n8_*.log")).read_text()
    assert re.search(r"# psnr: [0-9.]+", log) and "Network [EDSR] is created" in log
    assert sorted(p.name for p in (res / "visualization" / "Set5").glob("*.png")) == \
        [f"{n}x2_cov_edsr_n8.png" for n in ("baby", "bird", "butterfly", "head", "woman")]

    wdsr = COV.measure("WDSR (ours)", ARCHS["WDSR (ours)"], str(slim_data), tmp_path / "wdsr")
    assert wdsr["verdict"] == "exact", wdsr
    assert wdsr["slim_test_entry"].startswith("exit 0, Set5 psnr") and "differs" not in wdsr["slim_test_entry"]
    assert wdsr["stock_basicsr_test"].startswith("exit 1") and "WDSR" in wdsr["stock_basicsr_test"]

    # the entry point takes BasicSR's own arguments and refuses a missing -opt like BasicSR's scripts
    p = subprocess.run([sys.executable, "-m", "slim_plugins.integrations.basicsr.test"], capture_output=True, text=True)
    assert p.returncode == 2 and "-opt" in p.stderr
