"""``SlimmablePPO``: SB3's PPO whose actor-critic runs at any width (US-Nets Section 4.2 / 5.1, Fig. 5).

    model = SlimmablePPO("CnnPolicy", env, policy_kwargs=dict(
        slimmable=dict(width_range=[0.25, 1.0], num_widths=4, distill="kl")))
    model.learn(1_000_000)
    with slim.width(0.5):
        action, _ = model.predict(obs)

Roll-outs are SB3's ``collect_rollouts``, run at the widest width whatever width is set around ``learn`` (US-Nets
§4.2: "we run the policy predicted by the model at largest width as roll-outs for training other widths"). Every minibatch of
``train`` runs the widths of one ``MultiWidthStep`` on the same roll-out data: the widest with SB3's PPO loss, the
others with the PPO loss plus (``distill="kl"``) ``KL(widest || width)`` of the action distributions, the widest's
distribution detached. Gradients accumulate; SB3's gradient clipping and optimizer step run once per minibatch;
``target_kl`` early stopping uses the widest width's approximate KL, as SB3 computes it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.utils import explained_variance
from torch import nn

import slim_plugins as slim
from slim_plugins.errors import InvalidArgumentError
from slim_plugins.width import (WidthSpec, check_distill_weight, distill_from_config, eval_widths_from_config, schedule_from_config,
                                spec_from_config)

__all__ = ["SlimmablePPO", "SlimmableOnPolicy", "PPOSlimSettings", "parse_slimmable", "ActorCriticGraph"]

_KEYS = ("widths", "width_range", "divisor", "num_widths", "rule", "distill", "distill_weight", "eval_widths", "seed")
_DISTILL = (None, "kl")


@dataclasses.dataclass(frozen=True)
class PPOSlimSettings:
    """The ``slimmable`` entry of ``policy_kwargs``, checked.

    Attributes:
        spec: a range (US-Net) or switches (S-Net). num_widths / rule: the width schedule per minibatch.
        distill: ``"kl"`` (policy distillation: ``KL(widest || width)`` added to the PPO loss of the other widths,
            US-Nets §4.2; the default for a range) or ``None`` (the default for switches: S-Nets train every
            switch on the task loss). distill_weight: its weight.
        eval_widths: widths evaluated by the callbacks and ``slim eval`` (default: the switches, or 4 evenly spaced).
        seed: width sampling seed, drawn per ``(seed, update)``.
    """

    spec: WidthSpec
    num_widths: int = 4
    rule: str | None = None
    distill: str | None = "kl"
    distill_weight: float = 1.0
    eval_widths: tuple = ()
    seed: int = 0

    def to_dict(self) -> dict:
        d = {("widths" if self.spec.is_switches else "width_range"): list(self.spec.widths),
             "divisor": self.spec.divisor}
        d.update(num_widths=self.num_widths, rule=self.rule, distill=self.distill, distill_weight=self.distill_weight,
                 eval_widths=list(self.eval_widths), seed=self.seed)
        return d


def parse_slimmable(cfg: Mapping[str, Any] | bool) -> PPOSlimSettings:
    """Check ``policy_kwargs["slimmable"]``: ``True`` (US-Net 0.25-1.0, 4 widths, KL distillation), ``{widths:
    [...]}`` or ``{width_range: [lo, hi]}`` plus the keys of :class:`PPOSlimSettings`.

    Raises:
        InvalidArgumentError: an unknown key, a bad rule, distillation or number. WidthError: bad widths.
    """
    if cfg is True:
        cfg = {"width_range": [0.25, 1.0]}
    spec = spec_from_config(cfg, divisor=8, allowed=_KEYS)
    rule, num_widths = schedule_from_config(cfg)
    distill = distill_from_config(cfg, spec, _DISTILL, "kl")
    weight = check_distill_weight(cfg.get("distill_weight", 1.0))
    eval_widths = eval_widths_from_config(cfg, spec, 4)
    return PPOSlimSettings(spec=spec, num_widths=num_widths, rule=rule, distill=distill, distill_weight=weight,
                           eval_widths=eval_widths, seed=int(cfg.get("seed", 0)))


class ActorCriticGraph(nn.Module):
    """The trainable path of an SB3 ``ActorCriticPolicy`` as one traceable module, ``obs (N, *obs_shape) ->
    (action logits or mean (N, A), value (N, 1))``, SB3's observation preprocessing included (images / 255), so
    the channel analysis sees both heads (the action and value layers are the graph's two output layers and keep
    their sizes) and the shared features extractor between them. Holds the policy's own modules; exported at a
    width it is the deployable policy (``slim export``)."""

    def __init__(self, policy):
        super().__init__()
        self.features_extractor = policy.features_extractor
        self.mlp_extractor = policy.mlp_extractor
        self.action_net = policy.action_net
        self.value_net = policy.value_net
        self.observation_space = policy.observation_space
        self.image_scale = policy.normalize_images and is_image_space(policy.observation_space)

    def forward(self, obs):
        # SB3's preprocess_obs, written traceably (torch.fx proxies fail its isinstance checks, and its
        # MultiDiscrete branch iterates a split of the observation): the same values
        sp = self.observation_space
        if isinstance(sp, spaces.Discrete):
            obs = F.one_hot(obs.long(), num_classes=int(sp.n)).float()
        elif isinstance(sp, spaces.MultiDiscrete):
            obs = torch.cat([F.one_hot(obs[:, i].long(), num_classes=int(n)).float() for i, n in enumerate(sp.nvec)],
                            dim=-1)
        elif self.image_scale:
            obs = obs.float() / 255.0
        else:
            obs = obs.float()
        pi, vf = self.mlp_extractor(self.features_extractor(obs))
        return self.action_net(pi), self.value_net(vf)

    def write_back(self, policy) -> None:
        """Put the converted modules into the policy (and its actor/critic features-extractor aliases)."""
        for name in ("features_extractor", "mlp_extractor", "action_net", "value_net"):
            setattr(policy, name, getattr(self, name))
        if getattr(policy, "share_features_extractor", True):
            policy.pi_features_extractor = policy.vf_features_extractor = policy.features_extractor


_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def make_slimmable_policy(policy, settings: PPOSlimSettings):
    """Convert an SB3 ``ActorCriticPolicy`` in place and rebuild its optimizer over the converted parameters
    (switchable BN and weight norm bring new ones); returns it.

    Raises:
        InvalidArgumentError: a Dict / Tuple observation space (``MultiInputPolicy``); separate actor / critic
            features extractors; gSDE (its noise matrix is sized by the
            full latent); a MultiDiscrete action space with ``distill="kl"`` (SB3 keeps its distributions in a
            list); BatchNorm with a width range (US-Nets need BN post-statistics from roll-outs, not built here:
            use switches or a BN-free extractor such as the paper's).
    """
    if not isinstance(policy.observation_space, _SPACES) or (
            isinstance(policy.observation_space, spaces.MultiDiscrete) and policy.observation_space.nvec.ndim != 1):
        raise InvalidArgumentError(
            f"SlimmablePPO / SlimmableA2C take Box, Discrete, MultiDiscrete (1-D) or MultiBinary observations, got "
            f"{policy.observation_space} (a Dict / Tuple space, MultiInputPolicy, is not supported)")
    if not getattr(policy, "share_features_extractor", True):
        raise InvalidArgumentError("SlimmablePPO / SlimmableA2C need share_features_extractor=True (the paper's "
                                   "actor and critic share the CNN and its 512-unit FC)")
    if getattr(policy, "use_sde", False):
        raise InvalidArgumentError("SlimmablePPO / SlimmableA2C do not support use_sde=True: gSDE's noise matrix "
                                   "is sized by the full-width latent; use the default Gaussian policy")
    if settings.distill and isinstance(policy.action_space, spaces.MultiDiscrete):
        raise InvalidArgumentError("distill='kl' does not support MultiDiscrete action spaces (SB3 keeps one "
                                   "Categorical per dimension in a list); use distill: null")
    if not settings.spec.is_switches and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                             for m in policy.modules()):
        raise InvalidArgumentError("the policy has BatchNorm: a width range needs BN post-statistics, which "
                                   "SlimmablePPO / SlimmableA2C do not compute; use widths: [...] (switchable BN) "
                                   "or a BN-free features extractor (the paper's USNetsAtariCNN has none)")
    graph = ActorCriticGraph(policy)
    shape = policy.observation_space.shape
    example = torch.zeros(2, *shape, device=policy.device)
    slim.convert(graph, settings.spec, example_input=example)
    graph.write_back(policy)  # the width state lives on the converted modules, found from the policy
    lr = policy.optimizer.param_groups[0]["lr"]
    policy.optimizer = policy.optimizer_class(policy.parameters(), lr=lr, **policy.optimizer_kwargs)
    return policy


class SlimmableOnPolicy:
    """What ``SlimmablePPO`` and ``SlimmableA2C`` share, mixed in before SB3's algorithm class: the ``slimmable``
    entry of ``policy_kwargs`` parsed and saved as plain JSON (``slim_config``, so SB3's own ``load`` rebuilds the
    slimmable policy), the policy converted and its optimizer rebuilt, the ``MultiWidthStep`` (width schedule,
    ``KL(widest || width)`` distillation added to the other widths' loss), roll-outs at the widest width, the
    per-width evaluation of the actions and SB3's shared training logs."""

    def __init__(self, policy, env, *args, policy_kwargs: dict | None = None, _init_setup_model: bool = True,
                 **kwargs):
        pk = dict(policy_kwargs or {})
        slimmable = pk.pop("slimmable", True)
        # load() builds the model with _init_setup_model=False and then sets slim_config from the zip
        self.slim_config = parse_slimmable(slimmable).to_dict() if _init_setup_model else None
        self.width_iteration = 0  # updates trained: the width schedule's position (saved with the model)
        self.slim_algorithm = type(self).__name__  # saved: load() of another algorithm's zip is refused
        super().__init__(policy, env, *args, policy_kwargs=pk, _init_setup_model=_init_setup_model, **kwargs)

    def _setup_model(self) -> None:
        if self.slim_config is None:
            base = next(c for c in type(self).__mro__ if c.__module__.startswith("stable_baselines3"))
            raise InvalidArgumentError(f"this SB3 zip has no slim_config: it was not saved by {type(self).__name__} "
                                       f"(load it with stable_baselines3.{base.__name__})")
        if self.slim_algorithm != type(self).__name__:  # load() has set it from the zip
            raise InvalidArgumentError(f"this SB3 zip was saved by {self.slim_algorithm}; load it with "
                                       f"{self.slim_algorithm}.load, not {type(self).__name__}.load")
        self.slim_settings = parse_slimmable(dict(self.slim_config))
        super()._setup_model()
        make_slimmable_policy(self.policy, self.slim_settings)
        s = self.slim_settings
        self.width_step = slim.MultiWidthStep(self.policy, s.spec, num_widths=s.num_widths, rule=s.rule,
                                              distill="policy_kl" if s.distill else None, distill_mode="add",
                                              distill_weight=s.distill_weight, distill_on="distribution",
                                              seed=s.seed)

    def _excluded_save_params(self) -> list[str]:
        # slim_config (plain JSON) is saved; the settings object and the step are rebuilt from it
        return [*super()._excluded_save_params(), "width_step", "slim_settings"]

    def collect_rollouts(self, *args, **kwargs) -> bool:
        """SB3's roll-outs, run by the widest policy whatever width is set around ``learn`` (US-Nets §4.2)."""
        with slim.width(self.slim_settings.spec.max):
            return super().collect_rollouts(*args, **kwargs)

    def _evaluate(self, obs, actions):
        """``(values, log_prob, entropy, distribution)`` at the current width (SB3's ``evaluate_actions`` plus the
        torch distribution the KL needs)."""
        policy = self.policy
        latent_pi, latent_vf = policy.mlp_extractor(policy.extract_features(obs))
        dist = policy._get_action_dist_from_latent(latent_pi)
        return policy.value_net(latent_vf), dist.log_prob(actions), dist.entropy(), dist.distribution

    def _record_shared(self, distill_losses: list) -> None:
        """SB3's logs every on-policy algorithm writes (explained variance, Gaussian std) plus the mean
        distillation KL of the update's narrower widths."""
        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())
        if distill_losses:
            self.logger.record("train/distill_kl", np.mean(distill_losses))


class SlimmablePPO(SlimmableOnPolicy, PPO):
    """PPO with a slimmable actor-critic (see the module docstring). Takes PPO's arguments; the width spec comes in
    ``policy_kwargs["slimmable"]`` (see :func:`parse_slimmable`) and travels with ``save`` / ``load``."""

    def train(self) -> None:
        """SB3's ``PPO.train`` with one ``MultiWidthStep`` per minibatch (same losses, clipping, early stop, logs;
        the logged losses are the widest width's)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)
        clip_range_vf = self.clip_range_vf(self._current_progress_remaining) if self.clip_range_vf is not None \
            else None
        entropy_losses, pg_losses, value_losses, clip_fractions, distill_losses = [], [], [], [], []
        continue_training = True
        widest_loss = torch.zeros(())
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
                self.policy.optimizer.zero_grad()
                stop = False
                for p in self.width_step.iterate(self.width_iteration):
                    with p:
                        values, log_prob, entropy, dist = self._evaluate(rollout_data.observations, actions)
                        values = values.flatten()
                        ratio = torch.exp(log_prob - rollout_data.old_log_prob)
                        policy_loss = -torch.min(advantages * ratio,
                                                 advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)).mean()
                        values_pred = values if clip_range_vf is None else rollout_data.old_values + torch.clamp(
                            values - rollout_data.old_values, -clip_range_vf, clip_range_vf)
                        value_loss = F.mse_loss(rollout_data.returns, values_pred)
                        entropy_loss = -torch.mean(-log_prob) if entropy is None else -torch.mean(entropy)
                        ppo = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                        loss = p.loss({"distribution": dist}, ppo)
                        if p.index == 0:  # the widest width: SB3's logs and early stop
                            widest_loss = loss.detach()
                            pg_losses.append(policy_loss.item())
                            clip_fractions.append(torch.mean((torch.abs(ratio - 1) > clip_range).float()).item())
                            value_losses.append(value_loss.item())
                            entropy_losses.append(entropy_loss.item())
                            with torch.no_grad():
                                log_ratio = log_prob - rollout_data.old_log_prob
                                approx_kl_div = torch.mean((torch.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                            approx_kl_divs.append(approx_kl_div)
                            if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                                continue_training, stop = False, True
                                if self.verbose >= 1:
                                    print(f"Early stopping at step {epoch} due to reaching max kl: "
                                          f"{approx_kl_div:.2f}")
                        if stop:
                            break
                        loss.backward()
                if stop:
                    break
                self.width_iteration += 1
                res = self.width_step.last
                distill_losses += [float(r.parts["distill"]) for r in res.results if "distill" in r.parts]
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()
            self._n_updates += 1
            if not continue_training:
                break

        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", widest_loss.item())
        self._record_shared(distill_losses)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
