"""Turn the reproduction CSVs (``results/cifar10/<schedule>/``) into ``docs/reproduction.md`` and its plots.

    python experiments/report.py                     # every schedule found under results/cifar10/
    python experiments/report.py --results DIR --out docs/reproduction.md

Each schedule (``cpu``, ``gpu``) gets its own section, tables and plots: numbers from different hardware or
schedules are never put in one table. Each claim of the papers is checked against the numbers with the rule stated
next to it; a claim is marked "holds", "does not hold" or "not separated" (difference within the noise bound
``--noise``, top-1 points).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEDULE_TEXT = {
    "cpu": "short CPU schedule (`experiments/cifar10/cpu.yaml`): {epochs} over the full 50k training split, "
           "cosine decay per update, ImageNet (stride-2) stem, batch 128, SGD + Nesterov, lr 0.05",
    "gpu": "full schedule (`experiments/cifar10/base.yaml`): {epochs}, CIFAR stem, cosine decay, batch 128, "
           "SGD + Nesterov, lr 0.1, weight decay 5e-4",
}
EXP_TITLES = {
    "noise": "0. Seed-to-seed spread",
    "exp1": "1. Naive training vs switchable BN (S-Nets Sec. 3.1, Fig. 2)",
    "exp2": "2. S-Net vs individually trained nets (S-Nets Tables 3, 4, 6)",
    "exp3": "3. US-Net vs S-Net vs individual nets (US-Nets Table 1, Figs. 3 and 11)",
    "exp4": "4. US-Net ablations (US-Nets Table 2, Figs. 6-9)",
    "exp5": "5. BN post-statistics (US-Nets Table 3)",
}


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("width", "mflops", "top1_err", "top1", "wall_time_s", "epoch", "train_err", "test_err"):
            if k in r and r[k] not in ("", None):
                r[k] = float(r[k])
        if "trained_width" in r:
            r["trained_width"] = r["trained_width"] == "True"
    return rows


def select(rows, run=None, protocol_prefix=None):
    out = [r for r in rows if (run is None or r["run"] == run)
           and (protocol_prefix is None or r["protocol"].startswith(protocol_prefix))]
    return sorted(out, key=lambda r: r["width"])


def err_at(rows, run, w, protocol_prefix=None):
    for r in select(rows, run, protocol_prefix):
        if abs(r["width"] - w) < 1e-6:
            return r["top1_err"]
    return None


def fmt(v, nd=1):
    return "–" if v is None else f"{v:.{nd}f}"


def table(header, body) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else ":---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def verdict(diff, noise, better_if_positive=True) -> str:
    """``diff`` = claimed-worse minus claimed-better error (points): > noise holds, < -noise does not hold."""
    if diff is None:
        return "not measured"
    d = diff if better_if_positive else -diff
    if d > noise:
        return f"**holds** ({d:+.1f} points)"
    if d < -noise:
        return f"**does not hold** ({d:+.1f} points)"
    return f"**not separated** ({d:+.1f} points, within ±{noise:.1f})"


def at_least(diff, noise) -> str:
    """Verdict for 'about as good or better': ``diff`` (claimed-worse minus claimed-better error) ≥ −noise holds."""
    if diff is None:
        return "not measured"
    return f"**{'holds' if diff >= -noise else 'does not hold'}** ({diff:+.1f} points, bound −{noise:.1f})"


def pdiff(rows, run_a, run_b, widths, proto_a=None, proto_b=None):
    """Mean over ``widths`` of error(run_a) − error(run_b), on the widths both were evaluated at (None if none)."""
    d = [(err_at(rows, run_a, w, proto_a), err_at(rows, run_b, w, proto_b)) for w in widths]
    d = [a - b for a, b in d if a is not None and b is not None]
    return statistics.mean(d) if d else None


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


class Plots:
    def __init__(self, out_dir: Path, rel: str):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt, self.dir, self.rel = plt, out_dir, rel
        out_dir.mkdir(parents=True, exist_ok=True)

    def save(self, fig, name) -> str:
        fig.tight_layout()
        fig.savefig(self.dir / name, dpi=110)
        self.plt.close(fig)
        return f"![{name}]({self.rel}/{name})"

    def spectrum(self, name, title, series, ax=None):
        """``series``: [(label, rows, style)], rows with mflops / top1."""
        plt = self.plt
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows, style in series:
            if not rows:
                continue
            rows = sorted(rows, key=lambda r: r["mflops"])
            ax.plot([r["mflops"] for r in rows], [r["top1"] for r in rows], style, label=label, ms=4)
        ax.set_xlabel("MFLOPs (multiply-adds)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if own:
            return self.save(fig, name)
        return None


# ---- sections --------------------------------------------------------------------------------------------------
def section_exp1(rows, curves, plots, noise):
    out = [f"### {EXP_TITLES['exp1']}"]
    widths = sorted({r["width"] for r in select(rows, "snet4")})
    body = []
    for w in widths:
        body.append([f"{w:g}×", fmt(err_at(rows, "naive4", w, "own BN")), fmt(err_at(rows, "naive4", w, "BN calib")),
                     fmt(err_at(rows, "snet4", w))])
    out.append(table(["switch", "naive: shared BN (test error %)", "naive, BN calibrated per width",
                      "S-BN (test error %)"], body))
    gaps = [err_at(rows, "naive4", w, "own BN") - err_at(rows, "snet4", w) for w in widths]
    out.append(f"\nClaim (S-Nets §3.1): naive training with one shared BN has a very high test error, S-BN fixes it. "
               f"Rule: naive minus S-BN error, smallest over the switches: {verdict(min(gaps), noise)}.")
    cal = [err_at(rows, "naive4", w, "BN calib") for w in widths]
    if all(c is not None for c in cal):
        out.append(f"The paper's conjecture (the shared BN statistics are the problem): calibrating the naive model's "
                   f"BN per width brings its error from {fmt(_mean(gaps[i] + err_at(rows, 'snet4', w) for i, w in enumerate(widths)))} "
                   f"to {fmt(_mean(cal))} on average (S-BN: {fmt(_mean(err_at(rows, 'snet4', w) for w in widths))}).")
    if curves:
        plt = plots.plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for run, style in (("naive4", "--"), ("snet4", "-")):
            cs = [c for c in curves if c["run"] == run]
            if not cs:
                continue
            label = cs[0]["method"]
            wmax = max(c["width"] for c in cs)
            top = sorted((c for c in cs if c["width"] == wmax), key=lambda c: c["epoch"])
            axes[0].plot([c["epoch"] for c in top], [c["train_err"] for c in top], style, label=f"{label}, {wmax:g}×")
            for w in sorted({c["width"] for c in cs}):
                pts = sorted((c for c in cs if c["width"] == w), key=lambda c: c["epoch"])
                axes[1].plot([c["epoch"] for c in pts], [c["test_err"] for c in pts], style, label=f"{label}, {w:g}×")
        axes[0].set_title("training error of the widest switch (training batches)", fontsize=9)
        axes[1].set_title("test error per switch (2k test images)", fontsize=9)
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.set_ylabel("top-1 error (%)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6, ncol=2)
        out.append("\n" + plots.save(fig, "exp1_curves.png"))
    return out


def section_exp2(rows, plots, noise):
    out = [f"### {EXP_TITLES['exp2']}"]
    ind = {w: err_at(rows, f"inet_{int(round(w * 100)):03d}", w) for w in (0.35, 0.5, 0.75, 1.0)}
    body, diffs = [], []
    for w in (0.35, 0.5, 0.75, 1.0):
        s = err_at(rows, "snet4", w)
        mf = next((r["mflops"] for r in select(rows, "snet4") if abs(r["width"] - w) < 1e-6), None)
        d = None if s is None or ind[w] is None else ind[w] - s
        diffs.append(d)
        body.append([f"{w:g}×", fmt(mf, 2), fmt(ind[w]), fmt(s), fmt(err_at(rows, "snet4_shared", w)),
                     fmt(err_at(rows, "snet8", w)), "–" if d is None else f"{d:+.1f}"])
    out.append(table(["width", "MFLOPs", "individual", "S-Net 4-switch (private γ/β)", "S-Net, shared γ/β",
                      "S-Net 8-switch", "individual − S-Net"], body))
    d_avg = _mean(diffs)
    out.append(f"\nClaim (S-Nets Table 3): an S-Net is about as accurate as individually trained nets, better at "
               f"slim widths. Rule: average individual − S-Net error (≥ −{noise:.1f} means 'about as accurate'): "
               f"{at_least(d_avg, noise)}; "
               f"at 0.35×: {verdict(diffs[0], noise)}.")
    sh = pdiff(rows, "snet4_shared", "snet4", (0.35, 0.5, 0.75, 1.0))
    out.append(f"Claim (S-Nets Table 6): private γ/β are slightly better than shared ones. Rule: average shared − "
               f"private error: {verdict(sh, noise)}.")
    s8 = [r for r in select(rows, "snet8")]
    has_lr = bool(select(rows, "snet8_lr"))
    rows8 = [[f"{r['width']:g}×", fmt(r["mflops"], 2), fmt(r["top1_err"])]
             + ([fmt(err_at(rows, "snet8_lr", r["width"]))] if has_lr else [])
             + [fmt(err_at(rows, "snet4", r["width"])), fmt(ind.get(r["width"]))] for r in s8]
    out.append("\nS-Nets Table 4 analogue, 8 switches:\n\n" + table(
        ["width", "MFLOPs", "S-Net 8-switch"] + (["S-Net 8-switch, lr halved"] if has_lr else [])
        + ["S-Net 4-switch", "individual"], rows8))
    d8 = pdiff(rows, "snet8", "snet4", (0.35, 0.5, 0.75, 1.0))
    out.append(f"\nClaim (S-Nets Table 4): more switches give similar accuracy. Rule: average 8-switch − 4-switch "
               f"error at the shared widths, |d| ≤ {noise:.1f}: "
               f"{'**holds**' if d8 is not None and abs(d8) <= noise else '**does not hold**'} ({fmt(d8)} points).")
    d8h = pdiff(rows, "snet8_lr", "snet4", (0.35, 0.5, 0.75, 1.0)) if has_lr else None
    if d8h is not None:
        out.append(f"Diagnostic (not in the paper): the S-Net step sums the switches' losses, so at the same lr 8 "
                   f"switches take twice the 4-switch step on the shared weights. With the lr halved the 8-switch "
                   f"S-Net is {fmt(d8h)} points from the 4-switch one "
                   f"({'within' if abs(d8h) <= noise else 'outside'} ±{noise:.1f}).")
    series = [("individual", [r for r in rows if r["run"].startswith("inet_")], "ks"),
              ("S-Net 4-switch", select(rows, "snet4"), "o-"), ("S-Net shared γ/β", select(rows, "snet4_shared"), "^--"),
              ("S-Net 8-switch", select(rows, "snet8"), "d-")]
    if has_lr:
        series.append(("S-Net 8-switch, lr halved", select(rows, "snet8_lr"), "d:"))
    out.append("\n" + plots.spectrum("exp2_spectrum.png", "S-Nets vs individual nets", series))
    return out


def section_exp3(rows, plots, noise):
    out = [f"### {EXP_TITLES['exp3']}"]
    body, us_d, s_d, cols = [], [], [], ([], [], [])
    for w in (0.35, 0.5, 0.75, 1.0):
        i = err_at(rows, f"inet_{int(round(w * 100)):03d}", w, "own BN")
        s = err_at(rows, "snet4", w, "own BN")
        u = err_at(rows, "usnet", w)
        us_d.append(None if i is None or u is None else i - u)
        s_d.append(None if s is None or u is None else s - u)
        for c, v in zip(cols, (i, s, u)):
            c.append(v)
        body.append([f"{w:g}×", fmt(i), fmt(s), fmt(u)])
    body.append(["avg"] + [fmt(_mean(c)) for c in cols])
    out.append(table(["width", "individual", "S-Net 4-switch", "US-Net (n=4, distill)"], body))
    out.append(f"\nClaim (US-Nets Table 1): the US-Net is better than individual nets and the 4-switch S-Net on "
               f"average. Rule: average error difference vs individual {verdict(_mean(us_d), noise)}; vs S-Net "
               f"{verdict(_mean(s_d), noise)}.")
    fine = "widest net's weights"
    us = select(rows, "usnet")
    s_any = select(rows, "snet4", fine)
    i_any = select(rows, "inet_100", fine)
    if us and s_any and i_any:
        untrained = [r["width"] for r in s_any if not r["trained_width"] and err_at(rows, "usnet", r["width"]) is not None]
        us_un = _mean(err_at(rows, "usnet", w) for w in untrained)
        s_un = _mean(err_at(rows, "snet4", w, fine) for w in untrained)
        i_un = _mean(err_at(rows, "inet_100", w, fine) for w in untrained if w < 1.0)
        out.append(f"\nClaim (US-Nets Fig. 11, 'naturally slimmable?'): after BN calibration, the 4-switch S-Net and "
                   f"the individual 1.0× net fail at widths they were not trained at; the US-Net does not. Mean test "
                   f"error over the {len(untrained)} untrained widths of {us[0]['width']:g}–1.0 in steps of 0.025: "
                   f"US-Net {fmt(us_un)}, S-Net {fmt(s_un)}, individual 1.0× {fmt(i_un)} (below 1.0×). "
                   f"Rule: S-Net − US-Net {verdict(None if None in (s_un, us_un) else s_un - us_un, noise)}; "
                   f"individual − US-Net {verdict(None if None in (i_un, us_un) else i_un - us_un, noise)}.")
    series = [("US-Net (27 widths, calibrated)", us, "o-"),
              ("S-Net 4-switch", select(rows, "snet4", "own BN"), "s"),
              ("individual", [r for r in rows if r["run"].startswith("inet_") and r["protocol"].startswith("own BN")],
               "k^")]
    fig, axes = plots.plt.subplots(1, 2, figsize=(11, 4))
    plots.spectrum(None, "Fig. 3 analogue: trained widths", series, ax=axes[0])
    plots.spectrum(None, "Fig. 11 analogue: every width after BN calibration",
                   [("US-Net", us, "o-"), ("S-Net 4-switch (any width)", s_any, "s--"),
                    ("individual 1.0× (any width)", i_any, "^:")], ax=axes[1])
    out.append("\n" + plots.save(fig, "exp3_spectrum.png"))
    return out


def _spec_table(rows, runs, widths):
    body = []
    for run, label in runs:
        errs = [err_at(rows, run, w) for w in widths]
        allw = [r["top1_err"] for r in select(rows, run) if 0.35 - 1e-9 <= r["width"] <= 1.0 + 1e-9]
        body.append([label] + [fmt(e) for e in errs] + [fmt(_mean(allw))])
    return table(["model"] + [f"{w:g}×" for w in widths] + ["avg over 0.35–1.0× (every 0.05)"], body)


def section_exp4(rows, plots, noise):
    out = [f"### {EXP_TITLES['exp4']}"]
    W = (0.35, 0.5, 0.75, 1.0)
    rules = [("us_n3_random", "3 random"), ("us_n3_min_random", "min + 2 random"),
             ("us_n3_max_random", "max + 2 random"), ("us_n3_sandwich", "min + max + 1 random (sandwich)")]
    out.append("Sampling rules, n = 3, no inplace distillation (US-Nets Table 2), test error %:\n\n"
               + _spec_table(rows, rules, W))
    avg = {run: _mean(r["top1_err"] for r in select(rows, run) if r["width"] >= 0.35 - 1e-9) for run, _ in rules}
    others = [avg[r] for r, _ in rules[:3] if avg[r] is not None]
    if avg["us_n3_sandwich"] is not None and others:
        out.append(f"\nClaim: the sandwich rule is best on average. Rule: best other rule − sandwich: "
                   f"{verdict(min(others) - avg['us_n3_sandwich'], noise)}. Claim: training the smallest width matters "
                   f"more than the largest (min+random better than max+random): "
                   f"{verdict(None if None in (avg['us_n3_max_random'], avg['us_n3_min_random']) else avg['us_n3_max_random'] - avg['us_n3_min_random'], noise)}.")
    d = pdiff(rows, "us_nodistill", "usnet", W)
    out.append("\nInplace distillation (US-Nets Fig. 6), number of sampled widths n (Fig. 9), width lower bound k0 "
               "(Fig. 7), width divisor d (Fig. 8), test error %:\n\n"
               + _spec_table(rows, [("usnet", "default: n=4, distill, k0=0.35, d=8"), ("us_nodistill", "no distillation"),
                                    ("us_n3", "n=3"), ("us_n5", "n=5"), ("us_k0_005", "k0=0.05"),
                                    ("us_k0_025", "k0=0.25"), ("us_d1", "d=1")], W))
    n3 = pdiff(rows, "us_n3", "usnet", W)
    n5 = pdiff(rows, "us_n5", "usnet", W)
    d1 = pdiff(rows, "usnet", "us_d1", W)
    k05 = pdiff(rows, "us_k0_005", "usnet", W)
    out.append(f"\nClaims, each on the average error at 0.35/0.5/0.75/1.0×: inplace distillation improves the US-Net "
               f"(no-distill − distill) {verdict(d, noise)}; n=4 is better than n=3 {verdict(n3, noise)}; n=5 is "
               f"about the same as n=4 (|n5 − n4| ≤ {noise:.1f}: "
               f"{'**holds**' if n5 is not None and abs(n5) <= noise else '**does not hold**'}, {fmt(n5)}); "
               f"the lower bound k0 bounds performance, a lower k0=0.05 costs accuracy in 0.35–1.0× "
               f"{verdict(k05, noise)}; divisor 1 slightly helps (d=8 − d=1) {verdict(d1, noise)}.")
    fig, axes = plots.plt.subplots(2, 2, figsize=(11, 8))
    plots.spectrum(None, "Fig. 6: inplace distillation", [("with", select(rows, "usnet"), "o-"),
                                                          ("without", select(rows, "us_nodistill"), "s--")],
                   ax=axes[0][0])
    plots.spectrum(None, "Fig. 9: sampled widths n", [("n=3", select(rows, "us_n3"), "^:"),
                                                      ("n=4", select(rows, "usnet"), "o-"),
                                                      ("n=5", select(rows, "us_n5"), "s--")], ax=axes[0][1])
    plots.spectrum(None, "Fig. 7: width lower bound k0", [("k0=0.05", select(rows, "us_k0_005"), "^:"),
                                                          ("k0=0.25", select(rows, "us_k0_025"), "s--"),
                                                          ("k0=0.35", select(rows, "usnet"), "o-")], ax=axes[1][0])
    plots.spectrum(None, "Fig. 8: width divisor d", [("d=1", select(rows, "us_d1"), "s--"),
                                                     ("d=8", select(rows, "usnet"), "o-")], ax=axes[1][1])
    out.append("\n" + plots.save(fig, "exp4_ablations.png"))
    return out


def section_exp5(rows, plots, noise):
    out = [f"### {EXP_TITLES['exp5']}"]
    W = sorted({r["width"] for r in rows})
    protos = list(dict.fromkeys(r["protocol"] for r in rows))
    body = []
    means = {}
    for p in protos:
        errs = [err_at(rows, "usnet", w, p) for w in W]
        means[p] = _mean(errs)
        body.append([p] + [fmt(e) for e in errs] + [fmt(means[p])])
    out.append(table(["BN statistics of the trained US-Net"] + [f"{w:g}×" for w in W] + ["avg"], body))
    ex_all = next((means[p] for p in protos if p.startswith("exact") and "all" in p), None)
    mv_all = next((means[p] for p in protos if p.startswith("moving") and "all" in p), None)
    ex_2k = next((means[p] for p in protos if p.startswith("exact") and "2000" in p), None)
    ex_1k = next((means[p] for p in protos if p.startswith("exact") and "1000" in p), None)
    def within(x):
        if x is None or ex_all is None:
            return "not measured"
        return f"{'**holds**' if abs(x - ex_all) <= noise else '**does not hold**'} ({x - ex_all:+.1f})"

    out.append(f"\nClaims (US-Nets Table 3): exact averaging is slightly better than moving averaging (moving − "
               f"exact, all images) {verdict(None if None in (mv_all, ex_all) else mv_all - ex_all, noise)}; a small "
               f"subset is as accurate as all images (|subset − all| ≤ {noise:.1f}): 2k {within(ex_2k)}, 1k "
               f"{within(ex_1k)}.")
    return out


def measured_noise(rows) -> float | None:
    """The verdict bound from the seed repeats: the largest seed-0 vs seed-1 difference of the error averaged over
    the widths both seeds were evaluated at (the statistic most verdicts use), over the S-Net and the US-Net."""
    d = [pdiff(rows, a, b, sorted({r["width"] for r in select(rows, a)}))
         for a, b in (("snet4", "snet4_seed1"), ("usnet", "usnet_seed1"))]
    d = [abs(x) for x in d if x is not None]
    return max(d) if d else None


def section_noise(rows, plots, noise):
    out = [f"### {EXP_TITLES['noise']}",
           "The same run with seed 0 and seed 1 (initialisation, data order, sampled widths): differences between "
           "methods smaller than this spread say nothing.", ""]
    body, spreads = [], []
    for a, b, label in (("snet4", "snet4_seed1", "S-Net 4-switch"), ("usnet", "usnet_seed1", "US-Net")):
        for r in select(rows, a):
            e1 = err_at(rows, b, r["width"])
            if e1 is None:
                continue
            spreads.append(abs(r["top1_err"] - e1))
            body.append([label, f"{r['width']:g}×", fmt(r["top1_err"]), fmt(e1), fmt(abs(r["top1_err"] - e1))])
    out.append(table(["model", "width", "seed 0 error %", "seed 1 error %", "|difference|"], body))
    if spreads:
        out.append(f"\nSingle widths: mean |difference| {fmt(_mean(spreads), 2)} points, largest "
                   f"{fmt(max(spreads), 2)}. Averaged over the widths: {fmt(measured_noise(rows), 2)} points. The "
                   f"verdicts below count a difference only beyond ±{noise:.1f} points"
                   + (" — single-width verdicts (spread up to "
                      f"{max(spreads):.1f}) need more care." if max(spreads) > noise else "."))
    return out


def schedule_section(sched: str, d: Path, plots_dir: Path, rel: str, noise: float) -> list[str]:
    files = {p.stem: read(p) for p in [*sorted(d.glob("exp*.csv")), *d.glob("noise.csv")]}
    if not files:
        return []
    plots = Plots(plots_dir, rel)
    if noise == "auto":
        m = measured_noise(files["noise"]) if "noise" in files else None
        noise = max(1.0, round(m, 1)) if m is not None else 1.0
    noise = float(noise)
    allrows = [r for k, v in files.items() if not k.endswith("_curves") for r in v]
    hw = sorted({r["hardware"] for r in allrows})
    runs = {}
    for r in allrows:
        runs[r["run"]] = r
    wall = sum(float(r["wall_time_s"]) for r in runs.values())
    epochs = sorted({int(r["epochs"]) for r in allrows})
    seeds = sorted({r["seed"] for r in allrows})
    base = sched.split("_")[0]
    ep = f"{epochs[0]} epoch{'s' if epochs[0] != 1 else ''}" if len(epochs) == 1 else "mixed epochs"
    name = base.upper() + (f" schedule, {ep}" if "_" in sched else " schedule")
    out = [f"## {name}", "",
           f"- Schedule: {SCHEDULE_TEXT.get(base, base).format(epochs=ep)}"
           + (f" (run with `--epochs {epochs[0]}`)" if "_" in sched else "") + ".",
           f"- Hardware: {'; '.join(hw)}.",
           f"- Epochs: {', '.join(map(str, epochs))}; seed(s): {', '.join(map(str, seeds))}; {len(runs)} training runs, "
           f"{wall / 60:.0f} min of run wall time in total (per-run times in the CSVs).",
           f"- Data: CIFAR-10, full 50k training / 10k test split; errors are top-1 test error (%) on all 10k test "
           f"images. MFLOPs are multiply-adds of one 32×32 image.",
           f"- Verdict rule: a difference counts only when it exceeds ±{noise:.1f} top-1 points "
           + ("(the seed-to-seed spread of section 0)" if "noise" in files else "(no seed repeats on this schedule)")
           + "; \"not separated\" otherwise."]
    missing = [EXP_TITLES[e] for e in ("exp1", "exp2", "exp3", "exp4", "exp5") if e not in files]
    if missing:
        out.append(f"- Not run on this schedule: {'; '.join(missing)}.")
    out.append("")
    for exp in ("noise", "exp1", "exp2", "exp3", "exp4", "exp5"):
        if exp not in files:
            continue
        rows = files[exp]
        if exp == "exp1":
            sec = section_exp1(rows, files.get("exp1_curves"), plots, noise)
        else:
            sec = globals()[f"section_{exp}"](rows, plots, noise)
        out += sec + [f"\nData: `results/cifar10/{sched}/{exp}.csv`.", ""]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results" / "cifar10"), help="folder with <schedule>/exp*.csv")
    ap.add_argument("--out", default=str(ROOT / "docs" / "reproduction.md"))
    ap.add_argument("--noise", default="auto",
                    help="top-1 points within which methods are not separated; auto (default): the seed-to-seed "
                         "spread of the width-averaged error (section 0), at least 1.0")
    ap.add_argument("--preamble", default=str(Path(__file__).resolve().parent / "cifar10" / "preamble.md"),
                    help="markdown put before the generated sections")
    a = ap.parse_args(argv)
    res, out = Path(a.results), Path(a.out)
    lines = []
    if Path(a.preamble).exists():
        lines += [Path(a.preamble).read_text().rstrip(), ""]
    found = False
    scheds = sorted((p.name for p in res.iterdir() if p.is_dir() and not p.name.endswith("_smoke")),
                    key=lambda n: (not n.startswith("gpu"), n)) if res.is_dir() else []
    for sched in scheds:
        sec = schedule_section(sched, res / sched, out.parent / "reproduction" / sched,
                               os.path.relpath(out.parent / "reproduction" / sched, out.parent), a.noise)
        found |= bool(sec)
        lines += sec
    if not found:
        raise SystemExit(f"no results under {res}/<schedule>/exp*.csv; run experiments/cifar10/reproduce.py first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
