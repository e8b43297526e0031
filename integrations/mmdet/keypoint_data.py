"""COCO person keypoints through mmdet's data pipeline, and COCO keypoint AP as an mmengine metric.

mmdet's ``CocoDataset`` keeps boxes and masks; these registered pieces carry keypoints ``(x, y, visibility)``:

- ``CocoKeypointDataset`` (mmdet ``DATASETS``): each instance gains ``keypoints`` ``(K, 3)``; each image gains
  ``flip_indices`` (left <-> right, from the keypoint names in the JSON's category);
- transforms (mmdet ``TRANSFORMS``): ``LoadKeypointAnnotations`` (``gt_keypoints`` ``(N, K, 3)`` float32),
  ``KeypointResize`` and ``KeypointRandomFlip`` (mmdet's ``Resize`` / ``RandomFlip`` that also move keypoints; the
  flip swaps left/right keypoints), ``PackKeypointDetInputs`` (``gt_instances.keypoints``);
- ``CocoKeypointMetric`` (mmdet ``METRICS``): mmdet's ``CocoMetric`` (box AP) plus pycocotools' keypoint AP
  (``iouType='keypoints'``, OKS with the 17 COCO sigmas), as ``coco/keypoints_mAP`` etc. (fractions, 0-1).

Other mmdet transforms (crops, mosaic, ...) do not move keypoints: use these four in a keypoint pipeline.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
from mmdet.datasets import CocoDataset
from mmdet.datasets.transforms import LoadAnnotations, PackDetInputs, RandomFlip, Resize
from mmdet.evaluation import CocoMetric
from mmdet.registry import DATASETS, METRICS, TRANSFORMS
from mmengine.fileio import dump, load
from mmengine.logging import MMLogger

from slim_plugins.errors import InvalidArgumentError

__all__ = ["CocoKeypointDataset", "LoadKeypointAnnotations", "KeypointResize", "KeypointRandomFlip",
           "PackKeypointDetInputs", "CocoKeypointMetric", "flip_indices", "coco_keypoint_sigmas"]


def coco_keypoint_sigmas() -> np.ndarray:
    """The 17 per-keypoint OKS sigmas of COCO person keypoints, as pycocotools defines them (``(17,)``)."""
    from pycocotools.cocoeval import Params

    return np.asarray(Params(iouType="keypoints").kpt_oks_sigmas, dtype=np.float64)


def flip_indices(names: Sequence[str]) -> List[int]:
    """For each keypoint, the index of its mirror image: ``left_x`` <-> ``right_x``; others map to themselves.

    Raises:
        InvalidArgumentError: a ``left_`` keypoint whose ``right_`` partner is missing (or the reverse).
    """
    names = list(names)
    out = []
    for n in names:
        m = n.replace("left", "\0").replace("right", "left").replace("\0", "right")
        if m not in names:
            raise InvalidArgumentError(f"keypoint {n!r} has no mirror keypoint {m!r} among {names}")
        out.append(names.index(m))
    return out


@DATASETS.register_module()
class CocoKeypointDataset(CocoDataset):
    """``CocoDataset`` of COCO person keypoints: instances carry ``keypoints`` ``(K, 3)`` (list of lists), images
    carry ``flip_indices``; ``metainfo`` gains ``keypoint_names`` and ``flip_indices`` from the JSON category."""

    METAINFO = {"classes": ("person",), "palette": [(220, 20, 60)]}

    def parse_data_info(self, raw_data_info: dict) -> dict:
        data_info = super().parse_data_info(raw_data_info)
        names = self._keypoint_names()
        img = raw_data_info["raw_img_info"]
        kept = [a for a in raw_data_info["raw_ann_info"] if self._kept_by_coco_dataset(a, img)]
        if len(kept) != len(data_info["instances"]):  # mmdet's filter changed: refuse to mis-pair keypoints
            raise RuntimeError(f"image {img['img_id']}: {len(kept)} annotations kept here, "
                               f"{len(data_info['instances'])} by mmdet's CocoDataset")
        for inst, ann in zip(data_info["instances"], kept):
            kp = np.asarray(ann.get("keypoints") or [0.0] * (3 * len(names)), dtype=np.float32).reshape(-1, 3)
            if kp.shape[0] != len(names):
                raise InvalidArgumentError(f"annotation {ann.get('id')}: {kp.shape[0]} keypoints, the category "
                                           f"names {len(names)}")
            inst["keypoints"] = kp.tolist()
        data_info["flip_indices"] = self._metainfo["flip_indices"]
        return data_info

    def _keypoint_names(self) -> list:
        if "keypoint_names" not in self._metainfo:
            cat = self.coco.cats[self.cat_ids[0]]
            if not cat.get("keypoints"):
                raise InvalidArgumentError(f"category {cat.get('name')!r} of {self.ann_file} names no keypoints; "
                                           "CocoKeypointDataset needs a COCO keypoint JSON")
            self._metainfo["keypoint_names"] = list(cat["keypoints"])
            self._metainfo["flip_indices"] = flip_indices(cat["keypoints"])
        return self._metainfo["keypoint_names"]

    def _kept_by_coco_dataset(self, ann: dict, img: dict) -> bool:
        """The conditions under which mmdet 3.3's ``CocoDataset.parse_data_info`` keeps an annotation."""
        if ann.get("ignore", False):
            return False
        x1, y1, w, h = ann["bbox"]
        inter_w = max(0, min(x1 + w, img["width"]) - max(x1, 0))
        inter_h = max(0, min(y1 + h, img["height"]) - max(y1, 0))
        return inter_w * inter_h > 0 and ann["area"] > 0 and w >= 1 and h >= 1 and ann["category_id"] in self.cat_ids


