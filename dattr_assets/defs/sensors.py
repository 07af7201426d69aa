"""Data-driven runs: a sensor turns dataset files into partitions, automation carries them down."""


import json

from dagster import (AssetKey, AssetSelection, AutomationConditionSensorDefinition, DefaultSensorStatus, RunRequest,
                     SensorEvaluationContext, SensorResult, SkipReason, sensor)

from dattr_core.data import DatasetError, dataset_name, load_dataset
from dattr_core.store import datasets_dir

from .partitions import eval_partitions, train_partitions
from .resources import DattrResource

SUFFIXES = (".parquet", ".jsonl")


def scan_datasets(context: SensorEvaluationContext, dattr: DattrResource) -> SensorResult | SkipReason:
    """Validate new or changed files under datasets/{train,eval}/; add partitions; request runs.

    A bad file (bad name, broken schema) or a removed one is reported in the sensor's log and
    remembered in the cursor, so it is neither retried every tick nor allowed to crash the sensor.
    """
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    now: dict[str, str] = {}
    runs, partition_requests, notes = [], [], []
    for kind, parts in (("train", train_partitions), ("eval", eval_partitions)):
        existing = set(context.instance.get_dynamic_partitions(parts.name))
        new_names = []
        folder = datasets_dir(kind, dattr.root)
        files = sorted(p for p in folder.glob("*") if p.suffix in SUFFIXES and not p.name.startswith(".")) \
            if folder.is_dir() else []
        for path in files:
            key = f"{kind}/{path.name}"
            stat = path.stat()
            now[key] = f"{stat.st_size}:{stat.st_mtime_ns}"
            if seen.get(key) == now[key]:
                continue
            try:
                name = dataset_name(path)
                load_dataset(path, kind)
            except (DatasetError, ValueError) as e:
                notes.append(f"skipped {key}: {e}")
                context.log.warning(f"skipped {key}: {e}")
                continue
            if name not in existing and name not in new_names:
                new_names.append(name)
            runs.append(RunRequest(run_key=f"{key}:{now[key]}", partition_key=name,
                                   asset_selection=[AssetKey(f"{kind}_dataset")], tags={"dattr/file": key}))
        for key in sorted(set(seen) - set(now)):
            if key.startswith(f"{kind}/"):
                notes.append(f"{key} was removed; its partition and outputs are kept")
                context.log.warning(notes[-1])
        if new_names:
            partition_requests.append(parts.build_add_request(new_names))
    if not runs and not partition_requests:
        return SensorResult(skip_reason=SkipReason("; ".join(notes) or "no new or changed dataset files"),
                            cursor=json.dumps(now, sort_keys=True))
    return SensorResult(run_requests=runs, dynamic_partitions_requests=partition_requests,
                        cursor=json.dumps(now, sort_keys=True))


def dataset_sensor(interval_s: int):
    @sensor(name="dataset_files", minimum_interval_seconds=interval_s, default_status=DefaultSensorStatus.RUNNING,
            asset_selection=AssetSelection.assets("train_dataset", "eval_dataset"),
            description="Watches datasets/{train,eval}/ and adds a partition per valid file.")
    def _sensor(context: SensorEvaluationContext, dattr: DattrResource):
        return scan_datasets(context, dattr)

    return _sensor


def automation_sensor(interval_s: int) -> AutomationConditionSensorDefinition:
    """Evaluates `eager()` conditions, so new data flows to scores, selection, adapter and judge."""
    return AutomationConditionSensorDefinition("dattr_automation", target=AssetSelection.all(),
                                               default_status=DefaultSensorStatus.RUNNING,
                                               minimum_interval_seconds=interval_s)
