"""Helpers of the Stable-Baselines3 tests (``test_sb3.py``, ``test_sb3_a2c.py``)."""
from __future__ import annotations

import torch
from stable_baselines3.common.callbacks import BaseCallback

import slim_plugins as slim


class RolloutWidthCheck(BaseCallback):
    """After each roll-out: ``max_diff``, the largest gap between the log-probabilities the roll-out buffer holds
    and those of the widest policy on the same observations and actions (0 when the roll-outs ran the widest)."""

    max_diff = None

    def _on_step(self):
        return True

    def _on_rollout_end(self):
        buf = self.model.rollout_buffer
        obs = torch.as_tensor(buf.observations.reshape(-1, *self.model.observation_space.shape))
        act = torch.as_tensor(buf.actions.reshape(-1)).long()
        with torch.no_grad(), slim.width(1.0):
            lp = self.model.policy.evaluate_actions(obs, act)[1]
        self.max_diff = (lp - torch.as_tensor(buf.log_probs.reshape(-1))).abs().max().item()


def assert_same_actions(model, loaded, obs, widths=(0.25, 0.6, 1.0)) -> list:
    """``model`` and ``loaded`` choose the same deterministic actions with the same probabilities on ``obs`` at
    each width; returns ``model``'s action probabilities per width."""
    probs = []
    for w in widths:
        with slim.width(w):
            a, _ = model.predict(obs, deterministic=True)
            b, _ = loaded.predict(obs, deterministic=True)
            pa = model.policy.get_distribution(torch.as_tensor(obs)).distribution.probs
            pb = loaded.policy.get_distribution(torch.as_tensor(obs)).distribution.probs
        assert (a == b).all() and torch.equal(pa, pb), w
        probs.append(pa)
    return probs
