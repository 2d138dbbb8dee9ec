"""Triton's real CUDA launch path on a machine without a GPU: a stand-in ``libcuda.so.1``.

:func:`fake_cuda_driver` builds ``fake_cuda/libcuda.c`` (with the C compiler Triton itself uses
for its launcher module), loads it under the driver's soname, and makes Triton's active driver
one that compiles for sm_90 and launches through Triton's own compiled launcher module
(``CudaUtils``, ``CudaLauncher``). Inside it, ``kernel[grid](...)`` and
:mod:`bnrewrite.runtime.kernels.launch` run everything a GPU host runs per launch -- binding and
specialising the arguments, ``CudaLauncher.__call__``, the C launcher parsing the argument list
and reading each tensor's ``data_ptr()`` -- except the driver's own ``cuLaunchKernelEx``, which
records the launch instead (:func:`last_launch`). The kernels never run: outputs are not read.

Used by ``benchmarks/kernel_overhead.py --host-only --triton-launcher`` (host time with the C
launcher counted) and ``tests/runtime/kernels/test_launch.py`` (direct launches hand the driver
the same kernel parameters as Triton's own path).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # kernel_resources is a sibling script, not a package module
    sys.path.insert(0, _HERE)
from kernel_resources import _CompileOnlyDriver  # noqa: E402

_SOURCE = os.path.join(_HERE, "fake_cuda", "libcuda.c")
# sizes of a kernel parameter by Triton signature type (triton/backends/nvidia/driver.c's extractors)
_PARAM_BYTES = {"i1": 4, "i8": 1, "i16": 2, "i32": 4, "i64": 8, "u1": 4, "u8": 1, "u16": 2, "u32": 4, "u64": 8,
                "fp16": 2, "bf16": 2, "fp32": 4, "f32": 4, "fp64": 8}
_library = None


def compiler() -> str | None:
    """A C compiler, looked for as Triton looks for the one it builds its launcher with ($CC, gcc,
    then clang; also cc), or None."""
    for name in (os.environ.get("CC"), "gcc", "clang", "cc"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> str:
    """The directory holding the stand-in ``libcuda.so.1`` (and ``libcuda.so`` for ``-lcuda``),
    built once per source version."""
    import triton

    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    where = os.path.join(tempfile.gettempdir(), f"bnrewrite-fake-libcuda-{digest}")
    lib = os.path.join(where, "libcuda.so.1")
    if not os.path.exists(lib):
        cc = compiler()
        if cc is None:
            raise RuntimeError("fake_cuda needs a C compiler (gcc, cc or clang) to build its libcuda stand-in")
        include = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "include")
        os.makedirs(where, exist_ok=True)
        tmp = f"{lib}.{os.getpid()}"
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", f"-I{include}", "-o", tmp,
                        _SOURCE], check=True, capture_output=True)
        os.replace(tmp, lib)
    link = os.path.join(where, "libcuda.so")
    if not os.path.exists(link):
        with contextlib.suppress(FileExistsError):
            os.symlink("libcuda.so.1", link)
    return where


class _FakeCudaDriver(_CompileOnlyDriver):
    """:class:`kernel_resources._CompileOnlyDriver` that launches through Triton's compiled CUDA
    launcher module (onto the stand-in driver)."""

    def __init__(self, arch: int, utils, launcher_cls):
        super().__init__(arch)
        self.utils = utils
        self.launcher_cls = launcher_cls

    def set_current_device(self, device):
        pass


@contextlib.contextmanager
def fake_cuda_driver(arch: int = 90):
    """Inside: Triton compiles for ``arch`` and launches through its real launcher onto the
    stand-in driver (see the module docstring). Needs a C compiler; no GPU, no NVIDIA driver."""
    global _library
    from triton import knobs
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime import driver

    where = _build()
    if _library is None:
        import torch

        # torch asks the CUDA runtime for devices once and keeps the answer: asked now, before the
        # stand-in is loaded, it does not find this half of a driver later
        torch.cuda.device_count()
        # loaded globally under its soname first, so Triton's launcher module links against it
        # and its dlopen("libcuda.so.1") finds it
        _library = ctypes.CDLL(os.path.join(where, "libcuda.so.1"), mode=ctypes.RTLD_GLOBAL)
        _library.bnrewrite_fake_launches.restype = ctypes.c_longlong
    saved_path = knobs.nvidia.libcuda_path
    saved_active = driver._active  # None on a machine without a GPU
    knobs.nvidia.libcuda_path = where
    try:
        utils = nvidia.CudaUtils()
        driver.set_active(_FakeCudaDriver(arch, utils, nvidia.CudaLauncher))
        yield
    finally:
        driver._active = saved_active
        knobs.nvidia.libcuda_path = saved_path


def launches() -> int:
    """How many launches the stand-in driver has received in this process."""
    return int(_library.bnrewrite_fake_launches())


def expect_parameters(compiled) -> None:
    """Record the parameters of the next launches of ``compiled`` (a Triton ``CompiledKernel``,
    launched once): its non-constexpr arguments, then the two scratch pointers. Launches of other
    kernels record no parameters."""
    sizes = [8 if str(t).startswith("*") else _PARAM_BYTES[str(t)]
             for t in compiled.src.signature.values() if str(t) != "constexpr"] + [8, 8]
    if _library.bnrewrite_fake_expect(ctypes.c_uint64(compiled.function), len(sizes),
                                      (ctypes.c_int * len(sizes))(*sizes)) != 0:
        raise ValueError(f"{compiled.name}: too many kernel parameters for the stand-in driver")


def last_launch() -> dict:
    """What the stand-in driver received at the last launch: grid, block, shared memory bytes,
    launch attributes, the function handle and the kernel parameters' bytes."""
    config = (ctypes.c_uint * 8)()
    function = ctypes.c_uint64()
    params = (ctypes.c_ubyte * 4096)()
    n = _library.bnrewrite_fake_last(config, ctypes.byref(function), params, len(params))
    return {"grid": tuple(config[0:3]), "block": tuple(config[3:6]), "shared": config[6], "attributes": config[7],
            "function": function.value, "parameters": bytes(params[:n])}
