"""Dataset files: the schema of design §2, loading from parquet/JSONL, and clear errors.

A dataset is a list of `Example`s. Every error that a user can cause by handing us a bad file is
a `DatasetError` that names the file, the row and the field, so it can be fixed without a debugger.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

Kind = Literal["train", "eval"]
Message = dict[str, str]
RUBRICS = ("trait_0_3", "reference_0_3", "ground_truth_0_2")
SPLITS = ("attribution", "heldout")
ROLES = ("system", "user", "assistant", "tool")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")


class DatasetError(ValueError):
    """A dataset file breaks the schema. Carries where: file, row (0-based) and field."""

    def __init__(self, file: str | Path, message: str, row: int | None = None, field: str | None = None):
        self.file, self.row, self.field = str(file), row, field
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Example:
    """One row: a chat ending in the treatment reply, optionally its matched control reply."""

    id: str
    treatment_messages: list[Message]
    control_messages: list[Message] | None = None
    split: str = "attribution"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> list[Message]:
        """The conversation before the last assistant reply (shared by treatment and control)."""
        return self.treatment_messages[:-1]


@dataclass(frozen=True)
class Trait:
    """The behaviour an eval dataset measures, read from its `NAME.trait.yaml` sidecar."""

    trait: str
    rubric: str
    description: str = ""
    examples: list[dict[str, Any]] = field(default_factory=list)
    positive_system_prompt: str | None = None
    negative_system_prompt: str | None = None


@dataclass
class Dataset:
    name: str
    kind: Kind
    path: Path
    examples: list[Example]
    trait: Trait | None = None

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.examples]

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]


def validate_name(name: str, what: str = "dataset name") -> str:
    """Names become partition keys and folder names: letters, digits, `_ . -`, no `..`."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-100 letters, digits, '_', '-', '.', "
            "starting with a letter or digit, no '..', '/' or control characters"
        )
    return name


def dataset_name(path: str | Path) -> str:
    """`datasets/train/dolly_10k.parquet` → `dolly_10k` (validated)."""
    p = Path(path)
    name = p.name
    for suffix in (".parquet", ".jsonl"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return validate_name(name)


def default_split(example_id: str, heldout_share: float = 0.2) -> str:
    """Deterministic 80/20 split by a stable hash of the id (not Python's salted `hash`)."""
    h = int.from_bytes(hashlib.sha256(example_id.encode("utf-8")).digest()[:8], "big")
    return "heldout" if (h % 10_000) < heldout_share * 10_000 else "attribution"


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], dict[bytes, bytes]]:
    if not path.exists():
        raise DatasetError(path, "file not found")
    if path.stat().st_size == 0:
        raise DatasetError(path, "file is empty")
    if path.suffix == ".jsonl":
        rows = []
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            line = path.read_bytes()[: e.start].count(b"\n")
            raise DatasetError(path, f"not valid UTF-8 at byte {e.start}", row=line) from None
        for i, line in enumerate(l for l in text.splitlines() if l.strip()):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(path, f"not valid JSON ({e.msg})", row=i) from None
            if not isinstance(obj, dict):
                raise DatasetError(path, "each line must be a JSON object", row=i)
            rows.append(obj)
        return rows, {}
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DatasetError(path, f"not a readable parquet file ({e})") from None
        except UnicodeDecodeError as e:
            raise DatasetError(path, f"not valid UTF-8 ({e.reason})") from None
        for name, col in zip(table.column_names, table.columns):
            if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
                for i, v in enumerate(col.to_pylist()):
                    if v is not None:
                        try:
                            v.decode("utf-8")
                        except UnicodeDecodeError:
                            raise DatasetError(path, "not valid UTF-8", row=i, field=name) from None
        try:
            rows = table.to_pylist()
        except UnicodeDecodeError as e:
            raise DatasetError(path, f"not valid UTF-8 ({e.reason})") from None
        return rows, dict(table.schema.metadata or {})
    raise DatasetError(path, "unsupported file type: use .parquet or .jsonl")


def _messages(path: Path, row: int, fieldname: str, value: Any) -> list[Message]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DatasetError(path, "must be a list of {role, content} messages", row, fieldname) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise DatasetError(path, "must be a non-empty list of {role, content} messages", row, fieldname)
    out: list[Message] = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(path, f"message {j} must have string 'role' and 'content'", row, fieldname)
        if m["role"] not in ROLES:
            raise DatasetError(path, f"message {j} has unknown role {m['role']!r}", row, fieldname)
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DatasetError(path, "last message must be the assistant reply", row, fieldname)
    if not out[-1]["content"].strip():
        raise DatasetError(path, "the assistant reply is empty", row, fieldname)
    if not any(m["role"] == "user" for m in out[:-1]):
        raise DatasetError(path, "no user message before the assistant reply", row, fieldname)
    return out


