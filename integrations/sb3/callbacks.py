"""``WidthEvalCallback``: SB3's ``EvalCallback`` at every width — mean episode reward per width to the logger
(TensorBoard ``eval/mean_reward_w<width>``), ``spectrum.csv`` (the last evaluation: width, MFLOPs per observation,
params, reward) and ``evaluations.csv`` (every evaluation, with its environment step)."""
from __future__ import annotations

import os
from typing import Sequence

import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy

import slim_plugins as slim
from slim_plugins.spectrum import write_spectrum_csv
from slim_plugins.profile import count_mflops

from .ppo import ActorCriticGraph, SlimmableOnPolicy


def width_costs(model, widths: Sequence[float]) -> dict:
    """``{width: (MFLOPs, params M)}`` of the actor-critic for one observation (multiply-adds, as the papers
    count). A plain SB3 model (an individually trained baseline) has one cost, reported under each label."""
    graph = ActorCriticGraph(model.policy)
    x = torch.zeros(1, *model.policy.observation_space.shape, device=model.device)
    if not isinstance(model, SlimmableOnPolicy):
        cost = (count_mflops(graph, x), sum(p.numel() for p in graph.parameters()) / 1e6)
        return {w: cost for w in widths}
    return {r.width: (r.mflops, r.params_m) for r in slim.profile(graph, x, widths=list(widths), latency=False)}


def evaluate_widths(model, env, widths: Sequence[float], n_eval_episodes: int = 10, deterministic: bool = True,
                    costs: dict | None = None):
    """SB3's ``evaluate_policy`` at each width (``with slim.width(w)``). ``costs``: :func:`width_costs` of these
    widths when the caller already has them.

    Returns:
        ``[{width, mflops, params_m, mean_reward, std_reward}]`` (MFLOPs per observation; reward per episode as
        the env's ``Monitor`` counts it: for Atari the whole game, all lives).
    """
    costs = costs or width_costs(model, widths)
    rows = []
    for w in widths:
        with slim.width(w):
            mean, std = evaluate_policy(model, env, n_eval_episodes=n_eval_episodes, deterministic=deterministic)
        rows.append({"width": w, "mflops": costs[w][0], "params_m": costs[w][1], "mean_reward": float(mean),
                     "std_reward": float(std)})
    return rows


class WidthEvalCallback(BaseCallback):
    """Every ``eval_freq`` calls (environment steps / n_envs, as SB3's ``EvalCallback``), evaluate the model at
    each width of ``widths`` (default: the model's ``eval_widths``; for a plain SB3 model, e.g. an individually
    trained baseline, pass ``widths=[its width]`` as its label) on ``eval_env``; log ``eval/mean_reward_w<w>``
    and write ``<log_path>/spectrum.csv`` (latest) and ``<log_path>/evaluations.csv`` (all, with ``timesteps``).
    ``history`` holds the rows of every evaluation."""

    def __init__(self, eval_env, widths: Sequence[float] | None = None, eval_freq: int = 10_000,
                 n_eval_episodes: int = 5, deterministic: bool = True, log_path: str | None = None, verbose: int = 1):
        super().__init__(verbose)
        self.eval_env, self.widths, self.eval_freq = eval_env, widths, eval_freq
        self.n_eval_episodes, self.deterministic, self.log_path = n_eval_episodes, deterministic, log_path
        self.last_rows: list = []
        self.history: list = []
        self._costs: dict | None = None

    def _on_step(self) -> bool:
        if self.eval_freq > 0 and self.n_calls % self.eval_freq == 0:
            self.evaluate()
        return True

    def evaluate(self) -> list:
        """Evaluate every width now; returns the rows (also logged and written)."""
        widths = self.widths or self.model.slim_settings.eval_widths
        if self._costs is None:  # the architecture does not change during training: profile once
            self._costs = width_costs(self.model, widths)
        self.last_rows = evaluate_widths(self.model, self.eval_env, widths, self.n_eval_episodes, self.deterministic,
                                         costs=self._costs)
        self.history += [{"timesteps": self.num_timesteps, **r} for r in self.last_rows]
        for r in self.last_rows:
            self.logger.record(f"eval/mean_reward_w{r['width']:g}", r["mean_reward"])
            if self.verbose:
                print(f"{self.num_timesteps} steps, width {r['width']:g}: mean reward {r['mean_reward']:.1f} "
                      f"+/- {r['std_reward']:.1f}")
        if self.log_path:
            write_spectrum_csv(self.last_rows, os.path.join(self.log_path, "spectrum.csv"))
            write_spectrum_csv(self.history, os.path.join(self.log_path, "evaluations.csv"))
        self.logger.dump(self.num_timesteps)
        return self.last_rows
