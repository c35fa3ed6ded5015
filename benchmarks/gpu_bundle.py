"""`make gpu-bundle`: what a bare GPU machine lacks for `python -m benchmarks.gpu_suite`, in one folder.

A lent GPU machine has torch, transformers, peft, triton and the usual scientific stack, but no
network and neither DeepSpeed nor pydantic (KINDS.md of the device tool lists it). This writes:

- `wheels/`: DeepSpeed (built here from its sdist as a pure wheel: its ops compile on first use),
  pydantic with pydantic-core for CPython 3.12 on manylinux x86-64, their small dependencies,
  and, for the suite's loss comparison, Liger-Kernel and Cut Cross-Entropy (pure Python + Triton);
- `project/`: a project the suite trains in: the tiny model and stage 1's packed rows, built
  here by the same commands `make run` uses, with params for one GPU and tracking off;
- `manifest.json`: every file with its size and SHA-256.

The suite's machine installs the wheels with `pip install --no-index --no-deps --target` (README,
"On a GPU"). The whole bundle must stay under 40 MiB: the device tool carries at most 64 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from omnilong import atomic

LIMIT_BYTES = 40 * 2**20
# What the suite imports that the GPU image lacks, at the versions this project is tested with.
INSTALLED = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "hjson")
# Optional side-by-side losses; a missing one is recorded by the suite as not carried.
OPTIONAL = ("liger-kernel", "cut-cross-entropy")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet", "--disable-pip-version-check"], check=True)


def _download(spec: str, wheels: Path) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
         *platforms, "-d", str(wheels), spec)


def write_wheels(wheels: Path) -> list[str]:
    """The wheels; returns the optional packages that could not be had."""
    wheels.mkdir(parents=True, exist_ok=True)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels),
         f"deepspeed=={importlib.metadata.version('deepspeed')}")
    for name in INSTALLED:
        _download(f"{name}=={importlib.metadata.version(name)}", wheels)
    missing = []
    for name in OPTIONAL:
        try:
            _download(name, wheels)
        except subprocess.CalledProcessError:
            missing.append(name)
    return missing


def bundle_params(source: Path) -> dict:
    """params.yaml for the bundle: a small default corpus, trained as `one_gpu_params` says."""
    raw = yaml.safe_load(source.read_text())
    raw["data"]["synth"].update(
        text={"num_documents": 40, "min_chars": 2000, "max_chars": 16000},
        instruct={"num_samples": 4, "context_chars": 2000},
        video={"num_videos": 1, "num_frames": 8, "height": 64, "width": 64, "fps": 4, "long": {"num_videos": 0}},
    )
    return one_gpu_params(raw)


def one_gpu_params(raw: dict) -> dict:
    """`raw` params for one rank: no sequence parallelism, stage 1 for two steps, no MLflow."""
    raw = {**raw, "parallel": {**raw.get("parallel", {}), "nnodes": 1, "nproc_per_node": 1}}
    for stage in raw["stages"].values():
        stage["sp_size"] = 1
    raw["stages"]["stage1"]["train"].update(max_steps=2, checkpoint_every=2)
    raw["tracking"] = {**raw.get("tracking", {}), "enabled": False}
    return raw


def write_project(project: Path, repo: Path) -> None:
    project.mkdir(parents=True, exist_ok=True)
    atomic.write_text(project / "params.yaml", yaml.safe_dump(bundle_params(repo / "params.yaml"), sort_keys=False))
    omnilong = [sys.executable, "-m", "omnilong.cli"]
    for command in (["data", "synth"], ["model", "tiny", "--family", "qwen2_5_vl", "--out", "models/tiny"],
                    ["data", "prepare"], ["data", "pack", "--stage", "stage1"]):
        subprocess.run([*omnilong, *command], cwd=project, check=True, env={**_env(), "PYTHONPATH": str(repo)})
    # The suite needs the model and stage 1's packed rows; the corpus and tokenized data stay here.
    for unneeded in ("data/raw", "data/tokenized"):
        shutil.rmtree(project / unneeded)


def _env() -> dict:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_manifest(out: Path, missing: list[str]) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    entries = [
        {"path": str(p.relative_to(out)), "bytes": p.stat().st_size,
         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in files
    ]
    manifest = {"total_bytes": sum(e["bytes"] for e in entries), "limit_bytes": LIMIT_BYTES,
                "optional_not_carried": missing, "files": entries}
    atomic.write_text(out / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".gpu-bundle"))
    args = parser.parse_args(argv)
    repo = Path(__file__).resolve().parents[1]
    if args.out.exists():
        shutil.rmtree(args.out)  # a bundle is rebuilt whole: no stale wheel of another version
    missing = write_wheels(args.out / "wheels")
    write_project(args.out / "project", repo)
    manifest = write_manifest(args.out, missing)
    size_mib = manifest["total_bytes"] / 2**20
    print(f"{args.out}: {len(manifest['files'])} files, {size_mib:.1f} MiB"
          + (f"; not carried: {', '.join(missing)}" if missing else ""))
    if manifest["total_bytes"] > LIMIT_BYTES:
        raise SystemExit(f"{args.out}: {size_mib:.1f} MiB exceeds the bundle's limit of {LIMIT_BYTES / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
