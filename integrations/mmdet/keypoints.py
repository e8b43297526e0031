"""Keypoint R-CNN registered into mmdet (Mask R-CNN paper Section 5; Detectron's ``keypoint_rcnn_R-50-FPN``).

mmdet 3.x has no keypoint head; importing this module registers one in mmdet's ``MODELS``:

- ``KeypointRCNN``: a ``TwoStageDetector`` (ResNet + FPN + RPN as in Faster R-CNN) whose RoI head is
- ``KeypointRoIHead``: mmdet's ``StandardRoIHead`` box branch plus a keypoint branch on the same FPN features;
- ``KeypointRCNNHead``: RoIAlign 14x14 features ``(R, 256, 14, 14)`` -> 8 x (conv3x3, 512, ReLU) -> a 4x4 stride-2
  transposed conv -> x2 bilinear upsampling -> ``(R, K, 56, 56)`` heatmap logits (K = 17 for COCO persons).

The keypoint maths is torchvision's (``torchvision.models.detection.roi_heads``): targets are the heatmap cell of
each visible keypoint inside its positive proposal (``keypoints_to_heatmap``), the loss is the cross-entropy of the
spatial softmax at that cell, averaged over visible keypoints (``keypointrcnn_loss``), and decoding upsamples each
heatmap bicubically to its box and takes the arg-max with the half-cell offset (``heatmaps_to_keypoints``). The
head's layers are torchvision's ``KeypointRCNNHeads`` / ``KeypointRCNNPredictor`` (Detectron's init). Predictions
are ``pred_instances.keypoints`` ``(N, K, 2)`` in pixels of the original image and ``keypoint_scores`` ``(N, K)``
(the heatmap logit at the arg-max), next to mmdet's ``bboxes`` / ``scores`` / ``labels``.
"""
from __future__ import annotations

from typing import List, Tuple

from mmdet.models.detectors import TwoStageDetector
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.registry import MODELS
from mmdet.structures.bbox import bbox2roi
from mmdet.models.utils import unpack_gt_instances
from mmengine.model import BaseModule
from torch import Tensor
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
from torchvision.models.detection.roi_heads import keypointrcnn_inference, keypointrcnn_loss

from slim_plugins.errors import InvalidArgumentError

__all__ = ["KeypointRCNN", "KeypointRoIHead", "KeypointRCNNHead"]


