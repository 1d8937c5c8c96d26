"""Pack what `xfer tune` needs beyond a GPU machine's own packages into one tar.xz (issue 15).

    python -m bench.pack_deps                                  # bench/_deps/deps.tar.xz, for the lent GPU machine
    python -m bench.pack_deps --python-version 3.11 --out /tmp/deps311/deps.tar.xz   # for a local test venv

The lent GPU machine (BENCHMARKS.md, "`xfer tune` on one GPU") has Python 3.12 with torch, transformers,
numpy, scipy, pandas, pyarrow, scikit-learn, pyyaml, tqdm and h5py, and no network. Everything
else that `xfer tune` imports travels in this pack (a `carry` path of the device tool, 64 MiB a
call for the whole working tree), unpacked there onto PYTHONPATH by bench/gpu_sweep.sh.

What goes in: the closure of pyproject.toml's dependencies (extras and environment markers
evaluated for the target Python), read from this venv's installed metadata, minus PRESENT (the
packages above and the dependencies every version of them has) and minus DROP_ROOTS; each at
the version installed here (= requirements.lock), as manylinux wheels for the target Python
(`pip install --target --only-binary=:all: --python-version`). Then trimmed: Ray's Java jars,
RLlib, Serve and LLM (ray.data stays: ray.air imports it; the dashboard stays with its web
client: `xfer tune` starts Ray with include_dashboard=True, and the dashboard refuses to start
without client/build), plotly's Jupyter extension, ncls's examples, every `tests` folder, byte
code, source maps, console scripts, and the symbol tables of ELF files (`strip --strip-unneeded`: Ray's raylet, GCS server
and _raylet.so are 120 MB with them, 84 MB without). The tar lists similar files next to each
other (the three Ray binaries share most of their code) for xz -9e.

Inside the pack, XFER_DEPS.json records the target Python, every package and version, and what
was trimmed; bench/gpu_sweep.sh refuses a pack built for another Python.

If the pack is larger than --max-mib it is split into deps.part1.tar.xz (Ray) and
deps.part2.tar.xz (everything else), each to be carried in its own call while the machine stays
warm (see bench/gpu_sweep.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

# On the GPU machine already (and not to be shadowed): the ten packages the brief of issue 15
# names, with the dependencies every version of them has. Their closure here is added to this.
GIVEN = ["numpy", "scipy", "pandas", "pyarrow", "scikit-learn", "pyyaml", "tqdm", "h5py", "torch"]
PRESENT_EXTRA = ["transformers", "huggingface-hub", "tokenizers", "safetensors", "regex", "packaging", "hf-xet"]
# Brought even where the machine has its own: pydantic-core pins a recent typing_extensions.
ALWAYS_BRING = {"typing-extensions"}
# Dependencies of xfer that `xfer tune` on a store never imports: anndata reads and writes
# .h5ad files only (xfer/data/readers.py, writers.py, predict.py import it inside functions).
DROP_ROOTS = {"anndata"}

# Trimmed from the installed tree (paths relative to site-packages): Ray's parts a sweep never
# loads, Jupyter extensions (plotly's; report.html takes plotly.min.js) and ncls's examples.
UNUSED = ["ray/jars", "ray/rllib", "ray/serve", "ray/llm", "ray/tests",
          "share", "examples", "plotly/labextension", "plotly/package_data/widgetbundle.js", "bin"]
DROP_DIR_NAMES = {"tests", "__pycache__"}
DROP_SUFFIXES = (".pyc", ".js.map")
ELF = b"\x7fELF"
MARKER = ".xfer_deps_part"


def target_env(pyver: str) -> dict:
    env = default_environment()
    env.update({"python_version": pyver, "python_full_version": f"{pyver}.0", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"})
    return env


def applies(req: Requirement, env: dict, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""}) | {""})


def closure(roots: list[Requirement], env: dict, stop: set[str] = frozenset()) -> dict[str, str]:
    """{canonical name: installed version} of roots and everything they need under env (not
    looking into what the packages in `stop` need: those are the target machine's own)."""
    seen: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    todo = [(canonicalize_name(r.name), set(r.extras)) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name in seen and extras <= seen[name]:
            continue
        seen[name] = seen.get(name, set()) | extras
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            raise SystemExit(f"pack_deps: {name} is needed but not installed in {sys.prefix}: run `make install` first")
        versions[name] = dist.version
        if name in stop:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if applies(req, env, seen[name]):
                todo.append((canonicalize_name(req.name), set(req.extras)))
    return versions


def package_set(pyver: str) -> tuple[dict[str, str], list[str]]:
    env = target_env(pyver)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    present = set(closure([Requirement(n) for n in GIVEN], env)) | {canonicalize_name(n) for n in PRESENT_EXTRA}
    present -= ALWAYS_BRING
    wanted = closure([r for r in roots if canonicalize_name(r.name) not in DROP_ROOTS], env, present)
    packed = {n: v for n, v in sorted(wanted.items()) if n not in present}
    return packed, sorted(present & set(wanted))


def lock_versions() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def install(packages: dict[str, str], pyver: str, site: Path) -> None:
    abi = "cp" + pyver.replace(".", "")
    plats = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64", "linux_x86_64"]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--no-compile",
           "--target", str(site), "--python-version", pyver, "--implementation", "cp", "--abi", abi]
    for p in plats:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in packages.items()]
    subprocess.run(cmd, check=True)


