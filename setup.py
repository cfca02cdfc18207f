"""Build fusekit and its compiled library fusekit._C.

C++ CPU kernels are always built; CUDA kernels when torch has CUDA and nvcc is found
(FUSEKIT_CUDA=0/1 forces them off/on). Build against the installed torch:
    pip install --no-build-isolation .
Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0" when no GPU is visible), MAX_JOBS,
CUDA_HOME (found from nvcc on PATH when unset), FUSEKIT_DEBUG=1 for -O0 -g.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "python" / "fusekit"))
from version import __version__  # noqa: E402

sys.path.pop(0)


def find_cuda_home() -> str | None:
    """The toolkit root whose include/ has cuda_runtime.h (nvcc on PATH may be a wrapper script)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        try:  # a wrapper script that execs the real nvcc: take the path it names
            for token in real.read_text(errors="ignore").split():
                if token.endswith("/bin/nvcc"):
                    candidates.append(str(Path(token).parent.parent))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists() and (Path(c) / "bin" / "nvcc").exists():
            return c
    return None


try:
    import torch
except ImportError:
    sys.exit("fusekit: torch must be installed before building (pip install torch), and the build must see it: "
             "use `pip install --no-build-isolation .`")

cuda_home = find_cuda_home()
if cuda_home and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = cuda_home

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

force = os.environ.get("FUSEKIT_CUDA")
with_cuda = torch.version.cuda is not None and cuda_home is not None
if force == "0":
    with_cuda = False
elif force == "1":
    if torch.version.cuda is None:
        sys.exit("fusekit: FUSEKIT_CUDA=1 but the installed torch has no CUDA (install a CUDA build of torch)")
    if cuda_home is None:
        sys.exit("fusekit: FUSEKIT_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to the toolkit root)")
    with_cuda = True

if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    else:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

debug = os.environ.get("FUSEKIT_DEBUG") == "1"
opt = ["-O0", "-g"] if debug else ["-O3"]
cxx_flags = opt + ["-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas"]
nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-warn-spills"]
include_dirs = [str(ROOT / "csrc")]

sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    # ATen's CUDA headers include cuBLAS/cuSPARSE headers that pip's CUDA wheels ship here
    for site in {str(Path(p)) for p in sys.path if p.endswith("site-packages")}:
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    Extension = CUDAExtension
    extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    Extension = CppExtension
    extra = {"cxx": cxx_flags}


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL,
                                       text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


(ROOT / "python" / "fusekit" / "_build_info.py").write_text(
    "# written by setup.py at build time\n"
    f"COMMIT = {git_commit()!r}\n"
    f"TORCH = {torch.__version__!r}\n"
    f"WITH_CUDA = {with_cuda!r}\n"
    f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST') if with_cuda else None!r}\n")

print(f"fusekit: building _C with CUDA={'yes (' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'no'}"
      f" against torch {torch.__version__}", flush=True)

packages = find_packages("python") + ["fusekit.triton_kernels"]
setup(
    name="fusekit",
    version=__version__,
    description="Fused CPU, CUDA and Triton kernels with autograd for vision backbones and attention decoders",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=packages,
    package_dir={"": "python", "fusekit.triton_kernels": "triton_kernels"},
    package_data={"fusekit": ["gpu_verified.json"]},
    ext_modules=[Extension("fusekit._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
                           extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fusekit-bench = fusekit.bench.cli:main"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "numpy"], "plot": ["matplotlib"]},
    zip_safe=False,
)
