# Slimmable Faster R-CNN (S-Net, switches 0.25-1.0x) on coco128: the three lines a user adds to a config.
# The detector is slimmable from the moment it is built: mmdet's init_detector, DetInferencer and tools build it too.
_base_ = './faster-rcnn_r50_fpn_coco128.py'
custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)
model = dict(type='SlimDetector', detector='FasterRCNN', slimmable=dict(widths=[0.25, 0.5, 0.75, 1.0]))
runner_type = 'SlimRunner'
