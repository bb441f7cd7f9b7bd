"""The GPU bundle: what ``scripts/gpu_check.sh`` installs on a bare GPU machine.

The target machine (an H200 with torch 2.11 / CUDA 13, Python 3.12, nvcc, no internet, no
FlashInfer) takes at most 64 MiB along with the working tree, and FlashInfer's wheel alone is
62 MB (its kernel sources). So the bundle is built here, once, with nvcc and no GPU:

- ``flashinfer.tar.xz``: FlashInfer's Python package without its kernel sources and headers
  (``data/``, but for the top-level templates and entry files its module specs read), plus the
  JIT modules this project's GPU path loads, compiled here for sm_90a and placed where
  FlashInfer looks for ahead-of-time builds (``flashinfer/data/aot/<name>/<name>.so``);
- ``wheels/``: ``apache-tvm-ffi`` for CPython 3.12 (FlashInfer's kernel ABI; pure C, torch-free);
- ``tree_pruned_cuda.so``: the CUDA helpers of ``csrc/`` (plain C ABI, static CUDA runtime);
- ``MANIFEST.json``: versions, module names and a SHA-256 of every file.

``python -m tree_attn_backend.ops.gpu_bundle build [DIR]`` builds it (about 5 minutes on 2 cores,
needs the package index and nvcc); ``install DIR --site SITE`` unpacks it; ``install DIR
--check-only`` installs nothing: it verifies the checksums and, on the machine that built the
bundle, loads every module with JIT disabled (what ``gpu_check.sh --dry-run`` does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLE = REPO_ROOT / "gpu-bundle"
FLASHINFER_VERSION = "0.7.2.post1"
# One version here (where the modules are compiled) and there (where they load); within
# flashinfer-python 0.7.2.post1's range >=0.1.11,<0.2.
TVM_FFI_SPEC = "apache-tvm-ffi==0.1.15.post2"
TARGET_PYTHON = "3.12"
TARGET_ARCH = "9.0a"
# Importing flashinfer needs these besides numpy/torch/requests/packaging/tqdm/filelock/jinja2,
# all of which the target image has (and so does this venv).
HOST_IMPORT_DEPS = ("nvidia-ml-py", "einops", "tabulate")
MAX_BUNDLE_BYTES = 48 * 1024 * 1024  # the working tree and logs share the 64 MiB
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def required_jit_specs(head_dim: int = 128) -> list:
    """FlashInfer JitSpecs of every module :class:`FlashInferTreeAttention` loads for bf16 at
    ``head_dim``: the fa2 batch prefill pair (paged / ragged, custom mask, causal, and the
    tensor-core decode), ``merge_state`` and the mask bit-packer ``plan()`` calls. These are
    FlashInfer-internal generators, valid for :data:`FLASHINFER_VERSION` only."""
    import flashinfer
    import torch
    from flashinfer import prefill
    from flashinfer.jit.cascade import gen_cascade_module
    from flashinfer.jit.quantization import gen_quantization_module

    if flashinfer.__version__ != FLASHINFER_VERSION:
        raise RuntimeError(f"flashinfer {flashinfer.__version__} found; the bundle recipe is for {FLASHINFER_VERSION}")
    bf16 = torch.bfloat16
    args = ("fa2", bf16, bf16, bf16, torch.int32, head_dim, head_dim, 0, False, False, False)
    return [
        gen_quantization_module(),
        gen_cascade_module(),
        prefill._gen_batch_prefill_primary_module(*args),
        prefill._gen_batch_prefill_independent_paged_module(*args),
    ]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _libcuda_stub(directory: Path) -> Path:
    """An empty ``libcuda.so`` (soname ``libcuda.so.1``) to link FlashInfer's modules against on a
    machine without a driver; the real driver library resolves the symbols on the GPU."""
    directory.mkdir(parents=True, exist_ok=True)
    stub = directory / "libcuda.so"
    subprocess.run(
        ["gcc", "-shared", "-x", "c", "-", "-o", str(stub), "-Wl,-soname,libcuda.so.1"], input=b"", check=True
    )
    return directory


def _compile_modules(site: Path, work: Path, nvcc: Path) -> list[Path]:
    """Compile :func:`required_jit_specs` in a child process (FlashInfer reads its environment
    at import); returns the built ``.so`` paths."""
    from tree_attn_backend.ops.csrc_build import cuda_home

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(site), str(REPO_ROOT)]),
        CUDA_HOME=str(cuda_home(nvcc)),
        LIBRARY_PATH=os.pathsep.join(filter(None, [str(_libcuda_stub(work / "stub")), os.environ.get("LIBRARY_PATH")])),
        FLASHINFER_CUDA_ARCH_LIST=TARGET_ARCH,
        FLASHINFER_WORKSPACE_BASE=str(work / "jit"),
        MAX_JOBS=str(os.cpu_count() or 1),
    )
    script = (
        "import json, sys\n"
        "from tree_attn_backend.ops.gpu_bundle import required_jit_specs\n"
        "paths = []\n"
        "for spec in required_jit_specs():\n"
        "    print('compiling', spec.name, file=sys.stderr, flush=True)\n"
        "    spec.build()\n"
        "    paths.append(str(spec.jit_library_path))\n"
        "print(json.dumps(paths))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, check=True, stdout=subprocess.PIPE, text=True)
    return [Path(p) for p in json.loads(result.stdout.strip().splitlines()[-1])]


def build(bundle: Path) -> dict:
    """Build the bundle into ``bundle`` (replacing it); returns the manifest."""
    from tree_attn_backend.ops.csrc_build import build_cuda_helpers, find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        raise SystemExit("the GPU bundle needs nvcc (set CUDA_HOME or PATH)")
    # build/gpu_bundle keeps the downloads, the host install and FlashInfer's ninja trees, so a
    # rebuild (same versions) recompiles nothing; delete it to start over.
    work = REPO_ROOT / "build" / "gpu_bundle"
    downloads, host_site = work / "downloads", work / "host-site"
    target_args = ["--only-binary=:all:", "--python-version", TARGET_PYTHON, "--implementation", "cp"]
    for platform in MANYLINUX:
        target_args += ["--platform", platform]
    _pip("download", "--no-deps", "-d", str(downloads / "target"), *target_args, TVM_FFI_SPEC)
    if not (host_site / "flashinfer").exists():
        _pip("download", "--no-deps", "-d", str(downloads), f"flashinfer-python=={FLASHINFER_VERSION}")
        _pip(
            "install",
            "--no-deps",
            "--target",
            str(host_site),
            *map(str, downloads.glob("flashinfer_python-*.whl")),
            TVM_FFI_SPEC,
            *HOST_IMPORT_DEPS,
        )

    print("compiling FlashInfer modules for sm_90a (a few minutes)", file=sys.stderr)
    modules = _compile_modules(host_site, work, nvcc)
    package = host_site / "flashinfer"
    for so in modules:
        aot = package / "data" / "aot" / so.stem
        aot.mkdir(parents=True, exist_ok=True)
        shutil.copy2(so, aot / so.name)

    shutil.rmtree(bundle, ignore_errors=True)
    (bundle / "wheels").mkdir(parents=True)
    print("packing flashinfer.tar.xz", file=sys.stderr)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        # Of data/ only aot/ (the modules) and csrc/'s top-level files: building a module's spec
        # reads its templates and entry sources even when the compiled module is already there.
        parts = Path(info.name).parts
        if "__pycache__" in parts:
            return None
        if len(parts) <= 2 or parts[1] != "data":
            return info
        if parts[2] == "aot" or (parts[2] == "csrc" and (len(parts) == 3 or (len(parts) == 4 and info.isfile()))):
            return info
        return None

    with tarfile.open(bundle / "flashinfer.tar.xz", "w:xz") as tar:
        tar.add(package, arcname="flashinfer", filter=keep)
    for wheel in (downloads / "target").glob("*.whl"):
        shutil.copy2(wheel, bundle / "wheels" / wheel.name)
    shutil.copy2(build_cuda_helpers(nvcc, TARGET_ARCH.replace(".", "")), bundle / "tree_pruned_cuda.so")

    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    if total > MAX_BUNDLE_BYTES:
        raise SystemExit(f"bundle is {total / 2**20:.1f} MiB, over the {MAX_BUNDLE_BYTES / 2**20:.0f} MiB budget")
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "flashinfer": FLASHINFER_VERSION,
        "python": TARGET_PYTHON,
        "cuda_arch": TARGET_ARCH,
        "modules": [so.stem for so in modules],
        "files": {str(p.relative_to(bundle)): _sha256(p) for p in files},
        "bytes": total,
    }
    (bundle / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def verify(bundle: Path) -> dict:
    """Check every file against the manifest; returns the manifest."""
    manifest_path = bundle / "MANIFEST.json"
    if not manifest_path.exists():
        raise SystemExit(f"no bundle at {bundle}: build it with `make gpu-bundle` (needs nvcc and the package index)")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        path = bundle / name
        if not path.exists():
            raise SystemExit(f"bundle file {path} is missing")
        if _sha256(path) != digest:
            raise SystemExit(f"bundle file {path} does not match its checksum in {manifest_path}")
    return manifest


def check_loads(bundle: Path) -> list[str] | None:
    """Load every bundled FlashInfer module here, with no GPU: unpack the bundle's FlashInfer
    into a temporary folder and, with FlashInfer's JIT disabled (as on the GPU machine), build
    and load each spec of :func:`required_jit_specs` against a libcuda stub. Proves the modules
    are found as ahead-of-time builds, match the names the wrappers ask for, and link. Needs
    the host packages a ``build`` left in ``build/gpu_bundle``; ``None`` when they are absent."""
    from tree_attn_backend.ops.csrc_build import cuda_home, find_nvcc

    work = REPO_ROOT / "build" / "gpu_bundle"
    nvcc = find_nvcc()
    if not (work / "host-site" / "tvm_ffi").exists() or nvcc is None:
        return None
    stub = _libcuda_stub(work / "stub")
    (stub / "libcuda.so.1").unlink(missing_ok=True)
    (stub / "libcuda.so.1").symlink_to("libcuda.so")
    with tempfile.TemporaryDirectory() as site:
        with tarfile.open(bundle / "flashinfer.tar.xz") as tar:
            tar.extractall(site, filter="data")
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([site, str(work / "host-site"), str(REPO_ROOT)]),
            LD_LIBRARY_PATH=os.pathsep.join([str(stub), str(cuda_home(nvcc) / "lib64")]),
            FLASHINFER_DISABLE_JIT="1",
            FLASHINFER_CUDA_ARCH_LIST=TARGET_ARCH,
        )
        script = (
            "import json\n"
            "from tree_attn_backend.ops.gpu_bundle import required_jit_specs\n"
            "specs = required_jit_specs()\n"
            "for spec in specs:\n"
            "    assert spec.is_aot, f'{spec.name} is not an ahead-of-time module'\n"
            "    spec.build_and_load()\n"
            "print(json.dumps([spec.name for spec in specs]))\n"
        )
        result = subprocess.run([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    if result.returncode:
        raise SystemExit(f"loading the bundled FlashInfer modules failed (exit {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def install(bundle: Path, site: Path) -> None:
    """Unpack the bundle: FlashInfer and the wheels into ``site`` (put it on ``PYTHONPATH``), the
    CUDA helpers into the package's ``_C``."""
    from tree_attn_backend.ops.csrc_build import install_library
    from tree_attn_backend.ops.native import CUDA_LIBRARY_PATH

    verify(bundle)
    site.mkdir(parents=True, exist_ok=True)
    wheels = sorted(str(w) for w in (bundle / "wheels").glob("*.whl"))
    _pip("install", "--no-index", "--no-deps", "--no-compile", "--upgrade", "--target", str(site), *wheels)
    with tarfile.open(bundle / "flashinfer.tar.xz") as tar:
        tar.extractall(site, filter="data")
    install_library(bundle / "tree_pruned_cuda.so", CUDA_LIBRARY_PATH)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tree_attn_backend.ops.gpu_bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build_p = sub.add_parser("build", help="build the bundle (nvcc + package index, no GPU)")
    build_p.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    install_p = sub.add_parser("install", help="install a built bundle")
    install_p.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    install_p.add_argument("--site", type=Path, required=True, help="folder to put on PYTHONPATH")
    install_p.add_argument(
        "--check-only", action="store_true", help="verify the checksums and load the modules here, install nothing"
    )
    args = parser.parse_args(argv)
    if args.command == "build":
        manifest = build(args.bundle)
        print(f"built {args.bundle}: {manifest['bytes'] / 2**20:.1f} MiB, modules {', '.join(manifest['modules'])}")
    elif args.check_only:
        manifest = verify(args.bundle)
        print(f"bundle {args.bundle} verified: {len(manifest['files'])} files, built {manifest['created']}")
        loaded = check_loads(args.bundle)
        if loaded is None:
            print("module load check skipped: no build/gpu_bundle host packages or nvcc here")
        elif loaded != manifest["modules"]:
            raise SystemExit(
                f"the bundle's modules {manifest['modules']} differ from those the GPU path loads {loaded}"
            )
        else:
            print(f"loaded {len(loaded)} bundled FlashInfer modules with JIT disabled: {', '.join(loaded)}")
    else:
        install(args.bundle, args.site)
        print(f"installed {args.bundle} into {args.site}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
