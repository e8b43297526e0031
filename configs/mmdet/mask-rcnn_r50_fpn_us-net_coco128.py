# Universally slimmable Mask R-CNN (US-Net, 0.25-1.0x, sandwich rule, post-statistics) on coco128.
_base_ = './mask-rcnn_r50_fpn_coco128.py'
custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)
model = dict(type='SlimDetector', detector='MaskRCNN', slimmable=dict(width_range=[0.25, 1.0], num_widths=4, calib_samples=100))
runner_type = 'SlimRunner'
