"""The benchmark's sections, in the order they run: for each, its settings (a group of
command-line options), how it runs, and how the report shows it. The peak runs first because
every floor is against it; scaling runs before generation so that a smoke run's two
share one cluster; the training runs come after the sections that share a cluster."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deploy.bench import (end_to_end, environments, generation, learner_step, lora, modes, padding,
                          peak, ranks, scaling, time_to_reward, weight_sync)


@dataclass(frozen=True)
class Section:
    title: str  # its heading in bench.md
    settings: type  # its options, `--<name>.<field>`, with a `smoke()` variant
    run: Callable  # (Harness, settings) -> its result
    markdown: Callable  # result -> the lines under its heading
    chart: Callable | None = None  # (axes, result) -> its panel of bench.png
    targets: Callable | None = None  # result -> its rows of the Targets table
    uses_peak: bool = False  # its floors need the peak section first


SECTIONS = {
    "peak": Section("The machine's limits: matmul peaks and memory bandwidth", peak.Settings,
                    peak.run, peak.markdown),
    "scaling": Section("Scaling: 1 vs 2 rollout workers", scaling.Settings, scaling.run,
                       scaling.markdown, scaling.chart),
    "generation": Section("Generation: rollout path vs Hugging Face `generate`",
                          generation.Settings, generation.run, generation.markdown,
                          generation.chart, generation.targets, uses_peak=True),
    "weight_sync": Section("Weight sync: learner to engine, reloaded, vs an in-memory copy",
                           weight_sync.Settings, weight_sync.run, weight_sync.markdown,
                           weight_sync.chart, weight_sync.targets),
    "e2e": Section("End to end: a GRPO step, ours vs TRL's GRPOTrainer", end_to_end.Settings,
                   end_to_end.run, end_to_end.markdown, end_to_end.chart, end_to_end.targets,
                   uses_peak=True),
    "learner": Section("The learner's step: where its time goes", learner_step.Settings,
                       learner_step.run, learner_step.markdown),
    "time_to_reward": Section("Time to reward", time_to_reward.Settings, time_to_reward.run,
                              time_to_reward.markdown, time_to_reward.chart,
                              time_to_reward.targets),
    "modes": Section("Weight-update modes: synchronous, rounds ahead, in flight", modes.Settings,
                     modes.run, modes.markdown, modes.chart),
    "ranks": Section("The learner on 1 and 2 ranks (FSDP2)", ranks.Settings, ranks.run,
                     ranks.markdown),
    "padding": Section("Padding: the learner on completions of spread lengths", padding.Settings,
                       padding.run, padding.markdown, targets=padding.targets),
    "lora": Section("LoRA: an adapter against full weights", lora.Settings, lora.run, lora.markdown,
                    targets=lora.targets),
    "environments": Section("Environments: multi-turn episodes in the engine loop vs one turn at a time",
                            environments.Settings, environments.run, environments.markdown),
}
