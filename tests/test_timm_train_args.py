"""The timm trainer as a timm user meets it: timm train.py's args.yaml runs; EMA, gradient accumulation, gradient
checkpointing, BCE + mixup/cutmix + AMP, checkpoint history, initial_checkpoint and torch.compile do what timm's
flags do, per width."""
from __future__ import annotations

import csv
import threading
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

import slim_plugins as slim
from slim_plugins.errors import ConfigError
from slim_plugins.integrations.timm import train as T
from slim_plugins.integrations.timm.config import DEFAULTS, REJECTED, TIMM_ARGS

from test_trainer import run_cli


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


SLIM = {"slimmable": True, "width_range": [0.35, 1.0], "num_widths": 3, "inplace_distill": True}
# a small digits job: 192 images = 3 updates of 64 per epoch
SMALL = {"train_num_samples": 192, "val_num_samples": 100, "eval_widths": [0.35, 1.0], "tensorboard": False,
         "calib_samples": 128, "epochs": 1}


def test_timm_argument_set_is_complete():
    """All 172 keys of timm train.py's parser, each at its timm default (device aside), rejected ones with a reason."""
    assert len(TIMM_ARGS) == 172
    assert {k: DEFAULTS[k] for k in TIMM_ARGS if k != "device"} == {k: v for k, v in TIMM_ARGS.items() if k != "device"}
    assert TIMM_ARGS["model_ema_decay"] == 0.9998 and TIMM_ARGS["grad_accum_steps"] == 1
    for k, reason in REJECTED.items():
        assert k in DEFAULTS and len(reason) > 20
    cfg = T.resolve_config(dict(TIMM_ARGS))  # timm's own args.yaml resolves as it is
    assert cfg["model"] == "resnet50" and cfg["checkpoint_hist"] == 10 and cfg["dist_bn"] == "reduce"
    with pytest.raises(ConfigError, match=r"naflex_loader=True cannot apply to a slimmable run"):
        T.resolve_config({**TIMM_ARGS, "naflex_loader": True})


