"""Build recipe of aptp's compiled kernels; setup.py execs this file.

It provides two functions to setup.py:

- ``extensions()``: ``aptp._C`` (C++, always built) and, when a CUDA toolkit is found,
  ``aptp._C_cuda`` (a separate module, so ``aptp._C`` imports wherever the CUDA driver is
  missing).
- ``cmdclass()``: a ``build_ext`` that compiles ``.cu`` sources with nvcc and links the CUDA
  runtime statically (no libcudart needed at import). A CUDA build that fails is reported
  and skipped: the install never fails because of CUDA.

Environment switches:

- ``APTP_NO_CUDA=1``: build the CPU module only, even where nvcc is present.
- ``CUDA_HOME`` (or ``CUDA_PATH``): the toolkit to use; otherwise ``nvcc`` on ``PATH``.
- ``APTP_CUDA_ARCHS="80;90"``: the GPU architectures to compile for (default: Turing and
  newer plus the Jetson GPUs, Xavier 7.2 and Orin 8.7, as far as this nvcc supports them; plus
  PTX of the newest for later GPUs; see cuda_archs.py). On a Jetson Orin: ``APTP_CUDA_ARCHS=87``.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from pybind11.setup_helpers import build_ext as _Pybind11BuildExt

_HERE = Path(__file__).resolve().parent
_INCLUDE = _HERE / "include"
_SRC = _HERE / "src"
_HEADERS = sorted(str(p) for p in _INCLUDE.glob("*.h"))


def _load_cuda_archs():
    # setup.py execs this file, so the sibling module is loaded by path, not imported.
    spec = importlib.util.spec_from_file_location("aptp_build_cuda_archs", _HERE / "cuda_archs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ARCHS = _load_cuda_archs()


def _say(message: str) -> None:
    # pip shows a backend's stderr with -v and whenever the build fails.
    print(f"aptp build: {message}", file=sys.stderr)


def _rel(path: Path) -> str:
    # setuptools wants source paths relative to the project (pip runs setup.py there).
    return os.path.relpath(path)


def _cuda_home_of(nvcc: str) -> Path | None:
    """The toolkit root behind an nvcc, which may be a wrapper script rather than a link."""
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (dry.stdout + dry.stderr).splitlines():
        if "_HERE_=" in line:  # nvcc's own bin directory
            return Path(line.split("_HERE_=", 1)[1].strip()).parent
    return Path(nvcc).resolve().parent.parent


def _first_with(home: Path, subdirs: list[str], name: str) -> Path | None:
    for sub in subdirs:
        for folder in sorted(home.glob(sub)):
            if (folder / name).exists():
                return folder
    return None


def find_cuda() -> dict | None:
    """nvcc, include and library folders of the CUDA toolkit to build with, or None."""
    if os.environ.get("APTP_NO_CUDA", "0") not in ("", "0"):
        _say("APTP_NO_CUDA is set: building the CPU kernels only")
        return None
    if not sys.platform.startswith("linux"):
        _say(f"CUDA kernels are built on Linux only (this is {sys.platform}): CPU kernels only")
        return None
    home_env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = None
    if home_env and (Path(home_env) / "bin" / "nvcc").exists():
        nvcc = str(Path(home_env) / "bin" / "nvcc")
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        _say("no nvcc on PATH and no CUDA_HOME: building the CPU kernels only")
        return None
    home = Path(home_env) if home_env else _cuda_home_of(nvcc)
    include = home and _first_with(home, ["include", "targets/*/include"], "cuda_runtime_api.h")
    lib = home and _first_with(home, ["lib64", "lib", "targets/*/lib"], "libcudart_static.a")
    if include is None or lib is None:
        _say(f"found {nvcc} but not cuda_runtime_api.h / libcudart_static.a under {home}: "
             "building the CPU kernels only (set CUDA_HOME to the toolkit root)")
        return None
    return {"nvcc": nvcc, "home": home, "include": include, "lib": lib}


def _gencode_flags(nvcc: str) -> list[str]:
    try:
        listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                                timeout=60).stdout
        supported = _ARCHS.supported_archs(listed) or None
    except (OSError, subprocess.SubprocessError):
        supported = None
    wanted = os.environ.get("APTP_CUDA_ARCHS")
    archs, left_out = _ARCHS.choose_archs(wanted, supported)
    _say(_ARCHS.describe(archs, left_out, explicit=bool(wanted and wanted.strip())))
    return _ARCHS.gencode_flags(archs)


def extensions() -> list:
    """The extension modules: aptp._C always, aptp._C_cuda when a CUDA toolkit is found."""
    posix = os.name == "posix"
    cpu = Pybind11Extension(
        "aptp._C",
        sources=[_rel(_SRC / f) for f in ("bindings_cpu.cpp", "api_cpu.cpp", "kernels_cpu.cpp")],
        include_dirs=[_rel(_INCLUDE)],
        depends=[_rel(Path(h)) for h in _HEADERS],
        cxx_std=17,
        extra_compile_args=["-O3"] if posix else ["/O2"],
    )
    exts = [cpu]
    cuda = find_cuda()
    if cuda is not None:
        exts.append(Pybind11Extension(
            "aptp._C_cuda",
            sources=[_rel(_SRC / f) for f in ("bindings_cuda.cpp", "api_cuda.cpp", "kernels_cuda.cu")],
            include_dirs=[_rel(_INCLUDE), str(cuda["include"])],
            depends=[_rel(Path(h)) for h in _HEADERS],
            cxx_std=17,
            extra_compile_args=["-O3"],
            # Static cudart: importing needs no libcudart, and a missing driver only shows up
            # as an error code from the first CUDA call.
            extra_objects=[str(cuda["lib"] / "libcudart_static.a")],
            libraries=["dl", "pthread", "rt"],
            # setuptools skips an optional module whose build fails instead of failing all.
            optional=True,
        ))
        exts[-1].aptp_cuda = cuda
    return exts


class BuildExt(_Pybind11BuildExt):
    """pybind11's build_ext, plus nvcc for ``.cu`` sources; a CUDA failure is only a warning."""

    def build_extension(self, ext) -> None:
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if not cu_sources:
            super().build_extension(ext)
            return
        try:
            objects = [self._nvcc(Path(src), ext) for src in cu_sources]
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            # Kernel objects before libcudart_static.a: the linker resolves left to right.
            ext.extra_objects = objects + list(ext.extra_objects)
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - the install must never fail because of CUDA
            _say(f"building {ext.name} failed, continuing with the CPU kernels only: {err}")
            self._drop_output(ext)

    def _nvcc(self, source: Path, ext) -> str:
        cuda = ext.aptp_cuda
        obj = Path(self.build_temp) / "cuda" / (source.stem + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            cuda["nvcc"], "-c", str(source), "-o", str(obj),
            "-O3", "-std=c++17", "--threads", "0",
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            f"-I{_INCLUDE}", *_gencode_flags(cuda["nvcc"]),
        ]
        _say(" ".join(cmd))
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return str(obj)

    def _drop_output(self, ext) -> None:
        # A half-written module would shadow nothing useful; make sure none is left behind.
        path = Path(self.get_ext_fullpath(ext.name))
        if path.exists():
            path.unlink()


def cmdclass() -> dict:
    """setup()'s cmdclass: the build_ext that knows nvcc."""
    return {"build_ext": BuildExt}
