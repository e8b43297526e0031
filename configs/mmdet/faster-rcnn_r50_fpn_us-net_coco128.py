# Universally slimmable Faster R-CNN (US-Net, any width in 0.25-1.0x; sandwich rule with 4 widths per iteration,
# BN post-statistics before every evaluation) on coco128.
_base_ = './faster-rcnn_r50_fpn_coco128.py'
custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)
model = dict(type='SlimDetector', detector='FasterRCNN', slimmable=dict(width_range=[0.25, 1.0], num_widths=4, calib_samples=100))
runner_type = 'SlimRunner'
