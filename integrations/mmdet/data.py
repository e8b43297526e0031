"""A COCO dataset type for annotation files whose annotation ids repeat.

mmdet's ``CocoDataset`` asserts unique annotation ids, and pycocotools indexes annotations by id, so a repeated
id would hand one image's box to another. The COCO-128 val JSON in ``$SLIM_DATA`` has 6 repeated ids (of 712):
this type gives every repeat a fresh id before the index is built. Evaluate such data with ``CocoMetric`` and
``ann_file=None`` (ground truth from the dataset), since the metric reads the JSON with the plain COCO API.
"""
from __future__ import annotations

from mmdet.datasets import CocoDataset
from mmdet.datasets.api_wrappers import COCO
from mmdet.registry import DATASETS

__all__ = ["CocoDatasetUniqueIds", "renumber_annotation_ids"]


def renumber_annotation_ids(dataset: dict) -> int:
    """Give every repeated annotation id of a COCO JSON ``dataset`` (in place) a fresh id above the largest one,
    in file order (the first occurrence keeps its id). Returns the number of ids changed."""
    anns = dataset.get("annotations", [])
    seen, fresh, changed = set(), max((a["id"] for a in anns), default=0) + 1, 0
    for a in anns:
        if a["id"] in seen:
            a["id"], fresh, changed = fresh, fresh + 1, changed + 1
        seen.add(a["id"])
    return changed


class _RenumberedCOCO(COCO):
    def createIndex(self):  # noqa: N802  pycocotools' name
        renumber_annotation_ids(self.dataset)
        super().createIndex()


@DATASETS.register_module()
class CocoDatasetUniqueIds(CocoDataset):
    """``CocoDataset`` that renumbers repeated annotation ids (each annotation stays on its own image)."""

    COCOAPI = _RenumberedCOCO