def trim(site: Path) -> dict:
    before = du(site)
    removed = []
    for rel in UNUSED:
        p = site / rel
        if p.exists():
            removed.append(rel)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in sorted(site.rglob("*"), reverse=True):
        if p.is_dir() and p.name in DROP_DIR_NAMES:
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.endswith(DROP_SUFFIXES):
            p.unlink()
    stripped = 0
    for p in site.rglob("*"):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if f.read(4) != ELF:
                    continue
            s = p.stat().st_size
            if subprocess.run(["strip", "--strip-unneeded", str(p)], capture_output=True).returncode == 0:
                stripped += s - p.stat().st_size
    return {"before_mib": before / 2**20, "after_mib": du(site) / 2**20, "stripped_mib": stripped / 2**20,
            "removed": removed, "dropped_dir_names": sorted(DROP_DIR_NAMES), "dropped_suffixes": list(DROP_SUFFIXES)}


def du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def ordered(site: Path, top: list[str] | None) -> list[str]:
    """Files (relative to site) in an order that puts similar content together: ELF files first,
    biggest first (Ray's raylet, GCS server and _raylet.so share most code), then by suffix."""
    files = []
    for p in site.rglob("*"):
        if p.is_dir() and not p.is_symlink():
            continue
        rel = p.relative_to(site)
        if rel.name.startswith(MARKER) or (top is not None and rel.parts[0] not in top):
            continue
        files.append(p)

    def key(p: Path):
        is_elf = False
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                is_elf = f.read(4) == ELF
        return (0 if is_elf else 1, -p.stat().st_size if is_elf else 0, p.suffix, p.name, str(p))
    return [str(p.relative_to(site)) for p in sorted(files, key=key)]