def _meta(path: Path, row: int, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise DatasetError(path, "must be a JSON object", row, "meta") from None
    if not isinstance(value, dict):
        raise DatasetError(path, "must be a struct / JSON object", row, "meta")
    return {k: v for k, v in value.items() if v is not None}


def parse_rows(path: Path, rows: list[dict[str, Any]], kind: Kind) -> list[Example]:
    """Validate raw row dicts into Examples. Shared by file loading and in-memory callers."""
    if not rows:
        raise DatasetError(path, "dataset has no rows")
    if "treatment_messages" not in rows[0]:
        raise DatasetError(path, "missing required column", field="treatment_messages")
    if kind == "eval" and "control_messages" not in rows[0]:
        raise DatasetError(path, "missing required column (eval datasets need matched pairs)", field="control_messages")
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for i, r in enumerate(rows):
        raw_id = r.get("id")
        ex_id = str(i) if raw_id is None else str(raw_id)
        if not ex_id.strip():
            raise DatasetError(path, "id is empty", i, "id")
        if ex_id in seen:
            raise DatasetError(path, f"duplicate id {ex_id!r} (first at row {seen[ex_id]})", i, "id")
        seen[ex_id] = i
        treatment = _messages(path, i, "treatment_messages", r.get("treatment_messages"))
        control = None
        if r.get("control_messages") is not None:
            control = _messages(path, i, "control_messages", r["control_messages"])
            if control[:-1] != treatment[:-1]:
                raise DatasetError(path, "control must share the treatment's prompt (all messages but the last)", i, "control_messages")
        elif kind == "eval":
            raise DatasetError(path, "eval rows need a control reply", i, "control_messages")
        split = r.get("split")
        if kind == "eval":
            split = default_split(ex_id) if split is None else split
            if split not in SPLITS:
                raise DatasetError(path, f"must be one of {SPLITS}, got {split!r}", i, "split")
        else:
            split = "attribution"
        examples.append(Example(ex_id, treatment, control, split, _meta(path, i, r.get("meta"))))
    return examples


def load_trait(path: str | Path) -> Trait:
    """Read a `NAME.trait.yaml` sidecar."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"not valid YAML ({e})") from None
    return parse_trait(path, raw)


def parse_trait(path: Path, raw: Any) -> Trait:
    if not isinstance(raw, dict):
        raise DatasetError(path, "trait sidecar must be a mapping")
    for key in ("trait", "rubric"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise DatasetError(path, "missing or empty", field=key)
    if raw["rubric"] not in RUBRICS:
        raise DatasetError(path, f"unknown rubric {raw['rubric']!r}; expected one of {RUBRICS}", field="rubric")
    examples = raw.get("examples") or []
    if not isinstance(examples, list):
        raise DatasetError(path, "must be a list", field="examples")
    return Trait(
        trait=raw["trait"].strip(),
        rubric=raw["rubric"],
        description=str(raw.get("description") or "").strip(),
        examples=examples,
        positive_system_prompt=raw.get("positive_system_prompt"),
        negative_system_prompt=raw.get("negative_system_prompt"),
    )


def trait_path(path: str | Path) -> Path:
    p = Path(path)
    return p.with_name(dataset_name(p) + ".trait.yaml")


def load_dataset(path: str | Path, kind: Kind, require_trait: bool | None = None) -> Dataset:
    """Load and validate a train or eval dataset file (and an eval set's trait sidecar)."""
    path = Path(path)
    name = dataset_name(path)
    rows, kv = _read_rows(path)
    examples = parse_rows(path, rows, kind)
    trait = None
    sidecar = trait_path(path)
    if sidecar.exists():
        trait = load_trait(sidecar)
    elif b"trait" in kv:
        try:
            trait = parse_trait(path, json.loads(kv[b"trait"].decode("utf-8")))
        except json.JSONDecodeError:
            raise DatasetError(path, "parquet key-value metadata 'trait' is not JSON") from None
    if trait is None and (require_trait if require_trait is not None else kind == "eval"):
        raise DatasetError(path, f"eval dataset needs a trait sidecar {sidecar.name} (trait, rubric)")
    if kind == "eval":
        for s in SPLITS:
            if not any(e.split == s for e in examples):
                raise DatasetError(path, f"no rows in split '{s}'", field="split")
    return Dataset(name, kind, path, examples, trait)


def examples_to_table(examples: list[Example]) -> pa.Table:
    """The canonical parquet layout (meta as a JSON string, so heterogenous keys round-trip)."""
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    return pa.table(
        {
            "id": pa.array([e.id for e in examples], pa.string()),
            "treatment_messages": pa.array([e.treatment_messages for e in examples], msg),
            "control_messages": pa.array([e.control_messages for e in examples], msg),
            "split": pa.array([e.split for e in examples], pa.string()),
            "meta": pa.array([json.dumps(e.meta, sort_keys=True) for e in examples], pa.string()),
        }
    )


def write_examples(path: str | Path, examples: list[Example], trait: Trait | None = None) -> Path:
    """Write a dataset file atomically (and its trait sidecar next to it)."""
    from .store import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if trait is not None:
        side = trait_path(path)
        with atomic_path(side) as tmp:
            tmp.write_text(yaml.safe_dump(trait.__dict__, sort_keys=False, allow_unicode=True), encoding="utf-8")
    with atomic_path(path) as tmp:
        pq.write_table(examples_to_table(examples), tmp)
    return path
