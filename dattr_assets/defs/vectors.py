"""Attribution vectors per dataset: one multi-asset computes every activation method in one pass;
`trak` and `pv` are their own assets. All run the model, so all sit in the `gpu` pool."""


import sys

import numpy as np
from dagster import (AssetCheckResult, AssetCheckSpec, AssetExecutionContext, AssetKey, AssetSpec,
                     AutomationCondition, MaterializeResult, MetadataValue, PipesSubprocessClient, multi_asset)

from dattr_core.attribute import AttributeConfig, attribute, ensure_controls
from dattr_core.config import Settings
from dattr_core.data import load_dataset
from dattr_core.generate import SamplingConfig
from dattr_core.methods import needs_control
from dattr_core.models import DEMO_MODEL, load_model
from dattr_core.persona import persona_vectors
from dattr_core.trak import TrakConfig, attribute_trak
from dattr_core.pipeline import resolve_layer
from dattr_core.store import VectorSet, dataset_file, model_tag, vectors_dir

from .partitions import eval_partitions, train_partitions
from .resources import DattrResource

EAGER = AutomationCondition.eager()


def vectors_key(method: str, kind: str) -> AssetKey:
    return AssetKey(["vectors", method, kind])


def vector_checks(vs: VectorSet, rows: int, key: AssetKey) -> list[AssetCheckResult]:
    """Count = dataset rows, and every value finite (one shard in memory at a time)."""
    finite = True
    try:
        for _ in vs.iter_shards(check_finite=True):
            pass
    except ValueError as e:
        finite, why = False, str(e)
    return [
        AssetCheckResult(asset_key=key, check_name="count_matches_rows", passed=len(vs) == rows,
                         metadata={"vectors": len(vs), "rows": rows}),
        AssetCheckResult(asset_key=key, check_name="all_finite", passed=finite,
                         metadata={} if finite else {"error": why}),
    ]


def vector_metadata(vs: VectorSet) -> dict:
    m = vs.meta
    _, sample = next(vs.iter_shards(check_finite=False))  # one shard is sample enough; the checks judge NaN
    return {"path": MetadataValue.path(str(vs.path)), "rows": len(vs), "dim": vs.dim, "model": m["model"],
            "layer": m["layer"], "method": m["method"], "model_tag": m["model_tag"],
            "examples_per_s": m["timings"]["examples_per_s"] or 0.0, "seconds": m["timings"]["seconds"],
            "world_size": m["world_size"], "mean_norm": float(np.nanmean(np.linalg.norm(sample, axis=1)))}


def _attribute_config(s: Settings, methods: list[str], root) -> AttributeConfig:
    return AttributeConfig(model=s.model, layer=s.layer, methods=methods, max_tokens=s.max_tokens,
                           batch_tokens=s.batch_tokens, device=s.device, dtype=s.dtype, root=str(root))


