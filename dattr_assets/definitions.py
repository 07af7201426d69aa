"""Assembles the Dagster definitions from `defs/`, shaped by the settings file (`dattr.yaml`).

The experiment list decides which asset keys exist (`rct-rc/scores`, ...), so it is read when
the code location loads; the resource reads the same file for run-time values.
"""

from __future__ import annotations

from dagster import Definitions, in_process_executor

from dattr_core.config import load_settings

from .defs.datasets import eval_dataset, train_dataset
from .defs.experiments import base_assets, experiment_assets, leaderboard_asset
from .defs.resources import DattrResource
from .defs.sensors import automation_sensor, dataset_sensor
from .defs.vectors import activation_vectors, persona_vectors_asset, trak_vectors_asset


def build_definitions(config_path: str | None = None) -> Definitions:
    settings = load_settings(config_path)
    assets = [train_dataset, eval_dataset]
    for kind in ("train", "eval"):
        if methods := settings.activation_methods(kind):
            assets.append(activation_vectors(kind, methods))
    if settings.needs("trak"):
        assets += [trak_vectors_asset("train"), trak_vectors_asset("eval")]
    if settings.needs("pv"):
        assets.append(persona_vectors_asset())
    experiments = settings.parsed_experiments
    for exp in experiments:
        assets += experiment_assets(exp, settings.rule_of(exp))
    assets += base_assets() + [leaderboard_asset(experiments)]
    return Definitions(
        assets=assets,
        sensors=[dataset_sensor(settings.sensor_interval_s), automation_sensor(settings.sensor_interval_s)],
        resources={"dattr": DattrResource(config_path=config_path or "")},
        # One process per run: a step's cost is the model, not re-importing torch in a subprocess.
        # Pools limit runs across the instance (`dagster_home/dagster.yaml`, granularity: run).
        executor=in_process_executor,
    )


defs = build_definitions()