def make_tar(site: Path, files: list[str], out: Path, threads: int, part: int, parts: int, level: str = "-9e") -> float:
    """out = tar.xz of files (relative to site) + the marker `.xfer_deps_part<part>of<parts>`
    (bench/gpu_sweep.sh counts the markers it has unpacked)."""
    for old in site.glob(MARKER + "*"):
        old.unlink()
    marker = f"{MARKER}{part}of{parts}"
    (site / marker).write_text("")
    listing = out.with_name(out.name + ".list")
    listing.write_text("\n".join([marker, *files]) + "\n")
    t = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        tar = subprocess.Popen(["tar", "-C", str(site), "--owner=0", "--group=0", "--numeric-owner",
                                "--mtime=2026-01-01", "--no-recursion", "-cf", "-", "-T", str(listing)],
                               stdout=subprocess.PIPE)
        subprocess.run(["xz", level, f"-T{threads}", "-c"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait():
            raise SystemExit("pack_deps: tar failed")
    tmp.replace(out)
    listing.unlink()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python-version", default="3.12", help="the target machine's Python (default 3.12, the GPU's)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "_deps" / "deps.tar.xz"))
    ap.add_argument("--stage", help="where to install and trim, kept afterwards (default: a temporary folder, removed: "
                                    "bench/_deps then holds only what the device call carries)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="xz threads")
    ap.add_argument("--xz", default="-9e", help="xz preset (default -9e; -0 for a quick test build)")
    ap.add_argument("--max-mib", type=float, default=60.0, help="split into two parts above this size")
    ap.add_argument("--list", action="store_true", help="print the package set and exit")
    args = ap.parse_args()

    pyver = args.python_version
    packed, present = package_set(pyver)
    lock = lock_versions()
    off_lock = {n: (v, lock.get(n)) for n, v in packed.items() if lock.get(n) not in (None, v)}
    if off_lock:
        print(f"pack_deps: warning: installed versions differ from requirements.lock: {off_lock}", file=sys.stderr)
    print(f"pack_deps: {len(packed)} packages for Python {pyver}: "
          + ", ".join(f"{n}=={v}" for n, v in packed.items()))
    print(f"pack_deps: left to the target machine: {', '.join(present)}")
    if args.list:
        return 0

    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    stage = Path(args.stage).resolve() if args.stage else Path(tempfile.mkdtemp(prefix="pack_deps_"))
    site = stage / "site"
    shutil.rmtree(site, ignore_errors=True)
    t0 = time.perf_counter()
    install(packed, pyver, site)
    t_install = time.perf_counter() - t0
    trimmed = trim(site)
    meta = {"python_version": pyver, "platform": "manylinux x86_64", "packages": packed,
            "left_to_target": present, "dropped_roots": sorted(DROP_ROOTS), "trim": trimmed,
            "built": time.strftime("%Y-%m-%d %H:%M:%S"), "builder": f"Python {sys.version.split()[0]}"}
    (site / "XFER_DEPS.json").write_text(json.dumps(meta, indent=1))
    print(f"pack_deps: installed in {t_install:.0f} s; {trimmed['before_mib']:.0f} MiB -> "
          f"{trimmed['after_mib']:.0f} MiB after trimming ({trimmed['stripped_mib']:.0f} MiB of symbol tables)")

    for old in out.parent.glob(out.name.replace(".tar.xz", "") + "*.tar.xz"):
        old.unlink()
    secs = make_tar(site, ordered(site, None), out, args.threads, 1, 1, args.xz)
    size = out.stat().st_size / 2**20
    parts = [out]
    if size > args.max_mib:
        print(f"pack_deps: {size:.1f} MiB > {args.max_mib} MiB: splitting into two parts")
        out.unlink()
        top = sorted({Path(f).parts[0] for f in ordered(site, None)})
        ray_top = [t for t in top if t == "ray" or t.startswith("ray-")]
        rest = [t for t in top if t not in ray_top]
        parts = []
        for i, group in enumerate((ray_top + ["XFER_DEPS.json"], rest + ["XFER_DEPS.json"]), 1):
            p = out.with_name(out.name.replace(".tar.xz", f".part{i}.tar.xz"))
            secs += make_tar(site, ordered(site, group), p, args.threads, i, 2, args.xz)
            parts.append(p)
    for p in parts:
        mib = p.stat().st_size / 2**20
        print(f"pack_deps: {p} {mib:.1f} MiB" + (f" (over {args.max_mib} MiB: trim more)" if mib > args.max_mib else ""))
    print(f"pack_deps: compressed in {secs:.0f} s (xz {args.xz} -T{args.threads})")
    if not args.stage:
        shutil.rmtree(stage, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
