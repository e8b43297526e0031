"""A BasicSR dataset that makes the LR image from an HR-only folder with MATLAB-style bicubic downscaling.

BasicSR's ``PairedImageDataset`` needs LR files on disk; ``$SLIM_DATA/sr/train_hr`` (and DIV2K HR without its
LR folders) has only HR photographs. This reads the HR image with BasicSR's file client, crops the GT patch
(train) or mod-crops the whole image (val), and makes the LR with ``basicsr.utils.matlab_functions.imresize``
(MATLAB's ``imresize(..., 1/scale, 'bicubic')``, the degradation of the DIV2K/Set5 ``LR_bicubic`` files).
"""
from __future__ import annotations

import random

import numpy as np
from torch.utils import data

from basicsr.data.data_util import paths_from_folder
from basicsr.data.transforms import augment, mod_crop
from basicsr.utils import FileClient, imfrombytes, img2tensor
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY


@DATASET_REGISTRY.register()
class BicubicHRDataset(data.Dataset):
    """HR folder -> ``{'lq': (3, h, w), 'gt': (3, scale*h, scale*w), 'lq_path', 'gt_path'}`` in [0, 1], RGB.

    Options (BasicSR dataset keys): ``dataroot_gt`` (folder of HR images), ``io_backend``, ``scale`` (set by
    BasicSR from the top-level ``scale``), ``phase``; train: ``gt_size`` (GT patch side, a multiple of
    ``scale``), ``use_hflip``, ``use_rot``. The LR of a training patch is the bicubic downscale of the cropped GT
    patch (crop first: a whole-image downscale per sample would dominate the step on CPU); only the outermost
    LR pixels of a patch differ from a crop of the whole-image downscale.

    Raises:
        ValueError: an empty folder, or ``gt_size`` not a positive multiple of ``scale``.
    """

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.scale = int(opt["scale"])
        self.io_backend_opt = dict(opt.get("io_backend") or {"type": "disk"})
        self.file_client = None
        self.paths = sorted(paths_from_folder(opt["dataroot_gt"]))
        if not self.paths:
            raise ValueError(f"no images in dataroot_gt={opt['dataroot_gt']!r}")
        if opt["phase"] == "train":
            gs = opt.get("gt_size")
            if not isinstance(gs, int) or gs <= 0 or gs % self.scale:
                raise ValueError(f"gt_size must be a positive multiple of scale={self.scale}, got {gs!r}")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        if self.file_client is None:
            opt = dict(self.io_backend_opt)
            self.file_client = FileClient(opt.pop("type"), **opt)
        path = self.paths[index]
        gt = imfrombytes(self.file_client.get(path, "gt"), float32=True)  # HWC, BGR, [0, 1]
        if self.opt["phase"] == "train":
            gs = self.opt["gt_size"]
            h, w = gt.shape[:2]
            if h < gs or w < gs:
                raise ValueError(f"{path}: image {w}x{h} is smaller than gt_size={gs}")
            top, left = random.randint(0, h - gs), random.randint(0, w - gs)
            gt = augment(gt[top:top + gs, left:left + gs], self.opt.get("use_hflip", False),
                         self.opt.get("use_rot", False))
        else:
            gt = mod_crop(gt, self.scale)
        gt = np.ascontiguousarray(gt)
        lq = np.clip(imresize(gt, 1 / self.scale), 0, 1)
        # PNG LR files hold 8-bit values: quantise the same way so train and test inputs match
        lq = (np.round(lq * 255) / 255).astype(np.float32)
        gt_t, lq_t = img2tensor([gt, lq], bgr2rgb=True, float32=True)
        return {"lq": lq_t, "gt": gt_t, "lq_path": path, "gt_path": path}
