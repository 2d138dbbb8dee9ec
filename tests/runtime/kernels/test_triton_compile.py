"""Every Triton kernel compiles for the GPU, also on a machine without one: for sm_90 (H100/H200,
where the figures are measured) and sm_70 (V100, the oldest GPU ``lower="auto"`` lowers on).

The kernel tests run the kernels in Triton's interpreter on CPU, which accepts code the GPU
compiler rejects (and says nothing about registers or spills). ``benchmarks/kernel_resources.py``
runs the launches of lowered training steps with Triton's ahead-of-time compile and ptxas in place
of the launch; this runs its ``--quick`` cases (both launch sequences, both layouts, fp32/bf16/fp16,
every recipe) in a fresh interpreter without ``TRITON_INTERPRET``."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


# shared memory per SM (KiB) of each architecture compiled for
SHARED_KIB = {90: 228, 70: 96}


@pytest.fixture(scope="module", params=sorted(SHARED_KIB, reverse=True), ids=lambda arch: f"sm_{arch}")
def compiled(request, tmp_path_factory):
    """(arch, rows of benchmarks/kernel_resources.py --quick compiled for it)."""
    arch = request.param
    out = tmp_path_factory.mktemp("kernel_resources") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Triton writes its compile cache under TRITON_HOME (default: the home folder, which CI may not let us write)
    env["TRITON_HOME"] = env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_home"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--quick",
                           "--arch", str(arch), "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (f"compiling the kernels for sm_{arch} failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    result = json.loads(out.read_text())
    assert result["arch"] == arch
    return arch, result["rows"]


def _kernel_names():
    from bnrewrite.runtime.kernels import _triton

    return sorted(name for name in vars(_triton) if name.endswith("_kernel"))


def test_every_kernel_of_the_module_compiles(compiled):
    _arch, compiled_rows = compiled
    names = {r["kernel"] for r in compiled_rows}
    missing = [name for name in _kernel_names() if name not in names]
    assert not missing, f"never launched by the --quick cases, so never compiled: {missing}"
    assert {r["path"] for r in compiled_rows} == {"split", "single-pass"}
    assert {r["config"] for r in compiled_rows} == {"fp32-nchw", "bf16-cl", "fp16-nchw"}


def test_no_kernel_spills_more_than_a_few_bytes(compiled):
    _arch, compiled_rows = compiled
    # a spill turns the one-read/one-write passes into extra memory traffic per element; ptxas
    # may still trade a word or two of stack for occupancy (8 bytes in one backward kernel)
    spilled = sorted({(r["kernel"], r["config"], r["C"], r["HW"], r["recipe"], r["stack_bytes"] + r["local_bytes"])
                      for r in compiled_rows if r["stack_bytes"] + r["local_bytes"] > 16})
    assert not spilled, f"kernels spilling registers (kernel, config, C, HW, recipe, bytes per thread): {spilled}"


def test_every_launch_fits_on_an_sm(compiled):
    arch, compiled_rows = compiled
    for r in compiled_rows:
        assert 0 < r["regs"] <= 255 and r["warps_per_sm"] >= r["num_warps"], r
        assert r["programs"] >= 1 and r["shared"] <= SHARED_KIB[arch] * 1024, r