@TRANSFORMS.register_module()
class LoadKeypointAnnotations(LoadAnnotations):
    """mmdet's ``LoadAnnotations`` plus ``gt_keypoints`` ``(N, K, 3)`` float32 from the instances' ``keypoints``."""

    def transform(self, results: dict) -> dict:
        results = super().transform(results)
        kps = [inst["keypoints"] for inst in results.get("instances", [])]
        k = len(kps[0]) if kps else len(results.get("flip_indices", ()))
        results["gt_keypoints"] = np.asarray(kps, dtype=np.float32).reshape(-1, k, 3)
        return results


@TRANSFORMS.register_module()
class KeypointResize(Resize):
    """mmdet's ``Resize`` that also scales ``gt_keypoints`` (x, y by the scale factor; visibility kept)."""

    def transform(self, results: dict) -> dict:
        results = super().transform(results)
        kp = results.get("gt_keypoints")
        if kp is not None:
            kp = kp.copy()
            kp[..., :2] *= np.asarray(results["scale_factor"], dtype=np.float32)
            results["gt_keypoints"] = kp
        return results


@TRANSFORMS.register_module()
class KeypointRandomFlip(RandomFlip):
    """mmdet's ``RandomFlip`` (horizontal only) that also mirrors ``gt_keypoints``: ``x -> W - x`` (mmdet's box
    convention) and left/right keypoints swap places by ``results['flip_indices']`` (set by
    ``CocoKeypointDataset``).

    Raises:
        InvalidArgumentError: a direction other than ``'horizontal'``.
        KeyError: a flipped image whose results have no ``flip_indices``.
    """

    def __init__(self, prob=None, direction="horizontal") -> None:
        dirs = direction if isinstance(direction, (list, tuple)) else [direction]
        if any(d != "horizontal" for d in dirs):
            raise InvalidArgumentError(f"KeypointRandomFlip flips horizontally only, got direction={direction!r}")
        super().__init__(prob=prob, direction=direction)

    def _flip(self, results: dict) -> None:
        super()._flip(results)
        kp = results.get("gt_keypoints")
        if kp is None or not len(kp):
            return
        if "flip_indices" not in results:
            raise KeyError("KeypointRandomFlip needs results['flip_indices'] (CocoKeypointDataset sets it)")
        kp = kp[:, results["flip_indices"]].copy()
        kp[..., 0] = np.where(kp[..., 2] > 0, results["img"].shape[1] - kp[..., 0], 0.0)
        results["gt_keypoints"] = kp


@TRANSFORMS.register_module()
class PackKeypointDetInputs(PackDetInputs):
    """mmdet's ``PackDetInputs`` that also packs ``gt_keypoints`` as ``gt_instances.keypoints`` ``(N, K, 3)``."""

    mapping_table = dict(PackDetInputs.mapping_table, gt_keypoints="keypoints")


