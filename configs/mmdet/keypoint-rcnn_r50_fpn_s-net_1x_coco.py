# Slimmable Keypoint R-CNN R50-FPN 1x on full COCO person keypoints (S-Net, switches 0.25-1.0x, Algorithm 1):
# Slimmable Networks Table 5. The backbone starts from a slimmable ImageNet ResNet-50 written by `slim train`
# (timm s_resnet50) with the same widths; its per-switch BN statistics stay frozen (norm_eval=True, as the paper).
#   COCO_ROOT=/data/coco/ SLIM_BACKBONE=output/s_resnet50/last.pth.tar python $(mmdet tools)/train.py THIS_FILE
_base_ = './keypoint-rcnn_r50_fpn_1x_coco.py'
model = dict(type='SlimDetector', detector='KeypointRCNN', slimmable=dict(widths=[0.25, 0.5, 0.75, 1.0]),
             backbone=dict(init_cfg=dict(type='SlimPretrained', checkpoint='{{$SLIM_BACKBONE:s_resnet50.pth.tar}}'))
runner_type = 'SlimRunner'
