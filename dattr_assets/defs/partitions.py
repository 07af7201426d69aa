"""Dynamic partitions: one key per dataset file; `pairs` = train × eval.

Dagster allows two partition dimensions, so the attribution method is part of the asset key.
"""

import warnings

from dagster import BetaWarning, DynamicPartitionsDefinition, MultiPartitionsDefinition, MultiToSingleDimensionPartitionMapping

train_partitions = DynamicPartitionsDefinition(name="train_datasets")
eval_partitions = DynamicPartitionsDefinition(name="eval_datasets")
pair_partitions = MultiPartitionsDefinition({"train": train_partitions, "eval": eval_partitions})

with warnings.catch_warnings():  # beta in Dagster 1.13 (pinned); its warning on every load is noise
    warnings.simplefilter("ignore", BetaWarning)
    to_train = MultiToSingleDimensionPartitionMapping(partition_dimension_name="train")
    to_eval = MultiToSingleDimensionPartitionMapping(partition_dimension_name="eval")


def pair_keys(context) -> tuple[str, str]:
    """(train, eval) dataset names of a `pairs` partition."""
    keys = context.partition_key.keys_by_dimension
    return keys["train"], keys["eval"]
