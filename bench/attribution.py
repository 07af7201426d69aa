"""Attribution throughput: our one-pass engine vs a naive reference and the forward-only ceiling.

    python bench/attribution.py [--data FILE] [--n 128] [--model ID] [--device cuda] [--dtype bfloat16]

Each mode runs in its own subprocess (so peak memory is its own) on the same model and rows:
- `all-methods`: residual, grad, rct, rct_response, rd, rc from one pass (treatment + control);
- `rct`: rct alone (treatment only);
- `trak`: the weight-space baseline, projected to 4096 dims (treatment only);
- `naive`: what the research code did: every weight gradient computed, gradient checkpointing,
  the T×T product, treatment and control in separate passes;
- `forward-only`: the same forward over treatment + control under inference_mode, no backward:
  the ceiling no gradient method can beat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from dattr_core import methods as M
from dattr_core.attribute import length_batches, sequence_vectors
from dattr_core.capture import capture
from dattr_core.data import load_dataset
from dattr_core.models import blocks, collate, default_layer, encode_chat, load_model, per_example_loss
from dattr_core.store import dataset_file

MODES = ("all-methods", "rct", "trak", "naive", "forward-only")


def naive_rct(model, layer: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The research code's way: full backward with weight grads and checkpointing, T×T product."""
    seen = {}

    def hook(mod, args, kwargs, out):
        seen["z_in"] = (args[0] if args else kwargs["hidden_states"]).detach()
        o = out[0] if isinstance(out, tuple) else out
        o.retain_grad()
        seen["z_out"] = o
        return out

    h = blocks(model)[layer].register_forward_hook(hook, with_kwargs=True)
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"], use_cache=False).logits
    per_example_loss(logits, batch["input_ids"], batch["target_mask"]).sum().backward()
    h.remove()
    z_in, g = seen["z_in"].float(), seen["z_out"].grad.float()
    m = batch["target_mask"].float()
    gram = torch.einsum("btd,bsd->bts", z_in, z_in) * batch["attention_mask"][:, None, :].float()  # T×T
    return -torch.einsum("bt,bts,bsd->bd", m, gram, g) / m.sum(1, keepdim=True)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    model, tok = load_model(args.model, args.device, args.dtype)
    layer = default_layer(len(blocks(model))) if args.layer is None else args.layer
    ds = load_dataset(args.data, "train")
    rows = [e for e in ds.examples if e.control_messages is not None][: args.n]
    treat = [encode_chat(tok, e.treatment_messages, args.max_tokens) for e in rows]
    ctrl = [encode_chat(tok, e.control_messages, args.max_tokens) for e in rows]
    seqs = {"all-methods": treat + ctrl, "rct": treat, "trak": treat, "naive": treat + ctrl,
            "forward-only": treat + ctrl}[mode]
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = length_batches([len(e.input_ids) for e in seqs], args.batch_tokens, 64)
    sync()
    t0 = time.perf_counter()
    if mode in ("all-methods", "rct"):
        wanted = list(M.SEQUENCE_METHODS) if mode == "all-methods" else ["rct"]
        sequence_vectors(model, layer, seqs, wanted, tok.pad_token_id, args.batch_tokens, 64)
    elif mode == "trak":
        from dattr_core.trak import trak_vectors

        trak_vectors(model, seqs, tok.pad_token_id, args.batch_tokens)
    elif mode == "forward-only":
        for idx in batches:
            capture(model, layer, collate([seqs[i] for i in idx], tok.pad_token_id), backward=False)
    else:  # naive: treatment and control as separate passes (they are separate halves of `seqs`)
        model.requires_grad_(True)
        model.gradient_checkpointing_enable()
        model.train()
        n = len(rows)
        for half in (list(range(n)), list(range(n, 2 * n))):
            for idx in length_batches([len(seqs[i].input_ids) for i in half], args.batch_tokens, 64):
                naive_rct(model, layer, {k: v.to(dev) for k, v in
                                         collate([seqs[half[i]] for i in idx], tok.pad_token_id).items()})
    sync()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"mode": mode, "examples": len(rows), "tokens": sum(len(e.input_ids) for e in seqs), "seconds": seconds,
            "peak_mib": peak, "device": str(dev), "dtype": str(next(model.parameters()).dtype), "layer": layer,
            "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a dataset with control replies (default: the demo eval set "
                   "`hallucination`, whose rows are matched pairs)")
    p.add_argument("--n", type=int, default=128, help="examples (pairs) to run")
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.data = args.data or str(dataset_file("eval", "hallucination"))
    if args.mode:
        print(json.dumps(run_mode(args.mode, args)))
        return
    results = {}
    for mode in args.modes.split(","):
        passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v is not None and k not in ("modes", "mode")]
        cmd = [sys.executable, __file__, "--mode", mode, *passed]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    ours = results.get("all-methods")
    print(f"\nmodel={args.model or 'SmolLM2-135M-Instruct (demo)'} data={args.data} n={args.n} "
          f"device={ours and ours['device']} dtype={ours and ours['dtype']} layer={ours and ours['layer']} "
          f"threads={ours and ours['threads']}\n")
    print("| mode | examples/s | tokens/s | seconds | peak MiB | all-methods ÷ this |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        ratio = f"{(ours['examples'] / ours['seconds']) / (r['examples'] / r['seconds']):.2f}×" if ours else "-"
        print(f"| {mode} | {r['examples'] / r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} | "
              f"{r['seconds']:.1f} | {r['peak_mib']:.0f} | {ratio} |")
    if ours and "naive" in results and "forward-only" in results:
        eps = {m: r["examples"] / r["seconds"] for m, r in results.items()}
        print(f"\nall-methods / naive = {eps['all-methods'] / eps['naive']:.2f}× (target ≥ 3×); "
              f"all-methods / forward-only = {eps['all-methods'] / eps['forward-only']:.2f}× (target ≥ 0.5×)")


if __name__ == "__main__":
    main()
