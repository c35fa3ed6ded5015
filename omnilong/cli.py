"""The `omnilong` command line: thin wrappers that parse params once and call into the library."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional, get_args

import typer
from rich.console import Console

from omnilong.config import STAGE_NAMES, ConfigError, Family, Params, load_params, params_schema

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Validate parameter files.")
model_app = typer.Typer(no_args_is_help=True, help="Model directories.")
data_app = typer.Typer(no_args_is_help=True, help="Corpora: synthesise, add, tokenise, pack.")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(data_app, name="data")
report_app = typer.Typer(no_args_is_help=True, help="Reports that compare evaluations.")
app.add_typer(report_app, name="report")
launch_app = typer.Typer(no_args_is_help=True, help="Training stages on managed services.")
app.add_typer(launch_app, name="launch")

err_console = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="Parameter file.")]


def _fail(message: str, code: int) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(path: Path, *, check_paths: bool = False) -> Params:
    """With `check_paths`, the model directory is checked against the parameters too."""
    try:
        params = load_params(path, check_paths=check_paths)
        if check_paths:
            from omnilong.models.model_dir import check_model_dir

            check_model_dir(params, base=path.parent)
        return params
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _stage_name(stage: str) -> str:
    name = stage if stage.startswith("stage") else f"stage{stage}"
    if name not in STAGE_NAMES:
        raise _fail(f"--stage: expected one of 1, 2, 3 (or stage1..stage3), given {stage!r}", 2)
    return name


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="Parameter file to validate.")] = Path("params.yaml"),
    skip_path_checks: Annotated[
        bool, typer.Option(help="Validate schema and values only; model and corpus paths may be absent.")
    ] = False,
) -> None:
    """Validate a parameter file; exit 2 with every bad key named."""
    _load(file, check_paths=not skip_path_checks)
    typer.echo(f"{file}: ok")


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON schema of params.yaml."""
    typer.echo(json.dumps(params_schema(), indent=2))