def test_timm_args_yaml_runs_one_epoch_on_cifar10(tmp_path, slim_data):
    """An args.yaml with every key of timm train.py at its default plus the slimmable keys and what any user sets
    (data, model, size, epochs): one short epoch on real CIFAR-10 through `slim train`, timm's output layout."""
    if not (slim_data / "cifar10" / "train.tar.gz").is_file():
        pytest.skip(f"no CIFAR-10 under {slim_data}")
    args = {**TIMM_ARGS, **SLIM, "data_dir": str(slim_data / "cifar10"), "val_split": "test",
            "model": "us_mobilenetv2_100", "num_classes": 10, "input_size": [3, 32, 32], "mean": [0.49, 0.48, 0.45],
            "std": [0.25, 0.24, 0.26], "epochs": 1, "batch_size": 32, "train_num_samples": 256,
            "val_num_samples": 200, "workers": 0, "warmup_epochs": 0, "calib_samples": 128,
            "eval_widths": [0.35, 1.0], "export_widths": [0.6], "output": str(tmp_path / "run")}
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(args))
    r = run_cli("train", tmp_path / "args.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "run"
    for name in ("args.yaml", "last.pth.tar", "checkpoint-0.pth.tar", "model_best.pth.tar", "summary.csv",
                 "spectrum.csv", "exported/width_0.6.pth"):  # an export width outside the eval widths
        assert (out / name).is_file(), name
    written = yaml.safe_load((out / "args.yaml").read_text())
    assert set(TIMM_ARGS) <= set(written) and written["opt"] == "sgd" and written["lr"] == pytest.approx(0.1 * 32 / 256)
    row = read_csv(out / "summary.csv")[0]
    assert row["epoch"] == "0" and {"train_loss", "eval_top1_w0.35", "eval_top1_w1", "lr"} <= set(row)
    assert [float(x["width"]) for x in read_csv(out / "spectrum.csv")] == [0.35, 1.0]


def test_model_ema_is_calibrated_and_evaluated_per_width(tmp_path):
    """model_ema: the EMA copy differs from the model, is evaluated per epoch at the tracked widths, and after
    training gets its own BN post-statistics and per-width evaluation (spectrum_ema.csv)."""
    res = T.train(None, {**SMALL, "epochs": 2, "model_ema": True, "model_ema_decay": 0.5, "output": str(tmp_path)},
                  default=True)
    ck = slim.read_checkpoint(tmp_path / "last.pth.tar")
    ema, model = ck["state_dict_ema"], ck["model"]
    diff = [k for k, v in model.items() if v.is_floating_point() and k.endswith(".weight")
            and not torch.allclose(v, ema[k])]
    assert len(diff) > 10
    assert set(ck["results_ema"]) == {"0.35", "1"} and ck["results_ema"] != ck["results"]
    rows = read_csv(tmp_path / "spectrum_ema.csv")
    assert [float(r["width"]) for r in rows] == [0.35, 1.0] and res["rows_ema"][0]["top1"] == pytest.approx(
        float(rows[0]["top1"]), abs=1e-3)
    summary = read_csv(tmp_path / "summary.csv")
    assert {"eval_ema_top1_w0.35", "eval_ema_top1_w1", "eval_top1_w1"} <= set(summary[0])
    # the EMA copy's BN post-statistics are its own (computed with its weights), for every calibrated width
    post = [k for k in ema if "post_mean" in k]
    assert post and all(ema[k].shape == model[k].shape for k in post)
    assert sum(not torch.allclose(ema[k], model[k]) for k in post) > len(post) // 2


class _MLPNet(nn.Module):  # BN-free: a batch's gradient is the mean of its micro-batches' gradients
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _one_update(accum, batches):
    torch.manual_seed(0)
    model = slim.convert(_MLPNet(), slim.WidthSpec.range(0.25, 1.0), example_input=torch.zeros(1, 3, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    cfg = {**T.resolve_config({"grad_accum_steps": accum}), "channels_last": False}
    step = slim.MultiWidthStep(model, num_widths=3, distill="soft_ce", seed=3)  # random middle width
    run = SimpleNamespace(criterion=nn.CrossEntropyLoss(), tracked_widths=[0.25, 1.0], distributed=False, main=False,
                          writer=None, output=None, num_updates=0)
    T.train_one_epoch(5, model, batches, opt, cfg, step, torch.device("cpu"), run=run)
    return [p.detach().clone() for p in model.parameters()], step


def test_grad_accumulation_equals_one_large_batch():
    """grad_accum_steps=k on k micro-batches == one step on the k-times larger batch (BN-free model): every
    micro-batch trains the same widths (sandwich, inplace distillation) and each loss is divided by k."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    big, _ = _one_update(1, [(x, y)])
    small, step = _one_update(4, [(x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)])
    assert step.iteration == 6  # epoch 5, one update: the width schedule moved by one
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # not a no-op: two updates of 8 (two width draws) give other weights
    two, _ = _one_update(1, [(x[:8], y[:8]), (x[8:], y[8:])])
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(big, two))


def test_grad_checkpointing_recomputes_at_the_width(tmp_path):
    """grad_checkpointing: timm's checkpointed blocks recompute in backward at the forward's width, also when
    backward runs on another thread (as autograd's device threads do) -- the trainer sets the model's width too."""
    cfg = T.resolve_config({"model": "us_mobilenetv2_100", "num_classes": 10, "cifar_stem": True})
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))

    def grads(ckpt, width_on_model):
        torch.manual_seed(0)
        m = T.build_model(cfg).train()
        m.set_grad_checkpointing(ckpt)
        ctx = T._default_width(m, 0.35) if width_on_model else slim.width(0.35)
        with slim.width(0.35), ctx:
            loss = nn.functional.cross_entropy(m(x), y)
            err = []

            def backward():
                try:
                    loss.backward()
                except RuntimeError as e:
                    err.append(e)
            t = threading.Thread(target=backward)
            t.start()
            t.join()
            if err:
                raise err[0]
        return [p.grad.clone() for p in m.parameters() if p.grad is not None]

    ref = grads(False, False)
    got = grads(True, True)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError):  # the width context alone does not reach the other thread's recomputation
        grads(True, False)


def test_bce_mixup_amp_and_checkpoint_history(tmp_path):
    """bce_loss with mixup/cutmix (soft targets), bfloat16 autocast on CPU, checkpoint_hist=2 over 3 epochs."""
    T.train(None, {**SMALL, "epochs": 3, "train_num_samples": 64, "inplace_distill": False, "bce_loss": True,
                   "mixup": 0.2, "cutmix": 1.0, "amp": True,
                   "amp_dtype": "bfloat16", "checkpoint_hist": 2, "eval_metric": "loss", "output": str(tmp_path)},
            default=True)
    assert len(list(tmp_path.glob("checkpoint-*.pth.tar"))) == 2  # the best 2 of 3 epochs by eval loss
    assert (tmp_path / "model_best.pth.tar").is_file()
    rows = read_csv(tmp_path / "summary.csv")
    # BCE over 10 classes is ~0.7 per width at the start (CE would be ~2.3): 4 widths sum well below 4 x 2.3
    assert float(rows[0]["train_loss"]) < 4.0
    ck = slim.read_checkpoint(tmp_path / "last.pth.tar")
    assert ck["config"]["bce_loss"] and ck["epoch"] == 3


def test_initial_checkpoint_of_a_slim_run_and_torchcompile(tmp_path):
    """initial_checkpoint loads a slim run's weights (width spec checked); torchcompile (backend eager) trains
    exactly as eager does, one graph per width."""
    a = T.train(None, {**SMALL, "widths": [0.5, 1.0], "width_range": None, "eval_widths": None,
                       "output": str(tmp_path / "a")}, default=True)
    b = T.train(None, {**SMALL, "widths": [0.5, 1.0], "width_range": None, "eval_widths": None, "torchcompile": "eager",
                       "output": str(tmp_path / "b")}, default=True)
    assert float(read_csv(tmp_path / "a" / "summary.csv")[0]["train_loss"]) == pytest.approx(
        float(read_csv(tmp_path / "b" / "summary.csv")[0]["train_loss"]), rel=1e-6)
    assert [r["top1"] for r in a["rows"]] == pytest.approx([r["top1"] for r in b["rows"]], abs=1e-6)
    cfg = T.resolve_config({**T.DIGITS_JOB, "widths": [0.5, 1.0], "width_range": None,
                            "initial_checkpoint": str(tmp_path / "a" / "last.pth.tar")})
    m = T.build_model(cfg)
    ck = slim.read_checkpoint(tmp_path / "a" / "last.pth.tar")
    assert all(torch.equal(v, ck["model"][k]) for k, v in m.state_dict().items() if k in ck["model"])
    with pytest.raises(slim.WidthSpecMismatchError):
        T.build_model({**cfg, "widths": [0.25, 1.0]})
    # a plain timm checkpoint ({'state_dict': ...}, as timm's train.py writes) loads before conversion
    import timm

    plain = timm.create_model("mobilenetv2_100", num_classes=10)
    torch.save({"state_dict": plain.state_dict(), "epoch": 3}, tmp_path / "timm.pth.tar")
    m2 = T.build_model({**cfg, "model": "mobilenetv2_100", "cifar_stem": False, "head_init_scale": None,
                        "initial_checkpoint": str(tmp_path / "timm.pth.tar")})
    assert torch.equal(m2.conv_stem.weight, plain.conv_stem.weight)
