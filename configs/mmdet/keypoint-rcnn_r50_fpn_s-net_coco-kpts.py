# Slimmable Keypoint R-CNN (S-Net, switches 0.25-1.0x) on $SLIM_DATA/coco_kpts.
_base_ = './keypoint-rcnn_r50_fpn_coco-kpts.py'
model = dict(type='SlimDetector', detector='KeypointRCNN', slimmable=dict(widths=[0.25, 0.5, 0.75, 1.0]))
runner_type = 'SlimRunner'
