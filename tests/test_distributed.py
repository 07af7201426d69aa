"""`torchrun --nproc_per_node=2` (gloo on CPU) gives the same vectors as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_examples, restore_default_signals
from dattr_core.data import write_examples
from dattr_core.store import VectorSet


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=restore_default_signals)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, model_dir):
    data = write_examples(tmp_path / "d.parquet", make_examples(17))
    args = ["attribute", "--data", str(data), "--model", str(model_dir), "--layer", "2", "--shard-size", "3",
            "--methods", "rd,rct,rc,grad", "--no-progress"]
    out = {}
    for name, prefix in (("one", [sys.executable, "-m", "dattr_core.cli"]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  "-m", "dattr_core.cli"])):
        env = {**os.environ, "DATTR_HOME": str(tmp_path / name), "OMP_NUM_THREADS": "1"}
        r = _run(prefix + args, env)
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = {m: VectorSet.open(next((tmp_path / name).glob(f"vectors/*/{m}/d"))) for m in ("rd", "rct", "rc", "grad")}
    for m in out["one"]:
        one, two = out["one"][m], out["two"][m]
        assert one.ids == two.ids == [f"ex{i}" for i in range(17)]
        assert two.meta["world_size"] == 2
        np.testing.assert_array_equal(one.load(), two.load())
