# Slimmable Mask R-CNN R50-FPN 1x on full COCO 2017 (S-Net, switches 0.25-1.0x, Algorithm 1): Slimmable Networks Table 5 / Appendix B.
# The backbone starts from a slimmable ImageNet ResNet-50 written by `slim train` (timm s_resnet50) with the same
# widths; its per-switch BN statistics stay frozen (norm_eval=True, as in the paper).
#   COCO_ROOT=/data/coco/ SLIM_BACKBONE=output/s_resnet50/last.pth.tar python $(mmdet tools)/train.py THIS_FILE
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)
model = dict(type='SlimDetector', detector='MaskRCNN', slimmable=dict(widths=[0.25, 0.5, 0.75, 1.0]),
             backbone=dict(init_cfg=dict(type='SlimPretrained', checkpoint='{{$SLIM_BACKBONE:s_resnet50.pth.tar}}'))
runner_type = 'SlimRunner'

data_root = '{{$COCO_ROOT:data/coco/}}'
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator
