# Keypoint R-CNN R50-FPN 1x on full COCO 2017 person keypoints (Mask R-CNN paper Section 5, Detectron's
# keypoint_rcnn_R-50-FPN): the individually trained detector. mmdet has no keypoint head; importing
# slim_plugins.integrations.mmdet registers KeypointRCNN, its head, the keypoint dataset/transforms and
# CocoKeypointMetric. Training: multi-scale short side 640-800 as Detectron, mmdet's 1x schedule (12 epochs).
#   COCO_ROOT=/data/coco/ python $(mmdet tools)/train.py THIS_FILE
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py', 'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py', 'mmdet::_base_/default_runtime.py'
]
custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)

model = dict(
    type='KeypointRCNN',
    roi_head=dict(
        type='KeypointRoIHead',
        bbox_head=dict(num_classes=1),
        keypoint_roi_extractor=dict(
            type='SingleRoIExtractor',
            roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
            out_channels=256,
            featmap_strides=[4, 8, 16, 32]),
        keypoint_head=dict(type='KeypointRCNNHead', num_keypoints=17, in_channels=256, conv_out_channels=512,
                           num_convs=8)))

dataset_type = 'CocoKeypointDataset'
data_root = '{{$COCO_ROOT:data/coco/}}'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadKeypointAnnotations', with_bbox=True),
    dict(type='RandomChoiceResize', resize_type='KeypointResize', keep_ratio=True,
         scales=[(1333, 640), (1333, 672), (1333, 704), (1333, 736), (1333, 768), (1333, 800)]),
    dict(type='KeypointRandomFlip', prob=0.5),
    dict(type='PackKeypointDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='KeypointResize', scale=(1333, 800), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='annotations/person_keypoints_train2017.json',
                 data_prefix=dict(img='train2017/'), pipeline=train_pipeline))
val_dataloader = dict(
    dataset=dict(type=dataset_type, data_root=data_root, ann_file='annotations/person_keypoints_val2017.json',
                 data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoKeypointMetric', metric=['bbox', 'keypoints'],
                     ann_file=data_root + 'annotations/person_keypoints_val2017.json')
test_evaluator = val_evaluator
