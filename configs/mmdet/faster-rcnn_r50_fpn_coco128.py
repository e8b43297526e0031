# Faster R-CNN R50-FPN on $SLIM_DATA/coco128 (100 train / 100 val real COCO images), scaled for a CPU: short side
# 320, from scratch (no ImageNet weights on these machines), BN trained (norm_eval=False). The individually trained
# baseline of one width: --cfg-options model.backbone.base_channels=16 model.neck.in_channels=[64,128,256,512]
# is the 0.25x detector. The slimmable configs below inherit everything from here.
custom_imports = dict(imports=['slim_plugins.integrations.mmdet'], allow_failed_imports=False)
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

data_root = '{{$SLIM_DATA:data}}/coco128/'
scale = (512, 320)
model = dict(backbone=dict(norm_eval=False, frozen_stages=-1, init_cfg=None))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'instances'))
]
train_dataloader = dict(
    batch_size=2, num_workers=1, persistent_workers=False,
    dataset=dict(data_root=data_root, ann_file='annotations/instances_train2017.json',
                 data_prefix=dict(img='train2017/'), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=1, persistent_workers=False,
    dataset=dict(type='CocoDatasetUniqueIds', data_root=data_root, ann_file='annotations/instances_val2017.json',
                 data_prefix=dict(img='val2017/'), pipeline=test_pipeline))
test_dataloader = val_dataloader
# The coco128 val JSON repeats 6 annotation ids: CocoDatasetUniqueIds renumbers them, and CocoMetric takes its
# ground truth from the dataset (ann_file=None) instead of re-reading the JSON.
val_evaluator = dict(ann_file=None)
test_evaluator = val_evaluator

train_cfg = dict(max_epochs=12, val_interval=12)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=100),
    dict(type='MultiStepLR', begin=0, end=12, by_epoch=True, milestones=[8, 11], gamma=0.1)
]
optim_wrapper = dict(optimizer=dict(lr=0.01), clip_grad=dict(max_norm=35, norm_type=2))
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=4, max_keep_ckpts=2))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
# mmengine 0.10.7 pickles its message hub in a form torch's weights_only loader refuses: this hook (registered by
# SlimRunner anyway) writes it as plain data so tools/test.py and resume load these checkpoints safely.
custom_hooks = [dict(type='PlainMessageHubHook')]
