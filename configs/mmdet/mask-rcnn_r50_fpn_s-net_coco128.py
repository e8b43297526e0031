# Slimmable Mask R-CNN (S-Net, switches 0.25-1.0x) on coco128.
_base_ = './mask-rcnn_r50_fpn_coco128.py'
custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)
model = dict(type='SlimDetector', detector='MaskRCNN', slimmable=dict(widths=[0.25, 0.5, 0.75, 1.0]))
runner_type = 'SlimRunner'