@MODELS.register_module()
class KeypointRCNNHead(BaseModule):
    """Keypoint heatmap head of Keypoint R-CNN (Mask R-CNN paper Section 5, "Implementation Details").

    Args:
        num_keypoints: K, heatmaps per RoI (17 for COCO persons).
        in_channels: channels of the RoI features (the FPN's 256).
        conv_out_channels / num_convs: the 8 x (3x3 conv, 512) stack.
        loss_weight: factor on the keypoint cross-entropy.

    Raises:
        InvalidArgumentError: a non-positive size.
    """

    def __init__(self, num_keypoints: int = 17, in_channels: int = 256, conv_out_channels: int = 512,
                 num_convs: int = 8, loss_weight: float = 1.0, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        for name, v in (("num_keypoints", num_keypoints), ("in_channels", in_channels),
                        ("conv_out_channels", conv_out_channels), ("num_convs", num_convs)):
            if not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"KeypointRCNNHead: {name} must be a positive integer, got {v!r}")
        self.num_keypoints = num_keypoints
        self.loss_weight = float(loss_weight)
        self.convs = KeypointRCNNHeads(in_channels, [conv_out_channels] * num_convs)
        self.predictor = KeypointRCNNPredictor(conv_out_channels, num_keypoints)

    def forward(self, x: Tensor) -> Tensor:
        """``(R, C, 14, 14)`` RoI features -> ``(R, K, 56, 56)`` heatmap logits."""
        return self.predictor(self.convs(x))

    def loss(self, logits: Tensor, rois: List[Tensor], gt_keypoints: List[Tensor], matched: List[Tensor]) -> dict:
        """``{'loss_keypoint': ...}``: cross-entropy over each visible keypoint's spatial softmax.

        Args:
            logits: ``(P, K, S, S)`` for the positive proposals of all images, image after image.
            rois: per image, its positive proposals ``(P_i, 4)`` (x1, y1, x2, y2; network input pixels).
            gt_keypoints: per image ``(G_i, K, 3)`` (x, y, visibility; visibility 0 = not labelled).
            matched: per image, the ground truth index of each positive proposal ``(P_i,)``.
        """
        loss = keypointrcnn_loss(logits, rois, [k.to(logits.dtype) for k in gt_keypoints], matched)
        return {"loss_keypoint": self.loss_weight * loss}

    @staticmethod
    def predict_by_feat(logits: Tensor, boxes: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Per image: keypoints ``(N_i, K, 2)`` (pixels of the frame ``boxes`` are in) and scores ``(N_i, K)``."""
        kps, scores = keypointrcnn_inference(logits.float(), [b.float() for b in boxes])
        return [k[..., :2] for k in kps], scores


@MODELS.register_module()
class KeypointRoIHead(StandardRoIHead):
    """mmdet's ``StandardRoIHead`` (box branch) plus a keypoint branch trained on the box sampler's positives.

    Args:
        keypoint_roi_extractor: e.g. ``SingleRoIExtractor`` with ``RoIAlign(output_size=14)`` on the FPN levels.
        keypoint_head: a ``KeypointRCNNHead`` config.
        **kwargs: ``StandardRoIHead``'s (``bbox_roi_extractor``, ``bbox_head``, ``train_cfg``, ``test_cfg``).

    Raises:
        InvalidArgumentError: a mask branch is configured (a keypoint detector has none here).
    """

    def __init__(self, keypoint_roi_extractor: dict, keypoint_head: dict, **kwargs) -> None:
        if kwargs.get("mask_head") is not None:
            raise InvalidArgumentError("KeypointRoIHead has a box and a keypoint branch; mask_head must be None, "
                                       f"got {kwargs['mask_head']!r}")
        super().__init__(**kwargs)
        self.keypoint_roi_extractor = MODELS.build(keypoint_roi_extractor)
        self.keypoint_head = MODELS.build(keypoint_head)

    def _keypoint_forward(self, x: Tuple[Tensor], rois: Tensor) -> Tensor:
        feats = self.keypoint_roi_extractor(x[:self.keypoint_roi_extractor.num_inputs], rois)
        return self.keypoint_head(feats)

    def forward(self, x, rpn_results_list, batch_data_samples=None) -> tuple:
        """mmdet's tensor-mode outputs (box scores, box deltas) plus keypoint logits of the first 100 proposals."""
        out = super().forward(x, rpn_results_list, batch_data_samples)
        rois = bbox2roi([r.bboxes for r in rpn_results_list])[:100]
        return out + (self._keypoint_forward(x, rois),)

    def loss(self, x: Tuple[Tensor], rpn_results_list, batch_data_samples) -> dict:
        """Box losses as ``StandardRoIHead``, plus ``loss_keypoint`` on the positive proposals; the ground truth
        instances need ``keypoints`` ``(G, K, 3)`` (packed by ``PackKeypointDetInputs``)."""
        batch_gt_instances, batch_gt_instances_ignore, _ = unpack_gt_instances(batch_data_samples)
        sampling_results = []
        for i, rpn_results in enumerate(rpn_results_list):  # the same assignment and sampling as StandardRoIHead
            rpn_results.priors = rpn_results.pop("bboxes")
            assign = self.bbox_assigner.assign(rpn_results, batch_gt_instances[i], batch_gt_instances_ignore[i])
            sampling_results.append(self.bbox_sampler.sample(assign, rpn_results, batch_gt_instances[i],
                                                             feats=[lvl[i][None] for lvl in x]))
        losses = dict(self.bbox_loss(x, sampling_results)["loss_bbox"])
        pos = [r.pos_priors for r in sampling_results]
        logits = self._keypoint_forward(x, bbox2roi(pos))
        losses.update(self.keypoint_head.loss(logits, pos, [g.keypoints for g in batch_gt_instances],
                                              [r.pos_assigned_gt_inds for r in sampling_results]))
        return losses

    def predict(self, x: Tuple[Tensor], rpn_results_list, batch_data_samples, rescale: bool = False):
        """Boxes as ``StandardRoIHead`` (scores, labels, bboxes), then ``keypoints`` ``(N, K, 2)`` and
        ``keypoint_scores`` ``(N, K)`` for each kept box; with ``rescale`` both in original-image pixels."""
        metas = [s.metainfo for s in batch_data_samples]
        results_list = self.predict_bbox(x, metas, rpn_results_list, rcnn_test_cfg=self.test_cfg, rescale=False)
        boxes = [r.bboxes for r in results_list]
        k = self.keypoint_head.num_keypoints
        rois = bbox2roi(boxes)
        if rois.shape[0]:
            kps, scores = self.keypoint_head.predict_by_feat(self._keypoint_forward(x, rois), boxes)
        else:
            kps = [b.new_zeros((0, k, 2)) for b in boxes]
            scores = [b.new_zeros((0, k)) for b in boxes]
        for res, meta, kp, sc in zip(results_list, metas, kps, scores):
            if rescale:  # network input pixels -> original image pixels, as mmdet's bbox head rescales
                sf = res.bboxes.new_tensor(meta["scale_factor"])
                res.bboxes = res.bboxes / sf.repeat(2)
                kp = kp / sf
            res.keypoints, res.keypoint_scores = kp, sc
        return results_list


@MODELS.register_module()
class KeypointRCNN(TwoStageDetector):
    """Keypoint R-CNN (He et al., "Mask R-CNN", Section 5): Faster R-CNN with a ``KeypointRoIHead``."""