@METRICS.register_module()
class CocoKeypointMetric(CocoMetric):
    """COCO box AP (mmdet's ``CocoMetric``) and keypoint AP (pycocotools ``COCOeval(iouType='keypoints')``).

    Args:
        metric: any of mmdet's (``'bbox'``, ...) plus ``'keypoints'``; default both ``['bbox', 'keypoints']``.
        sigmas: per-keypoint OKS sigmas; default the 17 COCO ones (``coco_keypoint_sigmas()``).
        **kwargs: ``CocoMetric``'s (``ann_file``, ``outfile_prefix``, ...). With ``ann_file=None`` the ground truth
            comes from the data samples' ``instances`` (pack ``'instances'`` in ``meta_keys``; areas are then box
            areas, not COCO's segment areas, so OKS differs slightly from the official evaluation).

    Keys (fractions 0-1): ``keypoints_mAP``, ``keypoints_mAP_50``, ``keypoints_mAP_75``, ``keypoints_mAP_m``,
    ``keypoints_mAP_l``, ``keypoints_AR`` (20 detections per image, as COCO), under the ``coco/`` prefix.

    Raises:
        InvalidArgumentError: ``sigmas`` of the wrong length at evaluation, or not positive.
    """

    _KP_STATS = {"mAP": 0, "mAP_50": 1, "mAP_75": 2, "mAP_m": 3, "mAP_l": 4, "AR": 5}

    def __init__(self, metric=("bbox", "keypoints"), sigmas: Sequence[float] | None = None, **kwargs) -> None:
        metrics = [metric] if isinstance(metric, str) else list(metric)
        self.with_keypoints = "keypoints" in metrics
        others = [m for m in metrics if m != "keypoints"]
        super().__init__(metric=others or "bbox", **kwargs)
        self.metrics = others
        self.sigmas = coco_keypoint_sigmas() if sigmas is None else np.asarray(sigmas, dtype=np.float64)
        if self.sigmas.ndim != 1 or not np.all(self.sigmas > 0):
            raise InvalidArgumentError(f"sigmas must be a list of positive numbers, got {sigmas!r}")

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        n0 = len(self.results)
        super().process(data_batch, data_samples)
        for (gt, res), sample in zip(self.results[n0:], data_samples):
            pred = sample["pred_instances"]
            if "keypoints" in pred:
                res["keypoints"] = pred["keypoints"].cpu().numpy()
                res["keypoint_scores"] = pred["keypoint_scores"].cpu().numpy()

    def gt_to_coco_json(self, gt_dicts: Sequence[dict], outfile_prefix: str) -> str:
        path = super().gt_to_coco_json(gt_dicts, outfile_prefix)
        coco = load(path)
        anns = [a for g in gt_dicts for a in g["anns"]]
        for converted, ann in zip(coco.get("annotations", []), anns):  # same order: mmdet writes one per instance
            kp = np.asarray(ann.get("keypoints", []), dtype=np.float64).reshape(-1, 3)
            converted["keypoints"] = kp.reshape(-1).tolist()
            converted["num_keypoints"] = int((kp[:, 2] > 0).sum())
        dump(coco, path)
        return path

    def compute_metrics(self, results: list) -> Dict[str, float]:
        out = super().compute_metrics(results) if self.metrics else {}
        if self.with_keypoints:
            out.update(self._keypoint_metrics(results))
        return out

    def _keypoint_metrics(self, results: list) -> Dict[str, float]:
        from pycocotools.cocoeval import COCOeval

        logger = MMLogger.get_current_instance()
        if self._coco_api is None:  # box metrics were not asked for: build the ground truth here
            import tempfile

            from mmdet.datasets.api_wrappers import COCO

            with tempfile.TemporaryDirectory() as d:
                self._coco_api = COCO(self.gt_to_coco_json([g for g, _ in results], f"{d}/results"))
        if self.cat_ids is None:
            self.cat_ids = self._coco_api.get_cat_ids(cat_names=self.dataset_meta["classes"])
        if self.img_ids is None:
            self.img_ids = self._coco_api.get_img_ids()
        dets = []
        for idx, (_, res) in enumerate(results):
            if "keypoints" not in res:
                continue
            for kp, ks, score, label in zip(res["keypoints"], res["keypoint_scores"], res["scores"], res["labels"]):
                flat = np.concatenate([kp, ks[:, None]], axis=1).reshape(-1)
                dets.append({"image_id": res.get("img_id", idx), "category_id": self.cat_ids[label],
                             "keypoints": [float(v) for v in flat], "score": float(score)})
        if self.format_only:  # results only, as CocoMetric does for boxes
            path = f"{self.outfile_prefix}.keypoints.json"
            dump(dets, path)
            logger.info(f"keypoint results written to {path}")
            return {}
        if not dets:
            logger.error("no keypoint detections: keypoint AP not computed")
            return {}
        k = len(dets[0]["keypoints"]) // 3
        if len(self.sigmas) != k:
            raise InvalidArgumentError(f"{len(self.sigmas)} OKS sigmas for {k} keypoints")
        ev = COCOeval(self._coco_api, self._coco_api.loadRes(dets), "keypoints")
        ev.params.kpt_oks_sigmas = self.sigmas
        ev.params.catIds, ev.params.imgIds = self.cat_ids, self.img_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        logger.info("keypoints_mAP_copypaste: " + " ".join(f"{v:.3f}" for v in ev.stats[:5]))
        return {f"keypoints_{k}": float(round(ev.stats[i], 3)) for k, i in self._KP_STATS.items()}
