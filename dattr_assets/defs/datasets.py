"""`train_dataset` / `eval_dataset`: validate a dropped file; the blocking schema check guards
everything downstream."""


import json
from collections import Counter

from dagster import (AssetCheckResult, AssetCheckSpec, AssetExecutionContext, MaterializeResult,
                     MetadataValue, asset)

from dattr_core.data import Dataset, DatasetError, load_dataset
from dattr_core.store import dataset_file, file_sha256

from .partitions import eval_partitions, train_partitions
from .resources import DattrResource


def dataset_metadata(ds: Dataset) -> dict:
    meta = {"path": MetadataValue.path(str(ds.path)), "rows": len(ds), "sha256": file_sha256(ds.path)[:16],
            "with_controls": sum(e.control_messages is not None for e in ds.examples)}
    if ds.kind == "eval":
        meta.update(attribution_rows=len(ds.split("attribution")), heldout_rows=len(ds.split("heldout")),
                    trait=ds.trait.trait, rubric=ds.trait.rubric)
    planted = Counter(str(e.meta.get("planted", "")) for e in ds.examples if e.meta.get("planted"))
    if planted:
        meta["planted"] = MetadataValue.json(dict(planted))
    first = ds.examples[0]
    meta["first_row"] = MetadataValue.md(f"**id** `{first.id}`\n\n```json\n{json.dumps(first.treatment_messages, indent=1)[:1500]}\n```")
    return meta


def _dataset_asset(kind: str):
    parts = train_partitions if kind == "train" else eval_partitions

    @asset(name=f"{kind}_dataset", partitions_def=parts, kinds={"parquet"}, group_name="datasets",
           code_version="1",
           check_specs=[AssetCheckSpec("schema", asset=f"{kind}_dataset", blocking=True,
                                       description="the file loads under the schema of design §2")],
           description=f"A {kind} dataset file under datasets/{kind}/, validated.")
    def _asset(context: AssetExecutionContext, dattr: DattrResource) -> MaterializeResult:
        path = dataset_file(kind, context.partition_key, dattr.root)
        try:
            ds = load_dataset(path, kind)
        except DatasetError as e:
            context.log.error(str(e))  # the step fails: nothing downstream runs on a bad file
            raise
        return MaterializeResult(metadata=dataset_metadata(ds),
                                 check_results=[AssetCheckResult(check_name="schema", passed=True,
                                                                 metadata={"rows": len(ds)})])

    return _asset


train_dataset = _dataset_asset("train")
eval_dataset = _dataset_asset("eval")