@model_app.command("tiny")
def model_tiny(
    family: Annotated[str, typer.Option(help="qwen2_5_vl or llava_onevision.")],
    out: Annotated[Path, typer.Option(help="Directory to save the model to.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Build a random-initialised model of a real architecture, with a tokenizer trained offline."""
    families = get_args(Family)
    if family not in families:
        raise _fail(f"--family: expected one of {', '.join(families)}, given {family!r}", 2)
    cfg = _load(params)
    from omnilong.models.tiny import build_tiny_model

    corpus_dir = Path(cfg.data.raw_dir) / "default"
    if not (corpus_dir / "text").is_dir():
        raise _fail(f"{corpus_dir / 'text'}: no corpus to train the tokenizer on; run `omnilong data synth` first", 1)
    build_tiny_model(family, cfg.model.tiny, cfg.model.video, corpus_dir, out)
    typer.echo(f"tiny {family} model saved to {out}")


@data_app.command("synth")
def data_synth(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: <raw_dir>/default).")] = None,
) -> None:
    """Make the default corpus offline and deterministically."""
    cfg = _load(params)
    from omnilong.data.synth import synthesize_default_corpus

    target = out or Path(cfg.data.raw_dir) / "default"
    synthesize_default_corpus(cfg.data.synth, target)
    typer.echo(f"default corpus written to {target}")


@data_app.command("prepare")
def data_prepare(params: ParamsOption = Path("params.yaml")) -> None:
    """Tokenise every stage's corpora with the model's own tokenizer."""
    cfg = _load(params, check_paths=True)
    from omnilong.data.prepare import PrepareError, prepare_corpora
    from omnilong.data.schemas import RecordError

    try:
        prepare_corpora(cfg)
    except (PrepareError, RecordError) as exc:
        raise _fail(str(exc), 1) from None


@data_app.command("pack")
def data_pack(
    stage: Annotated[str, typer.Option(help="1, 2, 3 or stage1..stage3.")],
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Pack a stage's tokenized documents into fixed-length shards; print what they hold."""
    name = _stage_name(stage)
    cfg = _load(params)
    from omnilong.data.pack import PackError, pack_stage
    from omnilong.data.packed_summary import describe_packed_stage
    from omnilong.data.prepare import PrepareError

    try:
        pack_stage(cfg, name)
    except (PackError, PrepareError) as exc:
        raise _fail(str(exc), 1) from None
    stage_dir = Path(cfg.data.packed_dir) / name
    typer.echo("\n".join(describe_packed_stage(stage_dir, cfg.stages[name], stage_dir)))


@data_app.command("add")
def data_add(
    path: Annotated[Path, typer.Argument(help=(
        "A .jsonl, .jsonl.gz, .jsonl.zst or .parquet file, a `datasets` folder saved with save_to_disk, or a "
        "directory of them (video: a directory with the videos and their questions as qa.jsonl, qa.parquet, ...)."))],
    kind: Annotated[str, typer.Option(help="text, instruct or video.")],
    name: Annotated[Optional[str], typer.Option(help="Corpus name (default: the file or directory name).")] = None,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Validate a corpus of your own (read through `data.fields.<name>` if set) and track it with DVC
    under data/raw/user/<name>/."""
    cfg = _load(params)
    from omnilong.data.user_corpus import CorpusError, add_user_corpus

    try:
        target = add_user_corpus(path, kind, name, raw_dir=Path(cfg.data.raw_dir), fields=cfg.data.fields)
    except CorpusError as exc:
        raise _fail(str(exc), 2) from None
    typer.echo(
        f"{kind} corpus tracked at {target} (DVC). Use it in a stage with "
        f"`stages.<stage>.corpora: [..., {target.name}]` in params.yaml."
    )


@app.command("train")
def train(
    stage: Annotated[str, typer.Option(help="1, 2, 3 or stage1..stage3.")],
    params: ParamsOption = Path("params.yaml"),
    init: Annotated[Optional[Path], typer.Option(help="Model to start from (default: the previous stage's).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: runs/<stage>).")] = None,
    checkpoints: Annotated[Optional[Path], typer.Option(help="DeepSpeed checkpoints (default: checkpoints/<stage>).")] = None,
    variant: Annotated[Optional[str], typer.Option(help="Pipeline variant, e.g. no-stage2.")] = None,
) -> None:
    """Train one stage under torchrun with DeepSpeed ZeRO-3."""
    name = _stage_name(stage)
    cfg = _load(params)
    from omnilong.tracking.store import TrackingUnreachable
    from omnilong.train.disk_space import DiskSpaceError
    from omnilong.train.launch import InitModelMissing, RendezvousUnset, default_init, launch, preflight, runner_args

    suffix = f"-{variant}" if variant else ""
    init = init or default_init(cfg, name)
    out = out or Path("runs") / f"{name}{suffix}"
    checkpoints = checkpoints or Path("checkpoints") / f"{name}{suffix}"
    try:
        preflight(cfg, name, init, out, checkpoints)
    except InitModelMissing as exc:
        raise _fail(str(exc), 2) from None
    except (TrackingUnreachable, DiskSpaceError) as exc:
        raise _fail(str(exc), 1) from None
    try:
        exit_code = launch(cfg, runner_args(name, params, init, out, checkpoints, variant))
    except RendezvousUnset as exc:
        raise _fail(str(exc), 2) from None
    raise typer.Exit(exit_code)


@launch_app.command("sagemaker")
def launch_sagemaker(
    stage: Annotated[str, typer.Option(help="1, 2, 3 or stage1..stage3.")],
    params: ParamsOption = Path("params.yaml"),
    variant: Annotated[Optional[str], typer.Option(help="Pipeline variant, e.g. no-stage2.")] = None,
    wait: Annotated[bool, typer.Option(
        help="Follow the job until it ends; exit 1 unless it completed, else unpack its model into runs/<stage>.")
    ] = False,
) -> None:
    """Train one stage as a SageMaker training job (the `sagemaker` block of the parameters).

    The job pulls the stage's inputs from the DVC remote (`dvc push` them first) and runs the
    stage's dvc.yaml command under torchrun on each instance; its model goes to the output path.
    """
    name = _stage_name(stage)
    cfg = _load(params)
    if cfg.sagemaker is None:
        raise _fail(f"{params}: sagemaker: expected a sagemaker block (role_arn, image_uri, instance_type, "
                    "output_path, region) to launch a SageMaker job; see `omnilong config schema`", 2)
    from omnilong.sagemaker.job import LaunchError, dvc_stage_name, fetch_model, launch_stage, wait_for_job

    try:
        job_name = launch_stage(cfg, params, Path.cwd(), name, variant, log=typer.echo)
        if wait:
            job = wait_for_job(cfg.sagemaker, job_name, log=typer.echo)
            out = Path("runs") / dvc_stage_name(name, variant).removeprefix("train@")
            fetch_model(cfg.sagemaker, job, out)
            typer.echo(f"{job_name}: model unpacked into {out}")
    except LaunchError as exc:
        raise _fail(str(exc), 1) from None


@app.command("probe")
def probe(
    stage: Annotated[Optional[list[str]], typer.Option(
        help="1, 2, 3 or stage1..stage3; repeat for several (default: every stage).")] = None,
    cap_gib: Annotated[Optional[float], typer.Option(
        help="Memory each rank may hold, GiB: required on CPU (peak resident memory); on GPU a cap below "
             "the device's memory.")] = None,
    min_seq_len: Annotated[Optional[int], typer.Option(
        min=1, help="Where the search starts (default: the shortest row; rounded up to a multiple of 2 x sp_size).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(
        min=1, help="Where it stops (default: 4 x the stage's seq_len; rounded down).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for probe.json, probe.md and the trials' logs.")] = Path("runs/probe"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """The longest seq_len each stage's settings train at on this machine, found by real training steps.

    Each trial is a fresh torchrun job that builds the stage's engine and trains a warm-up and a
    measured step on synthetic rows; the lengths are bisected over multiples of 2 x sp_size.
    """
    names = [_stage_name(name) for name in stage or STAGE_NAMES]
    cfg = _load(params)
    import torch

    from omnilong.probe.main import probe_and_report
    from omnilong.probe.run import ProbeError, ProbeSettings, TrialError, cap_bytes

    on_gpu = torch.cuda.is_available()
    try:
        settings = ProbeSettings(out, cap_bytes(cap_gib, on_gpu), min_seq_len, max_seq_len)
        probe_and_report(cfg, params, names, settings, on_gpu, Console())
    except ProbeError as exc:
        raise _fail(str(exc), 2) from None
    except TrialError as exc:
        raise _fail(str(exc), 1) from None


@app.command("evaluate")
def evaluate(
    ctx: typer.Context,
    model: Annotated[list[str], typer.Option(
        help="A model to score: a directory or models:/NAME@ALIAS, optionally as LABEL=...; repeat for each.")],
    out: Annotated[Path, typer.Option(help="Directory for the results and plots.")] = Path("runs/eval"),
    params: ParamsOption = Path("params.yaml"),
    name: Annotated[str, typer.Option(help="Name of the MLflow run.")] = "evaluate",
) -> None:
    """Held-out loss, text NIAH, V-NIAH and VideoMME of each model, logged to MLflow; gates promotion.

    With `eval.sp_size` > 1 the prompts are prefilled sequence-parallel by that many torchrun ranks.
    """
    cfg = _load(params)
    from omnilong.tracking.store import TrackingUnreachable, check_reachable
    from omnilong.train.launch import torchrun, under_torchrun

    try:  # before any model is loaded: the results go to the tracking server
        check_reachable(cfg.tracking)
    except TrackingUnreachable as exc:
        raise _fail(str(exc), 1) from None
    models: dict[str, Path] = {}
    for item in model:
        label, sep, source = item.partition("=") if "=" in item.split(":/")[0] else ("", "", item)
        if sep and (not label or not source):
            raise _fail(f"--model: expected DIR, models:/NAME@ALIAS or LABEL=..., given {item!r}", 2)
        label = label or source.rstrip("/").split("@")[-1].split("/")[-1]
        models[label] = _resolve_model(source, cfg)
    if cfg.eval.sp_size > 1 and not under_torchrun():
        resolved = [f"{label}={directory}" for label, directory in models.items()]
        raise typer.Exit(torchrun("omnilong.cli", _command_line(ctx, model=resolved), cfg.eval.sp_size))
    from omnilong.eval.report import evaluate_and_track
    from omnilong.infer.prefill import inference_group

    with inference_group(cfg.eval.sp_size, cfg.parallel.timeout_s) as group:
        evaluate_and_track(cfg, models, out, run_name=name, group=group)


@report_app.command("ablation")
def report_ablation(
    full: Annotated[Path, typer.Option(help="The full pipeline's evaluation directory.")] = Path("runs/eval-full"),
    ablation: Annotated[Path, typer.Option(help="The no-stage-2 evaluation directory.")] = Path("runs/eval-no-stage2"),
    out: Annotated[Path, typer.Option(help="Directory for the report.")] = Path("runs/ablation"),
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """The full recipe's stage-3 model beside the one trained without stage 2 (markdown + plot, MLflow)."""
    cfg = _load(params)
    from omnilong.eval.ablation import ablation_report

    try:
        ablation_report(cfg, full, ablation, out)
    except (FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc), 1) from None


def _resolve_model(model: str, cfg: Params) -> Path:
    """A model directory, or the download of the registry URI `model` (exit 1 naming it when the
    tracking server does not answer or holds no such model)."""
    from omnilong.tracking.registry import ModelNotFound, resolve_model_dir
    from omnilong.tracking.store import TrackingUnreachable

    try:
        return resolve_model_dir(model, cfg.tracking)
    except (ModelNotFound, TrackingUnreachable) as exc:
        raise _fail(str(exc), 1) from None


def _command_line(ctx: typer.Context, **replaced) -> list[str]:
    """The command `ctx` runs and its options as a command line, with `replaced` values."""
    args = [ctx.info_name]
    for param in ctx.command.params:
        value = replaced.get(param.name, ctx.params[param.name])
        for item in (value if param.multiple else [value]) if value is not None else []:
            args += [param.opts[0], str(item)]
    return args


@app.command("generate")
def generate(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Model directory, or a registry URI such as models:/omnilong-qwen2_5_vl@stage3.")],
    question: Annotated[str, typer.Option(help="The user's question.")],
    video: Annotated[Optional[Path], typer.Option(help="A video shown before the question.")] = None,
    num_frames: Annotated[Optional[int], typer.Option(help="Frames spread uniformly over the video.")] = None,
    fps: Annotated[Optional[float], typer.Option(help="Frames per second to sample (with --max-frames).")] = None,
    max_frames: Annotated[Optional[int], typer.Option(help="Cap on the frames --fps samples.")] = None,
    start: Annotated[Optional[float], typer.Option(help="Start of the video window, seconds.")] = None,
    end: Annotated[Optional[float], typer.Option(help="End of the video window, seconds.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    params: ParamsOption = Path("params.yaml"),
) -> None:
    """Answer a question, about a video or not, with a model the pipeline produced.

    Frames are sampled like stage 3 (its `video_frames` unless --num-frames or --fps is given).
    With `eval.sp_size` > 1 the prompt is prefilled sequence-parallel by that many torchrun ranks.
    """
    cfg = _load(params)
    model_dir = _resolve_model(model, cfg)
    import torch.distributed as dist
    from pydantic import ValidationError

    from omnilong.config import FrameSampling
    from omnilong.data.video_frames import VideoReadError
    from omnilong.eval.answering import Question, VideoQuery
    from omnilong.infer.generate import ModelAnswerer
    from omnilong.infer.prefill import inference_group
    from omnilong.train.launch import torchrun, under_torchrun

    query = None
    if video is not None:
        try:
            sampling = (FrameSampling(num_frames=num_frames, fps=fps, max_frames=max_frames)
                        if num_frames or fps else cfg.stages.stage3.video_frames)
        except ValidationError as exc:
            raise _fail(f"--num-frames/--fps/--max-frames: {exc.errors()[0]['msg']}", 2) from None
        query = VideoQuery(video, sampling, start, end)
    if cfg.eval.sp_size > 1 and not under_torchrun():
        # The ranks load the model the registry URI names from one download.
        raise typer.Exit(torchrun("omnilong.cli", _command_line(ctx, model=model_dir), cfg.eval.sp_size))
    with inference_group(cfg.eval.sp_size, cfg.parallel.timeout_s) as group:
        try:
            answerer = ModelAnswerer(model_dir, cfg.model.video, sp_group=group,
                                     ring_backend=cfg.parallel.ring_attention)
            answer = answerer.answer(Question([{"role": "user", "content": question}], query, max_new_tokens))
        except (FileNotFoundError, VideoReadError, ValueError) as exc:
            raise _fail(str(exc), 1) from None
        if group is None or dist.get_rank(group) == 0:
            typer.echo(answer)


@report_app.command("videomme")
def report_videomme(
    out: Annotated[Path, typer.Option(help="Directory for videomme.json, videomme.md and the plot.")],
    without_subtitles: Annotated[Optional[Path], typer.Option(help="Results file of the setting without subtitles.")] = None,
    with_subtitles: Annotated[Optional[Path], typer.Option(help="Results file of the setting with subtitles.")] = None,
) -> None:
    """Score existing VideoMME results files (a `response` per question), no model needed."""
    files = {setting: path for setting, path in (("without_subtitles", without_subtitles),
                                                 ("with_subtitles", with_subtitles)) if path is not None}
    if not files:
        raise _fail("expected --without-subtitles FILE and/or --with-subtitles FILE", 2)
    from omnilong.eval.videomme_data import VideommeDataError
    from omnilong.eval.videomme_report import markdown_table, write_videomme_report
    from omnilong.eval.videomme_score import score_results_files

    try:
        scores = score_results_files(files)
    except (FileNotFoundError, VideommeDataError, ValueError) as exc:
        raise _fail(str(exc), 1) from None
    write_videomme_report(scores, out)
    typer.echo(markdown_table(scores))


def main() -> None:
    try:
        app()
    except ConfigError as exc:  # raised below the CLI by code that re-validates params
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
