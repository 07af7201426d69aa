"""`trak`: the fast batched projection against autograd weight gradients, Johnson–Lindenstrauss
behaviour against exact cosines and against `traker`'s dense BasicProjector, determinism across
processes, batch/padding invariance, and the shared storage layout with resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_examples, restore_default_signals
from dattr_core.data import load_dataset, write_examples
from dattr_core.models import collate, encode_chat
from dattr_core.store import VectorSet, model_tag, vectors_dir
from dattr_core.trak import (DEFAULT_DIM, KroneckerProjector, TrakConfig, attribute_trak, exact_weight_grads,
                             factor_dims, linear_modules, project_batch, stable_seed, trak_vectors)

LAYER = 2
N_EXACT = 12
TESTS = Path(__file__).resolve().parent


def _enc(tok, n, seed=0):
    return [encode_chat(tok, e.treatment_messages) for e in make_examples(n, seed=seed)]


def _cos(x: torch.Tensor) -> np.ndarray:
    """Upper-triangle pairwise cosines (float64)."""
    x = x.double()
    x = x / x.norm(dim=1, keepdim=True)
    c = (x @ x.T).numpy()
    return c[np.triu_indices(len(c), 1)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny-model ops are too small for intra-op threads; on a busy shared machine two OpenMP
    threads made these tests ~50× slower (spin-waits on a descheduled thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exact(tiny, tok):
    """Slow reference: full weight gradients of all 28 linear layers of the tiny model, per example."""
    enc = _enc(tok, N_EXACT, seed=3)
    grads = exact_weight_grads(tiny, enc, tok.pad_token_id)
    names = sorted(grads[0])
    flat = torch.stack([torch.cat([g[n].reshape(-1) for n in names]) for g in grads])
    return enc, grads, flat


def test_projector_covers_every_linear_projection_of_every_block(tiny):
    mods = linear_modules(tiny)
    assert len(mods) == 4 * 7
    assert {n.split(".", 1)[1] for n in mods} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    p = KroneckerProjector.for_model(tiny)
    assert (p.dim, p.k_out, p.k_in) == (DEFAULT_DIM, 64, 64)
    assert factor_dims(1024) == (32, 32) and factor_dims(2048) == (32, 64) and factor_dims(7) == (1, 7)
    assert not any(prm.requires_grad for prm in tiny.parameters())  # the pass left the model frozen


def test_batched_projection_equals_explicit_projection_of_autograd_gradients(tiny, tok, exact):
    """Σ_t (P_out g_t)(P_in x_t)ᵀ from hooks, one batch = P_out (∂ℓ/∂W) P_inᵀ summed over modules,
    with ∂ℓ/∂W from plain autograd, one example at a time, full-vocabulary loss."""
    enc, grads, _ = exact
    proj = KroneckerProjector.for_model(tiny)
    fast = project_batch(tiny, collate(enc, tok.pad_token_id), proj)
    ref = torch.stack([proj.project(g) for g in grads])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-6)
    assert not any(prm.requires_grad for prm in tiny.parameters())


def test_projected_cosines_track_exact_gradient_cosines(tiny, exact):
    """Johnson–Lindenstrauss at 4096 dims on the 147k-dim gradient of the tiny model."""
    _, grads, flat = exact
    proj = KroneckerProjector.for_model(tiny)
    v = torch.stack([proj.project(g) for g in grads])
    c_exact, c_proj = _cos(flat), _cos(v)
    assert c_exact.std() > 0.1, "need spread in the exact cosines for the test to mean anything"
    assert np.corrcoef(c_exact, c_proj)[0, 1] > 0.95
    assert np.abs(c_exact - c_proj).max() < 0.15
    ratio = (v.norm(dim=1) / flat.norm(dim=1)).numpy()
    assert np.all(np.abs(ratio - 1) < 0.15), ratio  # norms preserved (E‖Πg‖² = ‖g‖²)


def _dense_reference(flat: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, str]:
    """`traker`'s BasicProjector (dense Gaussian, generated block by block) if installed, else the
    same thing written out here."""
    try:
        from trak.projectors import BasicProjector
    except ImportError:
        g = torch.Generator().manual_seed(seed)
        out = torch.zeros(flat.shape[0], dim)
        for s in range(0, dim, 256):
            out[:, s:s + 256] = flat @ torch.randn(flat.shape[1], min(256, dim - s), generator=g)
        return out, "explicit dense Gaussian"
    bp = BasicProjector(grad_dim=flat.shape[1], proj_dim=dim, seed=seed, proj_type="normal", device="cpu",
                        block_size=256)
    return bp.project(flat.contiguous(), model_id=0), "traker BasicProjector"


def test_kronecker_projector_is_close_to_a_dense_projector_on_the_same_gradients(tiny, exact):
    """Same gradients, same dims (1024, to keep the dense 147k×1024 matrix cheap): the factored
    projection tracks exact cosines almost as well as TRAK's dense BasicProjector. Each module's
    factored projection is noisier than a dense one (rank-1 terms); the sum over modules averages
    that out, so the gap shrinks as models get more layers."""
    _, grads, flat = exact
    dim = 1024
    ours = KroneckerProjector.for_model(tiny, dim=dim)
    v_ours = torch.stack([ours.project(g) for g in grads])
    v_dense, what = _dense_reference(flat, dim, seed=0)
    c_exact = _cos(flat)
    err = {name: np.sqrt(np.mean((_cos(v) - c_exact) ** 2)) for name, v in (("kron", v_ours), ("dense", v_dense))}
    corr = {name: np.corrcoef(_cos(v), c_exact)[0, 1] for name, v in (("kron", v_ours), ("dense", v_dense))}
    print(f"dim {dim}: rms cosine error kron {err['kron']:.4f} vs {what} {err['dense']:.4f}; "
          f"corr {corr['kron']:.4f} vs {corr['dense']:.4f}")
    assert corr["dense"] > 0.95 and corr["kron"] > 0.9
    assert err["kron"] < 4 * err["dense"] + 0.01


def test_projection_factors_are_fixed_bits(tiny):
    """Same (seed, module) → same factors on any machine; golden digest guards torch's RNG."""
    p = KroneckerProjector({"0.self_attn.q_proj": (8, 12)}, dim=16, seed=0)
    assert stable_seed(0, "0.self_attn.q_proj") == 659703633809117023
    assert p.sha256() == "19775d1d3bf73df34b8c7a1e8cc7ccbd237a2d1bc8b24129b32cfc036398c751"
    p_out, p_in = p.factors("0.self_attn.q_proj")
    assert set(torch.unique(p_out * 2).tolist()) == {-1.0, 1.0} and set(torch.unique(p_in * 2).tolist()) == {-1.0, 1.0}
    a, b = KroneckerProjector.for_model(tiny, seed=0), KroneckerProjector.for_model(tiny, seed=1)
    assert a.sha256() == KroneckerProjector.for_model(tiny, seed=0).sha256() != b.sha256()
    assert not torch.equal(a.factors("0.self_attn.q_proj")[1], a.factors("1.self_attn.q_proj")[1])


