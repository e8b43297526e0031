"""The Atari actor-critic CNN of US-Nets §5.1: three convs (32, 64, 32 channels; kernels 8, 4, 3; strides 4, 2, 1)
and a 512-unit FC shared by actor and critic, no BN. SB3's ``NatureCNN`` has 64 channels in the third conv."""
from __future__ import annotations

import gymnasium as gym
import torch
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from slim_plugins.width import make_divisible


class USNetsAtariCNN(BaseFeaturesExtractor):
    """``(N, C, 84, 84)`` -> ``(N, features_dim)``; pass as ``policy_kwargs=dict(features_extractor_class=
    USNetsAtariCNN, net_arch=[])`` (``net_arch=[]``: the action and value layers sit on the shared FC, as in the
    paper; for any extractor but ``NatureCNN`` SB3 otherwise adds 64-64 MLPs for actor and critic).

    Args:
        features_dim: units of the FC at 1.0x (512).
        width_mult: a fixed-width copy for individually trained baselines: every layer has
            ``make_divisible(base * width_mult, 8)`` channels, as the slimmable net's layers at that width.
    """

    def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 512, width_mult: float = 1.0):
        def ch(base: int) -> int:
            return base if width_mult == 1.0 else make_divisible(base * width_mult, 8)

        super().__init__(observation_space, ch(features_dim))
        c = observation_space.shape[0]
        self.cnn = nn.Sequential(nn.Conv2d(c, ch(32), 8, 4), nn.ReLU(), nn.Conv2d(ch(32), ch(64), 4, 2), nn.ReLU(),
                                 nn.Conv2d(ch(64), ch(32), 3, 1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            n = self.cnn(torch.as_tensor(observation_space.sample()[None]).float()).shape[1]
        self.linear = nn.Sequential(nn.Linear(n, ch(features_dim)), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(observations))
