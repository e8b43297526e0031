"""Slimmable Faster R-CNN R50-FPN vs the plain mmdet detectors exported from it, same process, interleaved.

1. inference (``mode='predict'``: backbone, FPN, RPN, RoI head, NMS) at each switch vs the plain detector that
   ``export_detector`` writes for that switch, loaded by ``mmdet.apis.init_detector``      target <= 1.02x
2. one 4-width training step (forward + loss + backward per width, gradients accumulated) vs the sum of one step
   of each of the four plain detectors; the optimizer step is excluded from both            target <= 1.05x
3. peak bytes of autograd-saved tensors of the 4-width step vs one step at width 1.0         target <= 1.1x

Real coco128 images (a batch of ``--batch`` train images at the config's 512x320 scale) through mmdet's own
pipeline and data preprocessor.

    python benchmarks/bench_mmdet.py [--threads 1 --clock thread] [--rounds 5] [--batch 2]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import CLOCK, env_line, interleaved, med, min_ratio, paired_ratio, table, verdict  # noqa: E402
from bench_memory import SavedTensorPeak  # noqa: E402

import slim_plugins as slim  # noqa: E402
from slim_plugins.integrations import mmdet as smd  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "mmdet", "faster-rcnn_r50_fpn_s-net_coco128.py")
WIDTHS = [1.0, 0.75, 0.5, 0.25]


def build(batch: int):
    from mmengine.config import Config
    from mmengine.registry import RUNNERS

    cfg = Config.fromfile(CONFIG)
    cfg.work_dir = tempfile.mkdtemp(prefix="bench_mmdet_")
    cfg.train_dataloader.batch_size = batch
    cfg.train_dataloader.num_workers = 0
    cfg.visualizer.name = f"bench:{cfg.work_dir}"
    runner = RUNNERS.build(cfg)
    data = next(iter(runner.build_dataloader(cfg.train_dataloader, seed=0)))
    return runner, cfg, data


def plain_detectors(model, cfg, out_dir):
    from mmdet.apis import init_detector

    plains = {}
    for w in WIDTHS:
        res = smd.export_detector(model, cfg, w, os.path.join(out_dir, f"w{w:g}"))
        plains[w] = init_detector(res["config"], res["checkpoint"], device="cpu").eval()
    return plains


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "thread"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    CLOCK[0] = args.clock
    torch.manual_seed(0)
    print(env_line(), flush=True)
    print("# " + " ".join(sys.argv), flush=True)

    runner, cfg, batch = build(args.batch)
    model = runner.model.eval()
    plains = plain_detectors(model, cfg, runner.work_dir)
    data = model.data_preprocessor(copy.deepcopy(batch), False)
    print(f"# input {tuple(data['inputs'].shape)}, {len(WIDTHS)} switches", flush=True)

    # 1. inference
    rows = []
    with torch.no_grad():
        for w in WIDTHS:
            def dyn(w=w):
                with slim.width(w):
                    return model(**data, mode="predict")

            def plain(w=w):
                return plains[w](**data, mode="predict")

            t = interleaved({"dyn": dyn, "plain": plain}, args.rounds)
            r = paired_ratio(t["dyn"], t["plain"])
            rows.append({"width": f"{w:g}", "plain ms": med(t["plain"]) * 1e3, "dynamic ms": med(t["dyn"]) * 1e3,
                         "dyn/plain": r, "min ratio": min_ratio(t["dyn"], t["plain"]), "<= 1.02": verdict(r, 1.02)})
    print("\n## 1. inference per batch (predict mode)\n" + table(rows, list(rows[0])), flush=True)

    # 2. training step
    model.train()
    for m in plains.values():
        m.train()
    tdata = model.data_preprocessor(copy.deepcopy(batch), True)

    class Fixed(slim.MultiWidthStep):
        def widths(self, iteration):
            return list(WIDTHS)

    step = Fixed(model, rule="all")

    def slim_step():
        model.zero_grad(set_to_none=True)
        for p_ in step.iterate():
            with p_:
                losses = model(**tdata, mode="loss")
                loss = p_.loss(None, losses)
            loss.backward()

    def plain_steps():
        for m in plains.values():
            m.zero_grad(set_to_none=True)
            losses = m(**tdata, mode="loss")
            loss, _ = m.parse_losses(losses)
            loss.backward()

    t = interleaved({"slim": slim_step, "plain": plain_steps}, args.rounds)
    r = paired_ratio(t["slim"], t["plain"])
    row = {"4-width step s": med(t["slim"]), "sum of 4 plain steps s": med(t["plain"]), "ratio": r,
           "min ratio": min_ratio(t["slim"], t["plain"]), "<= 1.05": verdict(r, 1.05)}
    print("\n## 2. training step (forward + loss + backward)\n" + table([row], list(row)), flush=True)

    # 3. memory: saved-for-backward bytes
    params = {p_.untyped_storage().data_ptr() for p_ in model.parameters()}

    def peak(fn):
        model.zero_grad(set_to_none=True)
        s = SavedTensorPeak(params)
        with s.hooks():
            fn()
        return s.peak

    class One(slim.MultiWidthStep):
        def widths(self, iteration):
            return [1.0]

    one = One(model, rule="all")

    def one_step():
        for p_ in one.iterate():
            with p_:
                loss = p_.loss(None, model(**tdata, mode="loss"))
            loss.backward()

    single, multi = peak(one_step), peak(slim_step)
    row = {"1 width MiB": single / 2**20, "4 widths MiB": multi / 2**20, "ratio": multi / single,
           "<= 1.1": verdict(multi / single, 1.1)}
    print("\n## 3. peak autograd-saved bytes\n" + table([row], list(row)), flush=True)


if __name__ == "__main__":
    main()
