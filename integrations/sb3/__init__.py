"""Stable-Baselines3 adapter: ``SlimmablePPO`` (US-PPO with policy distillation, US-Nets §4.2 / §5.1)."""
from .ppo import ActorCriticGraph, PPOSlimSettings, SlimmablePPO, make_slimmable_policy, parse_slimmable
from .callbacks import WidthEvalCallback, evaluate_widths, width_costs
from .policies import USNetsAtariCNN

__all__ = ["SlimmablePPO", "PPOSlimSettings", "parse_slimmable", "make_slimmable_policy", "ActorCriticGraph",
           "WidthEvalCallback", "evaluate_widths", "width_costs", "USNetsAtariCNN"]
