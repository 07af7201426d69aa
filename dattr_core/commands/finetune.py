"""`dattr finetune` (LoRA on a selection) and `dattr generate` (replies on held-out prompts).

With `--experiment E --train T --eval V` both read and write the experiment folder of design §6
(`selection.parquet` → `adapter/` → `generations.parquet`); `--selection/--out/--adapter` override.
The experiment `base` (design §1, no fine-tuning) generates with the base model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq

from ..data import Dataset, Example, dataset_name, load_dataset
from ..store import datasets_dir, experiment_dir

# Flags left unset keep the config dataclasses' defaults (design §5), so those live in one place.
_FT_FLAGS = {"r": int, "lora_alpha": int, "lora_dropout": float, "lr": float, "weight_decay": float,
             "batch_size": int, "epochs": int, "max_tokens": int, "seed": int}
_GEN_FLAGS = {"n_samples": int, "temperature": float, "top_p": float, "max_new_tokens": int, "batch_size": int,
              "seed": int}


def dataset_path(name_or_path: str, kind: str) -> Path:
    """A file path as given, else the dataset named so under `datasets/{kind}/`."""
    p = Path(name_or_path)
    if p.suffix in (".parquet", ".jsonl") or p.exists():
        return p
    for suffix in (".parquet", ".jsonl"):
        if (datasets_dir(kind) / f"{name_or_path}{suffix}").exists():
            return datasets_dir(kind) / f"{name_or_path}{suffix}"
    raise FileNotFoundError(f"no {kind} dataset {name_or_path!r} in {datasets_dir(kind)} (.parquet or .jsonl)")


def selected_examples(dataset: Dataset, selection: Path | None) -> list[Example]:
    """The rows whose ids are in the selection file's `id` column (all rows without one)."""
    if selection is None:
        return list(dataset.examples)
    if not selection.exists():
        raise FileNotFoundError(f"{selection}: selection file not found (run `dattr select` first?)")
    table = pq.read_table(selection)
    if "id" not in table.column_names:
        raise ValueError(f"{selection}: needs an 'id' column")
    ids = [str(i) for i in table.column("id").to_pylist()]
    by_id = {e.id: e for e in dataset.examples}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ValueError(f"{selection}: {len(unknown)} ids not in {dataset.path} (e.g. {unknown[:3]})")
    return [by_id[i] for i in dict.fromkeys(ids)]


def _exp_dir(args: argparse.Namespace) -> Path | None:
    if args.experiment is None:
        return None
    if not (args.train and args.eval):
        raise ValueError("--experiment needs --train and --eval (the experiment folder is experiment/train/eval)")
    return experiment_dir(args.experiment, dataset_name(args.train), dataset_name(args.eval))


def cmd_finetune(args: argparse.Namespace) -> int:
    from ..finetune import FinetuneConfig, finetune
    from ..models import load_model

    exp = _exp_dir(args)
    out = args.out or (exp / "adapter" if exp else None)
    if out is None:
        raise ValueError("give --out ADAPTER_DIR, or --experiment with --train and --eval")
    selection = args.selection or (exp / "selection.parquet" if exp else None)
    examples = selected_examples(load_dataset(dataset_path(args.train, "train"), "train"), selection)
    config = FinetuneConfig(**_overrides(args, _FT_FLAGS))
    model, tok = load_model(args.model, args.device, args.dtype)
    _, summary = finetune(model, tok, examples, out, config)
    print(json.dumps({"adapter": str(out), **summary}, indent=2))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..finetune import load_adapter
    from ..generate import SamplingConfig, generate_heldout
    from ..models import load_model

    exp = _exp_dir(args)
    out = args.out or (exp / "generations.parquet" if exp else None)
    if out is None:
        raise ValueError("give --out FILE.parquet, or --experiment with --train and --eval")
    adapter = args.adapter or (exp / "adapter" if exp and args.experiment != "base" else None)
    dataset = load_dataset(dataset_path(args.eval, "eval"), "eval")
    examples = dataset.split(args.split)
    overrides = _overrides(args, _GEN_FLAGS)
    config = SamplingConfig.greedy(**overrides) if args.greedy else SamplingConfig(**overrides)
    model, tok = load_model(args.model, args.device, args.dtype)
    if adapter is not None:
        model = load_adapter(model, adapter)
    generate_heldout(model, tok, examples, out, config, model_name=args.model or "demo",
                     adapter=str(adapter) if adapter else None)
    print(f"wrote {len(examples) * config.n_samples} replies to {out}")
    return 0


def _overrides(args: argparse.Namespace, flags: dict[str, type]) -> dict[str, object]:
    return {k: getattr(args, k) for k in flags if getattr(args, k) is not None}


def _add_flags(p: argparse.ArgumentParser, flags: dict[str, type], what: str) -> None:
    for name, typ in flags.items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None,
                       help=f"override {what}.{name} (default: design §5)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id or folder (default: the demo model)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="bf16/fp32/fp16 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--experiment", default=None, help="experiment name: read/write its folder (design §6)")


def register(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="LoRA fine-tune on a selection of a train dataset")
    ft.add_argument("--train", required=True, help="train dataset name or file")
    ft.add_argument("--eval", default=None, help="eval dataset name (with --experiment)")
    ft.add_argument("--selection", type=Path, default=None, help="parquet with an 'id' column (default: all rows)")
    ft.add_argument("--out", type=Path, default=None, help="adapter folder to write")
    _model_flags(ft)
    _add_flags(ft, _FT_FLAGS, "FinetuneConfig")
    ft.set_defaults(func=cmd_finetune)

    gen = sub.add_parser("generate", help="sample replies to an eval dataset's held-out prompts")
    gen.add_argument("--eval", required=True, help="eval dataset name or file")
    gen.add_argument("--train", default=None, help="train dataset name (with --experiment)")
    gen.add_argument("--adapter", type=Path, default=None,
                     help="adapter folder (default: the experiment's adapter/; none for --experiment base)")
    gen.add_argument("--out", type=Path, default=None, help="generations parquet to write")
    gen.add_argument("--split", default="heldout", choices=("heldout", "attribution"))
    gen.add_argument("--greedy", action="store_true", help="one greedy reply per prompt")
    _add_flags(gen, _GEN_FLAGS, "SamplingConfig")
    _model_flags(gen)
    gen.set_defaults(func=cmd_generate)