def _torchrun(context: AssetExecutionContext, s: Settings, kind: str, path, methods: list[str], root) -> list:
    """Multi-GPU: launch torchrun through Dagster Pipes; rank 0 reports back the metadata."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.gpus}",
           "-m", "dattr_core.cli", "attribute", "--data", str(path), "--kind", kind, "--methods", ",".join(methods),
           "--max-tokens", str(s.max_tokens), "--batch-tokens", str(s.batch_tokens), "--root", str(root),
           "--no-progress", "--pipes"] + (["--controls"] if needs_control(methods) else [])
    for flag, value in (("--model", s.model), ("--layer", s.layer), ("--dtype", s.dtype),
                        ("--controls-max-new-tokens", s.controls.get("max_new_tokens")),
                        ("--controls-batch-size", s.controls.get("batch_size"))):
        if value is not None:
            cmd += [flag, str(value)]
    return PipesSubprocessClient().run(command=cmd, context=context).get_results()


def activation_vectors(kind: str, methods: list[str]):
    """The multi-asset `vectors/{method}/{kind}` for every activation method, from one pass."""
    parts = train_partitions if kind == "train" else eval_partitions
    specs = [AssetSpec(vectors_key(m, kind), deps=[f"{kind}_dataset"], automation_condition=EAGER,
                       kinds={"pytorch", "numpy"}, group_name="vectors", code_version="1",
                       description=f"`{m}` attribution vectors of every {kind} example (design §3).")
             for m in methods]
    checks = [AssetCheckSpec(name, asset=vectors_key(m, kind)) for m in methods
              for name in ("count_matches_rows", "all_finite")]

    @multi_asset(name=f"{kind}_activation_vectors", specs=specs, check_specs=checks, partitions_def=parts,
                 pool="gpu", can_subset=False)
    def _vectors(context: AssetExecutionContext, dattr: DattrResource):
        s = dattr.settings()
        path = dataset_file(kind, context.partition_key, dattr.root)
        if s.gpus > 1:
            yield from _torchrun(context, s, kind, path, methods, dattr.root)  # rank 0's materialisations
            rows = len(load_dataset(path, kind))
            tag = model_tag(s.model or DEMO_MODEL, resolve_layer(s))
            for m in methods:
                vs = VectorSet.open(vectors_dir(tag, m, context.partition_key, dattr.root))
                yield from vector_checks(vs, rows, vectors_key(m, kind))
            return
        model, tok = load_model(s.model, s.device, s.dtype)  # once, for controls and vectors
        ds = load_dataset(path, kind)
        if needs_control(methods):  # `rd`/`rc` of train rows without a control reply: generate it first
            ds = ensure_controls(ds, s.model, root=dattr.root, model=model, tok=tok, generation=s.controls)
        res = attribute(ds, _attribute_config(s, methods, dattr.root), model, tok, progress=False)
        context.log.info(f"{ds.name}: {res.shards_computed} shards computed, {res.shards_reused} reused, "
                         f"{res.examples_per_s:.1f} examples/s")
        for m, vs in res.vectors.items():
            key = vectors_key(m, kind)
            yield MaterializeResult(asset_key=key, metadata=vector_metadata(vs),
                                    check_results=vector_checks(vs, len(ds), key))

    return _vectors


def persona_vectors_asset():
    """`vectors/pv/eval`: the persona-vector query of each eval set (generation + one pass)."""
    key = vectors_key("pv", "eval")

    @multi_asset(name="eval_persona_vectors", partitions_def=eval_partitions, pool="gpu",
                 specs=[AssetSpec(key, deps=["eval_dataset"], automation_condition=EAGER, kinds={"pytorch", "numpy"},
                                  group_name="vectors", code_version="1",
                                  description="Persona-vector query: a(pos) − a(neg) of the model's own replies "
                                              "under the trait's positive / negative system prompts.")],
                 check_specs=[AssetCheckSpec("all_finite", asset=key)])
    def _pv(context: AssetExecutionContext, dattr: DattrResource):
        s = dattr.settings()
        ds = load_dataset(dataset_file("eval", context.partition_key, dattr.root), "eval")
        model, tok = load_model(s.model, s.device, s.dtype)
        sampling = SamplingConfig.greedy(max_new_tokens=s.generate.get("max_new_tokens", 64))
        vs = persona_vectors(ds, _attribute_config(s, ["rd"], dattr.root), model, tok, sampling, s.model).vectors["pv"]
        checks = [c for c in vector_checks(vs, len(vs), key) if c.check_name == "all_finite"]
        yield MaterializeResult(asset_key=key, metadata={**vector_metadata(vs), "prompts": len(vs)},
                                check_results=checks)

    return _pv


def trak_vectors_asset(kind: str):
    """`vectors/trak/{kind}`: the weight-space baseline (projected per-example gradients)."""
    parts = train_partitions if kind == "train" else eval_partitions
    key = vectors_key("trak", kind)

    @multi_asset(name=f"{kind}_trak_vectors", partitions_def=parts, pool="gpu",
                 specs=[AssetSpec(key, deps=[f"{kind}_dataset"], automation_condition=EAGER, kinds={"pytorch", "numpy"},
                                  group_name="vectors", code_version="1",
                                  description="TRAK baseline: ∇ℓ(treatment) of every linear layer, projected to "
                                              "4096 dims with a fixed, seeded projection.")],
                 check_specs=[AssetCheckSpec(n, asset=key) for n in ("count_matches_rows", "all_finite")])
    def _trak(context: AssetExecutionContext, dattr: DattrResource):
        s = dattr.settings()
        ds = load_dataset(dataset_file(kind, context.partition_key, dattr.root), kind)
        cfg = TrakConfig(**{**_attribute_config(s, ["trak"], dattr.root).__dict__, "methods": ["trak"]})
        vs = attribute_trak(ds, cfg, progress=False).vectors["trak"]
        yield MaterializeResult(asset_key=key, metadata=vector_metadata(vs), check_results=vector_checks(vs, len(ds), key))

    return _trak
