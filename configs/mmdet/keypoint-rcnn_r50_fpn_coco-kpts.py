# Keypoint R-CNN R50-FPN on $SLIM_DATA/coco_kpts (real COCO images: 4 train with 7 persons / 4 val with 14 persons,
# 17 keypoints each), scaled for a CPU: short side 320, from scratch (no ImageNet weights on these machines), BN
# trained (norm_eval=False). The individually trained detector of one width: --cfg-options
# model.backbone.base_channels=16 model.neck.in_channels=[64,128,256,512] is the 0.25x one.
_base_ = './keypoint-rcnn_r50_fpn_1x_coco.py'

data_root = '{{$SLIM_DATA:data}}/coco_kpts/'
scale = (512, 320)
model = dict(backbone=dict(norm_eval=False, frozen_stages=-1, init_cfg=None))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadKeypointAnnotations', with_bbox=True),
    dict(type='KeypointResize', scale=scale, keep_ratio=True),
    dict(type='KeypointRandomFlip', prob=0.5),
    dict(type='PackKeypointDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='KeypointResize', scale=scale, keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
train_dataloader = dict(
    batch_size=2, num_workers=0, persistent_workers=False, batch_sampler=None,
    dataset=dict(data_root=data_root, ann_file='annotations/person_keypoints_train.json',
                 data_prefix=dict(img='train/'), filter_cfg=dict(filter_empty_gt=True, min_size=0),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='annotations/person_keypoints_val.json',
                 data_prefix=dict(img='val/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/person_keypoints_val.json')
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=200, val_interval=200)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=200, by_epoch=True, milestones=[150], gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=0.01), clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=50, max_keep_ckpts=2))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
custom_hooks = [dict(type='PlainMessageHubHook')]
