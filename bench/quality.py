"""Which method finds the planted bad data? Precision/recall at k and average precision on the
demo data, with the hard negatives in the pool.

    python bench/quality.py [--boot 200] [--draws 2000] [--out docs/benchmarks.md]

For each behaviour (eval set) the positives are the train rows with `meta.planted` equal to it;
every other row, hard negatives included, is a negative. Missing vectors are computed first
(resumable) with the settings' model and layer. AP intervals come from a bootstrap over the eval
attribution pairs (the query is rebuilt from resampled pairs); `random` is summarised over many
seeded draws (mean and 95th percentile). Nothing here is tuned to the labels: the labels are only
read to score the rankings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
from sklearn.metrics import average_precision_score

from dattr_core import baselines
from dattr_core.attribute import AttributeConfig, attribute, ensure_controls
from dattr_core.config import Settings, load_settings
from dattr_core.data import Dataset, load_dataset
from dattr_core.models import DEMO_MODEL, load_model
from dattr_core.persona import persona_vectors
from dattr_core.pipeline import resolve_layer, settings_tag
from dattr_core.scoring import Query, attribution_split, score_array
from dattr_core.store import VectorError, VectorSet, dataset_file, vectors_dir
from dattr_core.trak import TrakConfig, attribute_trak

from report import write_section

EXPERIMENTS = ["rct-rc", "rct-rd", "rct-rct", "rd-rd", "rc-rc", "rct_response-rc", "grad-grad", "rd-pv", "rct-pv",
               "trak-trak", "emb", "lex", "loss", "random"]
RULES = ["cos_sim", "proj", "dot", "cos_sim_debias_train", "cos_sim_debias_eval"]
KS = (25, 50, 100)


PAIRED = ["rd", "rc", "residual_control", "rct_control"]


def ensure_vectors(train: Dataset, evals: list[Dataset], s: Settings, experiments: list[str],
                   home: str | None) -> None:
    """Compute whatever vectors the experiments need and are missing (each step resumes from
    finished shards). Train rows without a control reply get the treatment-only methods; rd/rc
    train vectors then don't exist and their rows say so."""
    parts = {m for e in experiments if "-" in e for m in e.split("-")}
    model, tok = load_model(s.model, s.device, s.dtype)
    layer = resolve_layer(s)
    methods = ["residual", "grad", "rct", "rct_response"]
    cfg = AttributeConfig(model=s.model, layer=layer, methods=methods, max_tokens=s.max_tokens,
                          batch_tokens=s.batch_tokens, root=home)
    for ds in [train, *evals]:
        t = time.perf_counter()
        paired = all(e.control_messages is not None for e in ds.examples)
        attribute(ds, AttributeConfig(**{**cfg.__dict__, "methods": methods + (PAIRED if paired else [])}), model, tok)
        if "trak" in parts:
            attribute_trak(ds, TrakConfig(model=s.model, layer=layer, max_tokens=s.max_tokens, root=home), model, tok)
        print(f"vectors of {ds.name}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
    for ds in evals if "pv" in parts else []:
        try:
            VectorSet.open(vectors_dir(settings_tag(s), "pv", ds.name, home))
        except VectorError:
            persona_vectors(ds, cfg, model, tok, model_name=s.model)


def metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    order = np.argsort(-scores, kind="stable")
    out = {"ap": float(average_precision_score(labels, scores))}
    for k in KS:
        hits = labels[order[:k]].sum()
        out[f"p@{k}"] = hits / k
        out[f"r@{k}"] = hits / labels.sum()
    return out


def bootstrap_ap(train: np.ndarray, eval_v: np.ndarray, control: np.ndarray | None, rule: str, labels: np.ndarray,
                 boot: int, seed: int = 0) -> tuple[float, float]:
    """95% interval of AP over eval pairs resampled with replacement (the query is rebuilt)."""
    rng = np.random.default_rng(seed)
    aps = []
    for _ in range(boot):
        idx = rng.integers(0, len(eval_v), len(eval_v))
        q = Query(eval_v[idx], control=None if control is None else control[idx])
        aps.append(average_precision_score(labels, score_array(train, {"q": q}, rule)[:, 0]))
    return float(np.percentile(aps, 2.5)), float(np.percentile(aps, 97.5))


def load_rows(s: Settings, method: str, ds: Dataset, ids: list[str], home: str | None) -> np.ndarray:
    vs = VectorSet.open(vectors_dir(settings_tag(s), method, ds.name, home))
    pos = {x: i for i, x in enumerate(vs.ids)}
    return vs.load()[[pos[i] for i in ids]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default="qa_mix")
    p.add_argument("--evals", nargs="+", default=["hallucination", "sycophancy"])
    p.add_argument("--experiments", nargs="+", default=EXPERIMENTS)
    p.add_argument("--rules", nargs="+", default=RULES)
    p.add_argument("--boot", type=int, default=200)
    p.add_argument("--draws", type=int, default=2000)
    p.add_argument("--root", default=None, help="DATTR_HOME")
    p.add_argument("--layer", type=int, default=None, help="residual layer (default: the settings' layer)")
    p.add_argument("--train-controls", action="store_true",
                   help="generate control replies for the train set (slow on CPU) so rd-*/rc-* can run")
    p.add_argument("--out", default=None, help="write the table into this markdown file (between markers)")
    p.add_argument("--section", default="main", help="marker name in --out, so runs at several layers coexist")
    args = p.parse_args()
    s = load_settings()
    if args.layer is not None:
        s = dataclasses.replace(s, layer=args.layer)
    train = load_dataset(dataset_file("train", args.train, args.root), "train")
    if args.train_controls:  # rd / rc train vectors need a control reply per train row (greedy generation)
        train = ensure_controls(train, s.model, s.device, s.dtype, args.root, generation=s.controls)
    evals = [load_dataset(dataset_file("eval", e, args.root), "eval") for e in args.evals]
    ensure_vectors(train, evals, s, args.experiments, args.root)
    rows = []
    for ev in evals:
        labels = np.array([e.meta.get("planted") == ev.trait.trait or e.meta.get("planted") == ev.name
                           for e in train.examples])
        attr_ids = [e.id for e in attribution_split(ev)]
        base = f"| {ev.name} ({int(labels.sum())} planted / {len(labels)})"
        rng = np.random.default_rng(0)
        rand = [average_precision_score(labels, rng.random(len(labels))) for _ in range(args.draws)]
        rand_m = metrics(rng.random(len(labels)), labels)
        rows.append(f"{base} | random | — | {np.mean(rand):.3f} (p95 {np.percentile(rand, 95):.3f}) | — | "
                    + " | ".join(f"{rand_m[f'p@{k}']:.2f}" for k in KS) + " | "
                    + " | ".join(f"{rand_m[f'r@{k}']:.2f}" for k in KS) + " |")
        for exp in args.experiments:
            if exp == "random":
                continue
            if exp in ("lex", "loss"):
                if exp == "lex":
                    sc = baselines.lex_scores(train.examples, {ev.name: attribution_split(ev)})[:, 0]
                else:
                    model, tok = load_model(s.model, s.device, s.dtype)
                    sc = baselines.loss_scores(train.examples, model, tok, max_tokens=s.max_tokens)
                m = metrics(sc, labels)
                rows.append(f"{base} | {exp} | — | {m['ap']:.3f} | — | " + " | ".join(f"{m[f'p@{k}']:.2f}" for k in KS)
                            + " | " + " | ".join(f"{m[f'r@{k}']:.2f}" for k in KS) + " |")
                continue
            if exp == "emb":
                tr = baselines.embed_texts([e.treatment_messages[-1]["content"] for e in train.examples])
                ev_v = baselines.embed_texts([e.treatment_messages[-1]["content"] for e in attribution_split(ev)])
                variants = [("cos_sim", tr, ev_v, None)]
            else:
                attr, query = exp.split("-")
                try:
                    tr = VectorSet.open(vectors_dir(settings_tag(s), attr, train.name, args.root)).load()
                except VectorError:
                    rows.append(f"{base} | {exp} | — | not run: no `{attr}` train vectors (train rows have no "
                                "control reply; pass --train-controls) | | | | | | | |")
                    continue
                if query == "pv":
                    pv = VectorSet.open(vectors_dir(settings_tag(s), "pv", ev.name, args.root))
                    ev_v, ctrl = pv.load(), None
                else:
                    ev_v = load_rows(s, query, ev, attr_ids, args.root)
                    ctrl_m = "rct_control" if query in ("rct", "rc", "rct_response", "grad") else "residual_control"
                    ctrl = load_rows(s, ctrl_m, ev, attr_ids, args.root) if attr != "trak" else None
                variants = [(r, tr, ev_v, ctrl) for r in args.rules
                            if not (r == "cos_sim_debias_eval" and ctrl is None)]
            for rule, tr_v, ev_vec, ctrl in variants:
                sc = score_array(tr_v, {"q": Query(ev_vec, control=ctrl)}, rule)[:, 0]
                m = metrics(sc, labels)
                lo, hi = bootstrap_ap(tr_v, ev_vec, ctrl, rule, labels, args.boot)
                rows.append(f"{base} | {exp} | {rule} | {m['ap']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                            + " | ".join(f"{m[f'p@{k}']:.2f}" for k in KS) + " | "
                            + " | ".join(f"{m[f'r@{k}']:.2f}" for k in KS) + " |")
            print(rows[-1], file=sys.stderr)
    head = ("| behaviour | experiment | rule | AP | AP 95% CI (bootstrap over eval pairs) | "
            + " | ".join(f"P@{k}" for k in KS) + " | " + " | ".join(f"R@{k}" for k in KS) + " |\n"
            + "|---" * (5 + 2 * len(KS)) + "|\n")
    table = head + "\n".join(rows)
    cmd = "python bench/quality.py " + " ".join(sys.argv[1:])
    body = f"Model {s.model or DEMO_MODEL}, layer {resolve_layer(s)}; `{cmd}`\n\n{table}"
    print(body)
    if args.out:
        write_section(args.out, f"quality:{args.section}", body)

if __name__ == "__main__":
    main()
