"""Build hooks for sipl-fast. Project metadata lives in pyproject.toml.

Adds two things to the setuptools build (which must work without torch):

* ``sipl_fast._C``: an optional CUDA extension built when nvcc is found. The
  kernels in ``kernels/*.cu`` are compiled by nvcc, ``csrc/*.cpp`` by the normal
  C++ compiler against the Python *limited API*, and the CUDA runtime is linked
  statically, so the binary depends on neither torch nor libcudart (abi3 wheel).
* ``sipl_fast/_kernels/``: a copy of the kernel sources inside the installed
  package, for the CuPy/NVRTC JIT route of non-editable installs.

Environment variables:
  SIPL_FAST_SKIP_CUDA=1        do not build the extension
  SIPL_FAST_REQUIRE_CUDA=1     missing nvcc / failed CUDA build is an error
  SIPL_FAST_CUDA_ARCH_LIST     e.g. "80;86;89;90a+PTX" (";", "," or spaces;
                               "+PTX" also embeds PTX for that arch)
  SIPL_FAST_NVCC_THREADS       nvcc --threads (default 2)
  CUDA_HOME                    CUDA toolkit to use (else nvcc on PATH)
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "80;86;89;90a+PTX"
LIMITED_API = ("0x03090000", "cp39")  # Py_LIMITED_API value, wheel tag
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"sipl-fast: {msg}", file=sys.stderr)


def find_nvcc():
    """$CUDA_HOME/bin/nvcc, else nvcc on PATH, else the conventional toolkit path."""
    home = os.environ.get("CUDA_HOME")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def parse_arch_list(spec):
    """'80;86 89,90a+PTX' -> (nvcc -gencode flags, ['sm_80', ..., 'compute_90']).

    Also accepts '8.6' / 'sm_86' spellings. PTX for an arch-specific target
    ('90a') is emitted for its base ('compute_90'): 'a' PTX cannot be JIT-compiled
    for newer GPUs, which is the point of embedding PTX.
    """
    flags, names = [], []
    for token in filter(None, re.split(r"[;,\s]+", spec.strip())):
        ptx = token.upper().endswith("+PTX")
        arch = (token[:-4] if ptx else token).lower().replace(".", "")
        arch = re.sub(r"^(sm_|compute_)", "", arch)
        match = re.fullmatch(r"(\d+)([af]?)", arch)
        if not match:
            raise ValueError(f"bad CUDA arch {token!r} in {spec!r}")
        targets = [("sm", arch)] + ([("compute", match.group(1))] if ptx else [])
        for kind, a in targets:
            if f"{kind}_{a}" not in names:
                names.append(f"{kind}_{a}")
                flags += ["-gencode", f"arch=compute_{a},code={kind}_{a}"]
    if not flags:
        raise ValueError(f"empty CUDA arch list {spec!r}")
    return flags, names


def cuda_paths(nvcc):
    """(include dir with cuda_runtime_api.h, path of libcudart_static.a) for nvcc's toolkit."""
    homes = [os.environ.get("CUDA_HOME")]
    try:  # nvcc may be a wrapper script; ask it where its toolkit is.
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull],
                             capture_output=True, text=True, timeout=60)
        homes += re.findall(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        pass
    homes += [str(Path(os.path.realpath(nvcc)).parent.parent), "/usr/local/cuda"]
    for home in filter(None, homes):
        home = Path(home.strip())
        incs = [home / "include", *home.glob("targets/*/include")]
        libs = [home / d / "libcudart_static.a" for d in ("lib64", "lib")]
        libs += list(home.glob("targets/*/lib/libcudart_static.a"))
        inc = next((p for p in incs if (p / "cuda_runtime_api.h").is_file()), None)
        lib = next((p for p in libs if p.is_file()), None)
        if inc and lib:
            return str(inc), str(lib)
    raise RuntimeError(f"cannot find cuda_runtime_api.h / libcudart_static.a for {nvcc}")


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc; a failed CUDA build only warns unless required."""

    def build_extensions(self):
        for ext in list(self.extensions):
            try:
                self.build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any failure means "no extension"
                if _flag("SIPL_FAST_REQUIRE_CUDA"):
                    raise
                _say(f"WARNING: building {ext.name} failed ({exc}); installing without it")
                self.extensions.remove(ext)  # same list as distribution.ext_modules
        wheel = self.distribution.command_obj.get("bdist_wheel")
        if not self.extensions and wheel is not None:
            wheel.root_is_pure = True  # nothing compiled: tag the wheel py3-none-any

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if not cu_sources:
            return super().build_extension(ext)
        nvcc = find_nvcc()
        include_dir, cudart = cuda_paths(nvcc)
        gencode, names = parse_arch_list(os.environ.get("SIPL_FAST_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST)
        threads = os.environ.get("SIPL_FAST_NVCC_THREADS", "2")
        objects = []
        for src in cu_sources:
            obj = os.path.join(self.build_temp, "nvcc", Path(src).with_suffix(".o").as_posix())
            os.makedirs(os.path.dirname(obj), exist_ok=True)
            cmd = [nvcc, "-c", src, "-o", obj, "-I", str(Path(src).parent), *NVCC_FLAGS,
                   "--threads", threads, *gencode]
            _say(" ".join(cmd))
            subprocess.run(cmd, check=True)
            objects.append(obj)

        saved = (ext.sources, ext.extra_objects, ext.include_dirs, ext.define_macros)
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        # Static cudart after the kernel objects; its own deps go in extra_link_args.
        ext.extra_objects = objects + list(ext.extra_objects) + [cudart]
        ext.include_dirs = list(ext.include_dirs) + [include_dir]
        ext.define_macros = list(ext.define_macros) + [("SIPL_FAST_CUDA_ARCHS", f'"{",".join(names)}"')]
        try:
            super().build_extension(ext)
        finally:
            ext.sources, ext.extra_objects, ext.include_dirs, ext.define_macros = saved


class BuildPy(build_py):
    """Also ships kernels/*.cu and *.cuh as sipl_fast/_kernels/ (for the CuPy route)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable installs read the repository's kernels/ directly
        sources = sorted(p for p in (ROOT / "kernels").glob("*") if p.suffix in (".cu", ".cuh"))
        if not sources:
            _say("WARNING: no kernel sources found in kernels/; the CuPy route will be unavailable")
            return
        dest = Path(self.build_lib) / "sipl_fast" / "_kernels"
        self.mkpath(str(dest))
        for src in sources:
            self.copy_file(str(src), str(dest / src.name))


def cuda_extensions():
    if _flag("SIPL_FAST_SKIP_CUDA"):
        _say("SIPL_FAST_SKIP_CUDA=1: not building the CUDA extension")
        return []
    if find_nvcc() is None:
        if _flag("SIPL_FAST_REQUIRE_CUDA"):
            raise SystemExit("sipl-fast: SIPL_FAST_REQUIRE_CUDA=1 but nvcc was not found")
        _say("nvcc not found; installing without the CUDA extension (CuPy route still usable)")
        return []
    kernels = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.cu"))
    headers = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.cuh"))
    return [Extension(
        "sipl_fast._C",
        sources=["csrc/sipl_fast_ext.cpp", *kernels],
        depends=headers,
        define_macros=[("Py_LIMITED_API", LIMITED_API[0])],
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
        # --exclude-libs keeps the static cudart symbols private to this .so, so
        # they never bind to (or get interposed by) a libcudart loaded by torch.
        extra_link_args=["-ldl", "-lpthread", "-lrt", "-Wl,--exclude-libs,ALL"],
        py_limited_api=True,
    )]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the helpers
    ext_modules = cuda_extensions()
    setup(
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
        options={"bdist_wheel": {"py_limited_api": LIMITED_API[1]}} if ext_modules else {},
    )
