"""The project settings file (`dattr.yaml` at the repository root, or `$DATTR_CONFIG`).

One place says which experiments exist, which model and layer, k, and how to fine-tune and judge.
The CLI's `dattr demo` and the Dagster definitions both read it, so both build the same graph.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .methods import control_method_for

ATTR_METHODS = ("rd", "rct", "rc", "rct_response", "grad", "residual", "trak")
QUERY_METHODS = ATTR_METHODS + ("pv",)
REFERENCE_RANKINGS = ("emb", "lex", "loss", "random")
CONTROLS_KEYS = ("max_new_tokens", "batch_size")
SCORING_RULES = ("cos_sim", "proj", "dot", "cos_sim_debias_train", "cos_sim_debias_eval")
_EXPERIMENT_RE = re.compile(r"^([a-z_]+)-([a-z_]+)(?:-([a-z_]+))?$")


@dataclass(frozen=True)
class Experiment:
    """An experiment name `{attr}-{query}[-{rule}]` or a reference ranking (`emb`, `lex`, `loss`,
    `random`). Design §1: an experiment is (method, query, scoring rule, k); without a `-{rule}`
    suffix it uses the settings' `scoring_rule`, e.g. `rct-rct-cos_sim_debias_train`."""

    name: str
    attr: str | None = None
    query: str | None = None
    rule: str | None = None

    @property
    def is_reference(self) -> bool:
        return self.attr is None


def parse_experiment(name: str) -> Experiment:
    if name in REFERENCE_RANKINGS:
        return Experiment(name)
    m = _EXPERIMENT_RE.match(name)
    if not m or m.group(1) not in ATTR_METHODS or m.group(2) not in QUERY_METHODS \
            or (m.group(3) and m.group(3) not in SCORING_RULES):
        raise ValueError(
            f"unknown experiment {name!r}: use '{{attr}}-{{query}}[-{{rule}}]' with attr in {ATTR_METHODS}, query "
            f"in {QUERY_METHODS} and rule in {SCORING_RULES}, or one of {REFERENCE_RANKINGS}"
        )
    if (m.group(1) == "trak") != (m.group(2) == "trak"):
        raise ValueError(f"experiment {name!r}: trak vectors live in weight space; use trak-trak")
    return Experiment(name, m.group(1), m.group(2), m.group(3))


@dataclass
class Settings:
    model: str | None = None  # None = the shipped demo model
    layer: int | None = None
    device: str | None = None
    dtype: str | None = None
    max_tokens: int = 1024
    batch_tokens: int = 8192
    k: int = 500
    scoring_rule: str = "cos_sim"
    selection_seed: int = 0
    experiments: list[str] = field(default_factory=lambda: ["rct-rc", "rd-rd", "trak-trak", "random"])
    controls: dict[str, int] = field(default_factory=dict)  # greedy control replies: max_new_tokens, batch_size
    finetune: dict[str, Any] = field(default_factory=dict)  # overrides of the LoRA defaults
    generate: dict[str, Any] = field(default_factory=lambda: {"n_samples": 3, "max_new_tokens": 64})
    judge: dict[str, Any] = field(default_factory=lambda: {"concurrency": 8})
    gpus: int = 1  # >1: vectors run under torchrun through Dagster Pipes
    sensor_interval_s: int = 30

    @property
    def parsed_experiments(self) -> list[Experiment]:
        return [parse_experiment(e) for e in self.experiments]

    def rule_of(self, exp: Experiment) -> str:
        return exp.rule or self.scoring_rule

    def activation_methods(self, kind: str) -> list[str]:
        """Activation methods the experiments need on one side: the attribution methods on train
        sets, the query methods (plus the control-reply vectors of `cos_sim_debias_eval`
        experiments) on eval sets. A train set gets generated controls only if one of its
        methods is paired (`rd`, `rc`)."""
        exps = self.parsed_experiments
        used = {e.attr for e in exps} if kind == "train" else {e.query for e in exps}
        methods = [m for m in ATTR_METHODS if m in used and m != "trak"]
        if kind == "eval":
            methods += sorted({control_method_for(e.query) for e in exps
                               if e.query and self.rule_of(e) == "cos_sim_debias_eval"})
        return methods

    def needs(self, method: str) -> bool:
        return any(method in (e.attr, e.query) for e in self.parsed_experiments)


def config_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get("DATTR_CONFIG") or "dattr.yaml")


def load_settings(path: str | Path | None = None) -> Settings:
    """Read settings; a missing file gives the defaults, an unknown key is an error."""
    p = config_path(path)
    raw = yaml.safe_load(p.read_text(encoding="utf-8")) if p.exists() else {}
    raw = raw or {}
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{p}: unknown setting(s) {unknown}; known: {sorted(known)}")
    s = Settings(**raw)
    s.parsed_experiments  # validate names early
    if s.scoring_rule not in SCORING_RULES:
        raise ValueError(f"{p}: unknown scoring_rule {s.scoring_rule!r}; choose from {SCORING_RULES}")
    if s.k < 1:
        raise ValueError(f"{p}: k must be ≥ 1, got {s.k}")
    bad = sorted(set(s.controls) - set(CONTROLS_KEYS))
    if bad or not all(isinstance(v, int) and v >= 1 for v in s.controls.values()):
        raise ValueError(f"{p}: controls takes positive integers for {CONTROLS_KEYS}, got {s.controls}")
    return s
