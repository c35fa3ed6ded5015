"""Shared fixtures. The tiny pipeline runs once per session, as a deployment run through the team's
services (tests/services.py), and every end-to-end test reads it."""

from __future__ import annotations

import contextlib
import os
import queue as queue_module
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.measure import free_port  # noqa: F401  (tests import it from here)
from tests.services import BUCKET, native_stack

REPO = Path(__file__).resolve().parents[1]


def project_env(project: Path) -> dict[str, str]:
    """The environment `make run` sets up, pointed at a copy of the project."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_HOME": str(project / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "GIT_AUTHOR_NAME": "omnilong-tests",
        "GIT_AUTHOR_EMAIL": "tests@omnilong.invalid",
        "GIT_COMMITTER_NAME": "omnilong-tests",
        "GIT_COMMITTER_EMAIL": "tests@omnilong.invalid",
    }


def run_ranks(worker, world: int, *args, timeout: float = 300) -> list:
    """Run `worker(rank, port, *args, queue)` in `world` spawned processes that meet on a free
    loopback port; what each puts on the queue (a tuple starting with its rank), in rank order."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    processes = [context.Process(target=worker, args=(rank, port, *args, queue)) for rank in range(world)]
    for process in processes:
        process.start()
    results, deadline = [], time.monotonic() + timeout
    while len(results) < world:
        # A rank that died (an exception in the worker) fails the test now, not at the timeout.
        dead = [rank for rank, process in enumerate(processes) if process.exitcode not in (None, 0)]
        if dead or time.monotonic() > deadline:
            for process in processes:
                process.kill()
            raise AssertionError(f"rank(s) {dead} exited with an error (see their stderr above)" if dead
                                 else f"the ranks did not all report within {timeout} s")
        with contextlib.suppress(queue_module.Empty):
            results.append(queue.get(timeout=1))
    results.sort(key=lambda result: result[0])
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    return results


