"""``SlimmableA2C``: SB3's A2C whose actor-critic runs at any width, by the mechanism of ``SlimmablePPO`` (US-Nets
Section 4.2 / 5.1, US-PPO's recipe applied to A2C).

    model = SlimmableA2C("MlpPolicy", env, policy_kwargs=dict(
        slimmable=dict(width_range=[0.25, 1.0], num_widths=4, distill="kl")))
    model.learn(200_000)
    with slim.width(0.5):
        action, _ = model.predict(obs)

Roll-outs are SB3's ``collect_rollouts`` at the widest width. Each update (A2C: one gradient step on the whole
roll-out) runs the widths of one ``MultiWidthStep`` on the same data: the widest with SB3's A2C loss (policy
gradient + ``vf_coef`` x value + ``ent_coef`` x entropy, SB3's formulas), the others with that loss plus
(``distill="kl"``) ``KL(widest || width)`` of the action distributions, the widest's detached. Gradients add up;
SB3's gradient clipping and optimizer step (RMSprop by default, as A2C) run once per update.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import A2C

from .ppo import SlimmableOnPolicy

__all__ = ["SlimmableA2C"]


class SlimmableA2C(SlimmableOnPolicy, A2C):
    """A2C with a slimmable actor-critic (see the module docstring). Takes A2C's arguments; the width spec comes in
    ``policy_kwargs["slimmable"]`` (see :func:`~slim_plugins.integrations.sb3.parse_slimmable`) and travels with
    ``save`` / ``load``."""

    def train(self) -> None:
        """SB3's ``A2C.train`` with one ``MultiWidthStep`` per update (same losses, clipping, optimizer step and
        logs; the logged losses are the widest width's)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        distill_losses = []
        for rollout_data in self.rollout_buffer.get(batch_size=None):  # one batch: the whole roll-out
            actions = rollout_data.actions
            if isinstance(self.action_space, spaces.Discrete):
                actions = actions.long().flatten()
            advantages = rollout_data.advantages
            if self.normalize_advantage:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            self.policy.optimizer.zero_grad()
            for p in self.width_step.iterate(self.width_iteration):
                with p:
                    values, log_prob, entropy, dist = self._evaluate(rollout_data.observations, actions)
                    policy_loss = -(advantages * log_prob).mean()
                    value_loss = F.mse_loss(rollout_data.returns, values.flatten())
                    entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
                    a2c = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                    loss = p.loss({"distribution": dist}, a2c)
                    if p.index == 0:  # the widest width: SB3's logs
                        logged = (policy_loss.item(), value_loss.item(), entropy_loss.item())
                    loss.backward()
            self.width_iteration += 1
            distill_losses += [float(r.parts["distill"]) for r in self.width_step.last.results if "distill" in r.parts]
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
            self.policy.optimizer.step()

        self._n_updates += 1
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/entropy_loss", logged[2])
        self.logger.record("train/policy_loss", logged[0])
        self.logger.record("train/value_loss", logged[1])
        self._record_shared(distill_losses)
