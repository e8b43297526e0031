"""Stable-Baselines3 adapter: ``SlimmablePPO`` (US-PPO with policy distillation, US-Nets §4.2 / §5.1) and
``SlimmableA2C`` (the same mechanism on SB3's A2C)."""
from .ppo import (ActorCriticGraph, PPOSlimSettings, SlimmableOnPolicy, SlimmablePPO, make_slimmable_policy,
                  parse_slimmable)
from .a2c import SlimmableA2C
from .callbacks import WidthEvalCallback, evaluate_widths, width_costs
from .policies import USNetsAtariCNN

__all__ = ["SlimmablePPO", "SlimmableA2C", "SlimmableOnPolicy", "PPOSlimSettings", "parse_slimmable",
           "make_slimmable_policy", "ActorCriticGraph", "WidthEvalCallback", "evaluate_widths", "width_costs",
           "USNetsAtariCNN"]