def quick_benchmark(module: str, out_dir: Path) -> dict:
    """`python -m benchmarks.<module> --quick`'s JSON result."""
    import json

    out = out_dir / "result.json"
    subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--quick", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def copy_project(destination: Path) -> Path:
    """Copy what a clone would hold (tracked files and untracked, non-ignored ones) into a new git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = REPO / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    env = project_env(destination)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "snapshot"]):
        subprocess.run(command, cwd=destination, env=env, check=True)
    return destination


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory):
    """docker-compose.yml's services, started natively on loopback for the session and stopped by
    process group at its end (their logs are kept in the session's tmp dir)."""
    with native_stack(tmp_path_factory.mktemp("team_stack_logs")) as stack:
        print("service start (s):", {service.name: round(service.start_s, 1) for service in stack.services})
        yield stack


def team_env(project: Path, stack) -> dict[str, str]:
    """`project_env` with the team's credentials and server addresses, as a team member exports them."""
    return {**project_env(project), **stack.client_env(), "PREFECT_WORKER_QUERY_SECONDS": "2"}


def _checked(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def point_at_stack(project: Path, stack) -> None:
    """What a team changes in its clone, by configuration only, and commits: the tracking server
    in params.yaml and the S3 remote in DVC's config, naming the bucket only, as the README's
    production section adds it. Where S3 is, and the credentials, stay in the environment."""
    env = project_env(project)
    params = project / "params.yaml"
    text = params.read_text()
    assert text.count("\n  uri: null") == 1
    params.write_text(text.replace("\n  uri: null", f"\n  uri: {stack.mlflow_uri}"))
    dvc = [sys.executable, "-m", "dvc"]
    _checked([*dvc, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc"], project, env)
    _checked(["git", "commit", "-q", "-am", "track to the team's servers"], project, env)


WORK_POOL = "omnilong-team"


def run_deployment(project: Path, stack, name: str) -> None:
    env = team_env(project, stack)
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", name, "--watch", "--watch-timeout", "1500"],
        cwd=project, env=env, capture_output=True, text=True, timeout=1600,
    )
    print(f"deployment run {name}: {time.monotonic() - started:.0f} s")
    [worker] = [service for service in stack.services if service.name == "worker"]
    assert run.returncode == 0 and "Completed" in run.stdout, (
        f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\nworker:\n{worker.log.read_text(errors='replace')[-6000:]}")


@pytest.fixture(scope="session")
def tiny_pipeline(team_stack, tmp_path_factory) -> Path:
    """A clean copy of the project, pointed at the team's services, after `omnilong/full` ran as a
    deployment on a Prefect process worker: registry in PostgreSQL, artifacts in the bucket."""
    project = copy_project(tmp_path_factory.mktemp("pipeline") / "project")
    point_at_stack(project, team_stack)
    env = {**team_env(project, team_stack), "OMNILONG_WORK_POOL": WORK_POOL}
    prefect = [sys.executable, "-m", "prefect"]
    # As the README's production section says: the pool, then prefect.yaml's deployments.
    _checked([*prefect, "work-pool", "create", "--type", "process", "--overwrite", WORK_POOL], project, env)
    _checked([*prefect, "--no-prompt", "deploy", "--all"], project, env)
    # Where the worker runs, the project's folder, as the training image sets it: the deployments'
    # pull step changes into it.
    team_stack.spawn("worker", [*prefect, "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                     env={**env, "OMNILONG_PROJECT_DIR": str(project)}, cwd=project)
    run_deployment(project, team_stack, "omnilong/full")
    return project


@pytest.fixture(scope="session")
def tiny_text_corpus(tmp_path_factory) -> Path:
    """A small corpus dir (`text/*.jsonl` of TextRecords) from a few standard-library sources."""
    import inspect
    import json
    import json.decoder
    import json.encoder
    import textwrap

    from omnilong.data.schemas import TextRecord

    corpus = tmp_path_factory.mktemp("tiny_text_corpus")
    (corpus / "text").mkdir()
    for shard, modules in enumerate([(json, json.decoder), (json.encoder, textwrap)]):
        records = [
            TextRecord(id=module.__name__, source=f"stdlib:{module.__name__}", text=inspect.getsource(module))
            for module in modules
        ]
        (corpus / "text" / f"part-{shard}.jsonl").write_text(
            "".join(record.model_dump_json() + "\n" for record in records)
        )
    return corpus


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_text_corpus):
    """`tiny_model_dir(family)`: the tiny model of that family with default params, built once per session."""
    from omnilong.config import TinyModelParams, VideoTokenParams
    from omnilong.models.tiny import build_tiny_model

    built: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny_{family}") / "model"
            build_tiny_model(family, TinyModelParams(), VideoTokenParams(), tiny_text_corpus, out)
            built[family] = out
        return built[family]

    return build


@pytest.fixture(scope="session")
def tiny_raw_dir(tmp_path_factory) -> Path:
    """A `data.raw_dir` whose `default/` corpus (text, instruct, video) the synthesiser made small, once per session."""
    from omnilong.config import SynthParams
    from omnilong.data.synth import synthesize_default_corpus

    synth = SynthParams.model_validate(
        {
            "text": {"num_documents": 6, "min_chars": 500, "max_chars": 3000},
            "instruct": {"num_samples": 4, "context_chars": 800},
            "video": {
                "num_videos": 3, "num_frames": 12, "height": 48, "width": 64, "fps": 4, "long": {"num_videos": 0},
            },
        }
    )
    raw_dir = tmp_path_factory.mktemp("tiny_raw") / "raw"
    synthesize_default_corpus(synth, raw_dir / "default")
    return raw_dir


def video_stage_project(work: Path, root: Path, model_dir: Path, num_videos: int, stage3: dict) -> dict:
    """A project in `work` (paths relative to `root`, where commands run) whose default corpus holds
    `num_videos` videos of 12 frames (48 x 64, 4 fps) and little text; stage 3 prepared and packed
    with `stage3`, one video held out. Returns the raw parameters."""
    from omnilong.config import SynthParams, parse_params
    from omnilong.data.pack import pack_stage
    from omnilong.data.prepare import prepare_corpora
    from omnilong.data.synth import synthesize_default_corpus

    synthesize_default_corpus(SynthParams.model_validate({
        "text": {"num_documents": 1, "min_chars": 500, "max_chars": 800},
        "instruct": {"num_samples": 1, "context_chars": 400},
        "video": {"num_videos": num_videos, "num_frames": 12, "height": 48, "width": 64, "fps": 4,
                  "long": {"num_videos": 0}},
    }), work / "raw" / "default")
    raw = {
        "model": {"family": "qwen2_5_vl", "path": str(model_dir.relative_to(root))},
        "data": {key: str((work / name).relative_to(root))
                 for key, name in (("raw_dir", "raw"), ("tokenized_dir", "tokenized"), ("packed_dir", "packed"))},
        "stages": {"stage1": {"seq_len": 1024, "sp_size": 2}, "stage2": {"seq_len": 1024, "sp_size": 2},
                   "stage3": stage3},
        "eval": {"heldout_documents": 1},
        "parallel": {"timeout_s": 120},  # ranks out of step would fail in 2 minutes, not hang
    }
    params = parse_params(raw)
    prepare_corpora(params, root)
    pack_stage(params, "stage3", root)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    return raw


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_model_dir, tiny_raw_dir):
    """`tiny_prepared(family)`: (params, root) of a project whose three stages were prepared and
    packed from `tiny_raw_dir` with that family's tiny model, once per session."""
    from omnilong.config import STAGE_NAMES, parse_params
    from omnilong.data.pack import pack_stage
    from omnilong.data.prepare import prepare_corpora

    root = tmp_path_factory.getbasetemp()  # holds the model, the corpus and the outputs
    done = {}

    def prepare(family: str):
        if family not in done:
            work = tmp_path_factory.mktemp(f"prepared_{family}")
            params = parse_params(
                {
                    "model": {"family": family, "path": str(tiny_model_dir(family).relative_to(root))},
                    "data": {
                        "raw_dir": str(tiny_raw_dir.relative_to(root)),
                        "tokenized_dir": str((work / "tokenized").relative_to(root)),
                        "packed_dir": str((work / "packed").relative_to(root)),
                    },
                    "stages": {
                        # Some text documents are longer than this and get cut; no chat is.
                        "stage1": {"seq_len": 1024, "sp_size": 2},
                        "stage2": {"seq_len": 1024, "sp_size": 2},
                        # The two videos that train fit in one row.
                        "stage3": {"seq_len": 576, "sp_size": 1, "video_frames": {"num_frames": 8}},
                    },
                    "eval": {"heldout_documents": 1},
                }
            )
            prepare_corpora(params, root)
            for stage in STAGE_NAMES:
                pack_stage(params, stage, root, rows_per_shard=2)
            done[family] = params, root
        return done[family]

    return prepare


@pytest.fixture(scope="session")
def tiny_ablation(tiny_pipeline, team_stack) -> Path:
    """The same project after the `no-stage2` deployment ran too (DVC reuses the shared stages)."""
    run_deployment(tiny_pipeline, team_stack, "omnilong/ablation-no-stage2")
    return tiny_pipeline


def video_clip_row(
    path: Path, family: str, model_config, num_frames: int, text_before: list[int], text_after: list[int],
    seq_len_multiple: int = 4,
) -> dict:
    """A packed row (as `PackedShards` gives it) of one chat-like document around the video at
    `path` (`num_frames` sampled uniformly), then padding; positions as the packer computes them."""
    import torch

    from omnilong.config import FrameSampling, VideoTokenParams
    from omnilong.data.prepare import VideoContext, video_clip
    from omnilong.data.video_frames import sample_frames, video_info
    from omnilong.models.positions import position_ids_for_document
    from omnilong.train.batches import video_token_id

    token_id = video_token_id(family, model_config)
    context = VideoContext(family, model_config, VideoTokenParams(), FrameSampling(num_frames=num_frames),
                            token_id, path.parent)
    info = video_info(path)
    clip = video_clip(context, "doc", path, info, sample_frames(info, context.video_frames), len(text_before))
    document = torch.tensor(text_before + [token_id] * clip.num_tokens + text_after)
    padding = -len(document) % seq_len_multiple
    grid = torch.tensor([clip.grid_thw]) if clip.grid_thw else None
    seconds = torch.tensor([clip.second_per_grid_t]) if clip.second_per_grid_t else None
    positions = position_ids_for_document(model_config, document, grid, seconds)
    padding_positions = torch.arange(padding).expand(*positions.shape[:-1], -1)
    labels = document.clone()
    labels[document == token_id] = -100
    labels[0] = -100
    return {
        "input_ids": torch.cat([document, torch.zeros(padding, dtype=torch.long)]),
        "labels": torch.cat([labels, torch.full((padding,), -100)]),
        "position_ids": torch.cat([positions, padding_positions], dim=-1),
        "doc_lens": torch.tensor([len(document)]),
        "videos": [clip.model_copy(update={"path": str(path)})],
    }


@pytest.fixture(scope="session")
def gpu_suite_quick(tiny_prepared, tmp_path_factory) -> dict:
    """The GPU suite's records (by part) from one run of its CPU mode. Its ZeRO-3 part trains in a
    project laid out as `make gpu-bundle` lays it out, made from the session's prepared tiny one."""
    import json

    import yaml

    from benchmarks.gpu_bundle import one_gpu_params

    params, root = tiny_prepared("qwen2_5_vl")
    raw = params.model_dump(mode="json")
    for key in ("raw_dir", "tokenized_dir", "packed_dir"):
        raw["data"][key] = str(root / raw["data"][key])
    raw["model"]["path"] = str(root / raw["model"]["path"])
    bundle = tmp_path_factory.mktemp("gpu_bundle")
    (bundle / "project").mkdir()
    (bundle / "project" / "params.yaml").write_text(yaml.safe_dump(one_gpu_params(raw)))
    out = tmp_path_factory.mktemp("gpu_suite")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--quick", "--device", "cpu", "--out", str(out),
         "--bundle", str(bundle)],
        cwd=REPO, env=project_env(REPO), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return {record["part"]: record for record in map(json.loads, (out / "gpu_suite.jsonl").read_text().splitlines())}
