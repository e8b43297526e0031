"""Run by ``torch.distributed.run`` from test_mmdet_ddp: a US Faster R-CNN trained for a few iterations under
mmengine's DDP (``launcher='pytorch'``, gloo on CPU); each rank writes the widths it trained per iteration and a
checksum of its parameters to ``OUT/rank<r>.json``."""
import json
import os
import sys

import torch
from mmengine.hooks import Hook
from mmengine.registry import RUNNERS

sys.path.insert(0, os.path.dirname(__file__))
from mmdet_utils import small_cfg  # noqa: E402


class Record(Hook):
    def __init__(self):
        self.widths = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.widths.append(runner.message_hub.get_info("slim_widths"))


def main(out):
    torch.set_num_threads(1)
    cfg = small_cfg("faster-rcnn_r50_fpn_us-net_coco128.py", os.path.join(out, "work"), n_train=4, iters=3,
                    depth=18)
    cfg.launcher = "pytorch"
    cfg.env_cfg = dict(dist_cfg=dict(backend="gloo"))
    runner = RUNNERS.build(cfg)
    rec = Record()
    runner.register_hook(rec)
    runner.train()
    model = runner.model.module
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    with open(os.path.join(out, f"rank{runner.rank}.json"), "w") as f:
        json.dump({"widths": rec.widths, "checksum": checksum, "wrapper": type(runner.model).__name__}, f)


if __name__ == "__main__":
    main(sys.argv[1])
