"""MultiWidthStep: S-Net all-switch gradients, sandwich rule, inplace distillation, BN tracking, per-width backward."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch
import torch.nn.functional as F

import slim_plugins as slim
from slim_plugins.train import kl_divergence, soft_cross_entropy


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _assert_grads_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=tol, rtol=tol, msg=lambda m, n=n: f"{n}: {m}")


def _data(n=8, classes=10):
    return torch.randn(n, 3, 16, 16), torch.randint(0, classes, (n,))


def test_snet_all_switches_gradient_is_sum_of_losses(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.switches([0.25, 0.5, 0.75, 1.0]))
    ref = copy.deepcopy(model)
    x, y = _data()
    step = slim.MultiWidthStep(model)
    res = step(lambda: model(x), lambda out: F.cross_entropy(out, y), iteration=0)
    assert res.widths == [1.0, 0.75, 0.5, 0.25]  # Algorithm 1 of Slimmable Networks: every switch
    total, losses = 0.0, {}
    for w in (1.0, 0.75, 0.5, 0.25):
        with slim.width(w):
            loss = F.cross_entropy(ref(x), y)
        losses[w] = loss.item()
        total = total + loss
    total.backward()
    _assert_grads_close(_grads(model), _grads(ref))
    assert res.losses == pytest.approx(losses, abs=1e-6)
    assert res.loss == pytest.approx(sum(losses.values()), abs=1e-5)
    # the switchable BN of every switch got its own gradient rows
    assert (model.bn2.weight.grad.abs().sum(1) > 0).all()


def test_sandwich_widths_and_iteration_counter(make_tiny_cnn):
    spec = slim.WidthSpec.range(0.25, 1.0)
    model = slim.convert(make_tiny_cnn(), spec)
    x, y = _data(4)
    step = slim.MultiWidthStep(model, num_widths=4, seed=5)
    seen = []
    for it in range(3):
        res = step(lambda: model(x), lambda out: F.cross_entropy(out, y))  # iteration counts itself
        assert res.widths == spec.sample(it, 4, "sandwich", seed=5) == step.widths(it)
        assert res.widths[0] == 1.0 and res.widths[-1] == 0.25 and len(res.widths) == 4
        seen.append(tuple(res.widths))
    assert len(set(seen)) == 3
    res = step(lambda: model(x), lambda out: F.cross_entropy(out, y), iteration=1)
    assert tuple(res.widths) == seen[1]  # explicit iteration (resume / DDP) reproduces the draw


def test_forward_runs_inside_width_context(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    x, y = _data(4)
    channels = []
    h = model.conv2.register_forward_hook(lambda m, a, o: channels.append(o.shape[1]))
    step = slim.MultiWidthStep(model, num_widths=3, rule="sandwich")
    res = step(lambda: model(x), lambda out: F.cross_entropy(out, y), iteration=4)
    h.remove()
    assert channels == [32 if w == 1.0 else slim.make_divisible(32 * w) for w in res.widths]


@pytest.mark.parametrize("distill", ["kl", "soft_ce"])
def test_inplace_distillation_uses_detached_max_output(make_tiny_cnn, distill):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    ref = copy.deepcopy(model)
    ref_nodetach = copy.deepcopy(model)
    x, y = _data()
    T = 2.0
    step = slim.MultiWidthStep(model, num_widths=4, distill=distill, temperature=T, seed=1)
    widths = step.widths(3)
    res = step(lambda: model(x), lambda out: F.cross_entropy(out, y), iteration=3, keep_outputs=True)
    assert res.widths == widths and widths[0] == 1.0

    def dl(s, t):  # the losses by hand (US-Nets Section 4.2, with temperature and T^2 scaling)
        if distill == "soft_ce":
            return -(F.softmax(t / T, -1) * F.log_softmax(s / T, -1)).sum(-1).mean() * T * T
        p = F.softmax(t / T, -1)
        return (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T

    teacher = res.outputs[1.0]
    for w in widths[1:]:  # each sub-width's recorded loss is the distillation loss vs the max output
        assert res.losses[w] == pytest.approx(dl(res.outputs[w], teacher).item(), rel=1e-5, abs=1e-6)
    assert res.losses[1.0] == pytest.approx(F.cross_entropy(teacher, y).item(), rel=1e-5)

    # gradients: ground truth at max, distillation against the detached max output for the others
    with slim.width(1.0):
        out_max = ref(x)
    F.cross_entropy(out_max, y).backward()
    t = out_max.detach()
    for w in widths[1:]:
        with slim.width(w):
            dl(ref(x), t).backward()
    _assert_grads_close(_grads(model), _grads(ref))

    # control: letting gradients flow into the teacher path gives measurably different gradients
    with slim.width(1.0):
        o = ref_nodetach(x)
    total = F.cross_entropy(o, y)
    for w in widths[1:]:
        with slim.width(w):
            total = total + dl(ref_nodetach(x), o)
    total.backward()
    g_model, g_bad = _grads(model), _grads(ref_nodetach)
    assert max((g_model[n] - g_bad[n]).abs().max().item() for n in g_model) > 1e-4


def test_library_distill_losses_match_hand_formulas():
    s, t = torch.randn(6, 7), torch.randn(6, 7)
    for T in (1.0, 3.0):
        p = F.softmax(t / T, -1)
        kl = (p * (p.log() - F.log_softmax(s / T, -1))).sum(-1).mean() * T * T
        ce = -(p * F.log_softmax(s / T, -1)).sum(-1).mean() * T * T
        assert kl_divergence(s, t, T).item() == pytest.approx(kl.item(), rel=1e-5)
        assert soft_cross_entropy(s, t, T).item() == pytest.approx(ce.item(), rel=1e-5)
        # KL = soft CE - teacher entropy: same gradient w.r.t. the student
        ent = -(p * p.log()).sum(-1).mean() * T * T
        assert (ce - kl).item() == pytest.approx(ent.item(), rel=1e-4)


@pytest.mark.parametrize("distill", ["l1", "l2"])
def test_regression_distillation(make_tiny_cnn, distill):
    model = slim.convert(make_tiny_cnn(num_classes=3), slim.WidthSpec.range(0.25, 1.0))
    x, target = torch.randn(4, 3, 16, 16), torch.randn(4, 3)
    step = slim.MultiWidthStep(model, num_widths=3, distill=distill)
    res = step(lambda: model(x), lambda out: F.mse_loss(out, target), iteration=0, keep_outputs=True)
    fn = F.l1_loss if distill == "l1" else F.mse_loss
    for w in res.widths[1:]:
        assert res.losses[w] == pytest.approx(fn(res.outputs[w], res.outputs[1.0]).item(), rel=1e-5)


def test_callable_distill_gets_detached_teacher(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    x, y = _data(4)
    seen = []

    def my_loss(student, teacher):
        seen.append((student.requires_grad, teacher.requires_grad))
        return (student - teacher).pow(2).mean()

    slim.MultiWidthStep(model, num_widths=4, distill=my_loss)(lambda: model(x), lambda o: F.cross_entropy(o, y), 0)
    assert seen == [(True, False)] * 3


def test_us_bn_tracks_only_min_and_max(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    bn = model.bn2
    x = torch.randn(8, 3, 16, 16) * 2 + 1

    def snap():
        return (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked),
                bn.min_mean.clone(), bn.min_var.clone(), int(bn.min_tracked))

    s0 = snap()
    for w in (0.4, 0.6, 0.9):  # widths between min and max: nothing is tracked
        with slim.width(w):
            model(x)
    s1 = snap()
    assert all(torch.equal(a, b) if torch.is_tensor(a) else a == b for a, b in zip(s0, s1))
    with slim.width(1.0):
        model(x)
    s2 = snap()
    assert not torch.equal(s2[0], s1[0]) and s2[2] == s1[2] + 1
    assert torch.equal(s2[3], s1[3]) and s2[5] == s1[5]
    with slim.width(0.25):
        model(x)
    s3 = snap()
    assert torch.equal(s3[0], s2[0]) and s3[2] == s2[2]
    assert not torch.equal(s3[3][:8], s2[3][:8]) and s3[5] == s2[5] + 1
    assert torch.equal(s3[3][8:], s2[3][8:])  # only the active channels of the min width
    # through MultiWidthStep: exactly one max and one min update per step (sandwich, 4 widths)
    step = slim.MultiWidthStep(model, num_widths=4)
    y = torch.randint(0, 10, (8,))
    for it in range(3):
        step(lambda: model(x), lambda o: F.cross_entropy(o, y), iteration=it)
    assert int(bn.num_batches_tracked) == s3[2] + 3 and int(bn.min_tracked) == s3[5] + 3
    # eval: min and max run from the tracked statistics, others need calibration
    model.eval()
    with torch.no_grad():
        for w in (1.0, 0.25):
            with slim.width(w):
                model(x)
        with slim.width(0.5), pytest.raises(slim.UncalibratedWidthError):
            model(x)


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _count_live_saved_tensors(run):
    """Run ``run(forward)`` under saved-tensor hooks; return the number of saved tensors alive at each forward."""
    live = weakref.WeakSet()

    def pack(t):
        h = _Holder(t)
        live.add(h)
        return h

    counts = []

    def mark():
        counts.append(len(live))

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t):
        run(mark)
    return counts, len(live)


def test_backward_per_width_frees_each_graph(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    x, y = _data()
    step = slim.MultiWidthStep(model, num_widths=4, distill="kl")

    def run(mark):
        def fwd():
            mark()
            return model(x)
        step(fwd, lambda o: F.cross_entropy(o, y), iteration=0)

    counts, after = _count_live_saved_tensors(run)
    assert counts == [0, 0, 0, 0] and after == 0  # no earlier width's graph is alive at the next forward

    # control: summing the losses and one backward (peak memory of all widths) is detected by the same check
    def run_bad(mark):
        total = 0
        for w in step.widths(0):
            mark()
            with slim.width(w):
                total = total + F.cross_entropy(model(x), y)
        total.backward()

    counts_bad, _ = _count_live_saved_tensors(run_bad)
    assert counts_bad[0] == 0 and all(c > 0 for c in counts_bad[1:])
    assert counts_bad[1] < counts_bad[2] < counts_bad[3]


def test_dict_losses_and_custom_backward(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.switches([0.5, 1.0]))
    ref = copy.deepcopy(model)
    x, y = _data(4)

    def loss_fn(out):  # mmengine style: keys containing "loss" are summed, others are logged only
        return {"loss_cls": F.cross_entropy(out, y), "loss_aux": [out.pow(2).mean(), out.abs().mean()],
                "acc": (out.argmax(1) == y).float().mean()}

    res = slim.MultiWidthStep(model, backward=lambda loss: (2.0 * loss).backward())(lambda: model(x), loss_fn, 0)
    total = 0
    for w in (1.0, 0.5):
        with slim.width(w):
            o = ref(x)
        total = total + F.cross_entropy(o, y) + o.pow(2).mean() + o.abs().mean()
    (2.0 * total).backward()
    _assert_grads_close(_grads(model), _grads(ref))
    assert res.loss == pytest.approx(total.item(), rel=1e-5)


def test_step_rejects_bad_config(make_tiny_cnn):
    model = slim.convert(make_tiny_cnn(), slim.WidthSpec.range(0.25, 1.0))
    with pytest.raises(slim.WidthError, match="'random'"):
        slim.MultiWidthStep(model, rule="random", distill="kl")
    with pytest.raises(slim.WidthError, match="'mse'"):
        slim.MultiWidthStep(model, distill="mse")
    with pytest.raises(slim.WidthError, match="differs"):
        slim.MultiWidthStep(model, spec=slim.WidthSpec.range(0.35, 1.0))
    with pytest.raises(slim.WidthError, match="num_widths >= 2"):
        slim.MultiWidthStep(model, num_widths=1)
    with pytest.raises(slim.NotSlimmableError):
        slim.MultiWidthStep(torch.nn.Linear(2, 2))