_CHILD = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from conftest import make_examples
from dattr_core.models import encode_chat, load_tokenizer, tiny_model
from dattr_core.trak import KroneckerProjector, trak_vectors
tok = load_tokenizer(None)
model = tiny_model(len(tok), hidden=64, blocks_=4)
enc = [encode_chat(tok, e.treatment_messages) for e in make_examples(5)]
proj = KroneckerProjector.for_model(model, seed=7)
v = trak_vectors(model, enc, proj, tok.pad_token_id, batch_tokens=200)
print(json.dumps({"vectors": hashlib.sha256(v.tobytes()).hexdigest(), "projection": proj.sha256(),
                  "first": v[0, :4].tolist()}))
"""


def test_same_bytes_in_two_fresh_processes(tiny, tok):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "random"}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(TESTS)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=restore_default_signals) for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0] == outs[1]
    here = KroneckerProjector.for_model(tiny, seed=7)
    assert outs[0]["projection"] == here.sha256()
    v = trak_vectors(tiny, _enc(tok, 5), here, tok.pad_token_id, batch_tokens=200)
    np.testing.assert_allclose(v[0, :4], outs[0]["first"], rtol=1e-5, atol=1e-7)


def test_vectors_do_not_depend_on_batch_or_padding_side(tiny, tok):
    enc = _enc(tok, 6)
    assert len({len(e.input_ids) for e in enc}) > 1, "need mixed lengths"
    proj = KroneckerProjector.for_model(tiny)
    alone = torch.cat([project_batch(tiny, collate([e], tok.pad_token_id), proj) for e in enc])
    scale = alone.abs().max().item()  # fp32 sums in another order: compare at the vectors' scale
    for side in ("right", "left"):
        batched = project_batch(tiny, collate(enc, tok.pad_token_id, side), proj)
        torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5 * scale)
    # and through the length-bucketed driver, several batches
    np.testing.assert_allclose(trak_vectors(tiny, enc, proj, tok.pad_token_id, batch_tokens=150), alone.numpy(),
                               rtol=1e-4, atol=1e-5 * scale)


def test_attribute_trak_layout_resume_and_fingerprint(tiny, tok, home):
    ds = load_dataset(write_examples(home / "datasets" / "train" / "small.parquet", make_examples(11)), "train")
    cfg = TrakConfig(model="tiny", layer=LAYER, shard_size=3, batch_tokens=300)
    res = attribute_trak(ds, cfg, tiny, tok, progress=False)
    assert res.shards_computed == 4 and res.shards_reused == 0  # 11 rows, the tail shard of 2 kept
    vs = res.vectors["trak"]
    assert vs.path == vectors_dir(model_tag("tiny", LAYER), "trak", "small") == home / "vectors/tiny.L2/trak/small"
    assert sorted(p.name for p in vs.path.iterdir()) == [
        "index.parquet", "meta.json", "progress.json"] + [f"shard-0000{i}.npy" for i in range(4)]
    full = vs.load()
    assert vs.ids == ds.ids and full.shape == (11, DEFAULT_DIM) and np.isfinite(full).all()
    m = vs.meta
    assert (m["method"], m["model"], m["layer"], m["model_tag"], m["dim"], m["count"]) == (
        "trak", "tiny", LAYER, "tiny.L2", DEFAULT_DIM, 11)
    assert m["projection"]["sha256"] == KroneckerProjector.for_model(tiny).sha256()
    assert m["projection"]["modules"] == 28 and m["timings"]["examples"] == 11
    # the stored row is the treatment reply's vector
    ex = ds.examples[7]
    ref = trak_vectors(tiny, [encode_chat(tok, ex.treatment_messages)], KroneckerProjector.for_model(tiny),
                       tok.pad_token_id)
    np.testing.assert_allclose(full[7], ref[0], rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # interrupted run: one shard and meta.json lost → only that shard is recomputed
    (vs.path / "shard-00002.npy").unlink()
    (vs.path / "meta.json").unlink()
    again = attribute_trak(ds, cfg, tiny, tok, progress=False)
    assert again.shards_computed == 1 and again.shards_reused == 3
    np.testing.assert_array_equal(again.vectors["trak"].load(), full)
    # another projection seed is another fingerprint: nothing old is reused
    cfg1 = TrakConfig(model="tiny", layer=LAYER, shard_size=3, batch_tokens=300, seed=1)
    other = attribute_trak(ds, cfg1, tiny, tok, progress=False)
    assert other.shards_computed == 4 and other.vectors["trak"].meta["projection"]["seed"] == 1
    assert not np.allclose(other.vectors["trak"].load(), full)


_RANKS = r"""
import sys
from dattr_core.attribute import init_distributed
from dattr_core.data import load_dataset
from dattr_core.models import load_tokenizer
from dattr_core.trak import TrakConfig, attribute_trak
init_distributed()
attribute_trak(load_dataset(sys.argv[1], "train"), TrakConfig(model=sys.argv[2], layer=2, shard_size=3), progress=False)
"""


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, model_dir):
    data = write_examples(tmp_path / "d.parquet", make_examples(11))
    script = tmp_path / "run_trak.py"
    script.write_text(_RANKS)
    out = {}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for name, prefix in (("one", [sys.executable]), ("two", torchrun)):
        env = {**os.environ, "DATTR_HOME": str(tmp_path / name), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(TESTS.parent)}
        r = subprocess.run(prefix + [str(script), str(data), str(model_dir)], env=env, capture_output=True, text=True,
                           timeout=300, preexec_fn=restore_default_signals)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = VectorSet.open(next((tmp_path / name).glob("vectors/*/trak/d")))
    assert out["one"].ids == out["two"].ids == [f"ex{i}" for i in range(11)]
    assert out["two"].meta["world_size"] == 2
    np.testing.assert_array_equal(out["one"].load(), out["two"].load())
