"""A stage's trials, each a fresh torchrun job (omnilong/probe/trial.py), judged against the cap.

A fresh job per trial: an out-of-memory leaves the allocator, NCCL or DeepSpeed in no state to
go on, so no trial runs in a process another trial used. The trials run on this node:
`parallel.nproc_per_node` ranks (one per GPU), with the stage's sp_size.

The cap per rank: on GPU the device's memory (or `--cap-gib` when lower), and a CUDA
out-of-memory is a trial that does not fit; on CPU `--cap-gib`, required, against each rank's
peak resident memory (everything the machine holds for that process). A trial that fails any
other way stops the probe with the end of its log.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from omnilong.config import STAGE_KIND, Params, StageName
from omnilong.probe.search import longest_fitting
from omnilong.probe.trial import rank_file
from omnilong.train.launch import torchrun

GIB = 2**30
MAX_SEQ_LEN_FACTOR = 4
"""Without --max-seq-len, the search stops at this many times the stage's seq_len."""
LOG_TAIL_LINES = 40


class ProbeError(ValueError):
    """Settings the probe cannot run with; the message names the option or field."""


class TrialError(RuntimeError):
    """A trial that failed for a reason other than running out of memory."""


@dataclass(frozen=True)
class ProbeSettings:
    out: Path
    """Directory of the report and of every trial's log."""
    cap_bytes: int | None
    """Memory per rank; None on GPU: the device's memory."""
    min_seq_len: int | None = None
    """Where the search starts (rounded up to a multiple of 2 x sp_size); None: the shortest row."""
    max_seq_len: int | None = None
    """Where it stops (rounded down); None: MAX_SEQ_LEN_FACTOR x the stage's seq_len."""
    peak_function: str | None = None
    """For tests: `module:function(seq_len, rank) -> bytes` reported instead of the measured peak."""


@dataclass(frozen=True)
class Trial:
    stage: StageName
    seq_len: int
    fits: bool
    peak_bytes: list[int]
    """Per rank, in rank order; empty when a rank ran out of GPU memory."""
    cap_bytes: list[int]
    seconds: float | None
    """The measured step's time (the slowest rank's)."""
    tokens_per_s: float | None
    oom: bool = False


@dataclass
class StageProbe:
    stage: StageName
    sp_size: int
    lowest: int
    highest: int
    longest: int | None = None
    """The longest length that fitted; None: not even `lowest` did."""
    trials: list[Trial] = field(default_factory=list)

    @property
    def at_longest(self) -> Trial | None:
        return next((t for t in self.trials if t.seq_len == self.longest and t.fits), None)

    @property
    def stopped_at_max(self) -> bool:
        """The search reached --max-seq-len and it fitted: the stage may fit longer still."""
        return self.longest == self.highest

    def to_json(self) -> dict:
        return {"stage": self.stage, "sp_size": self.sp_size, "lowest": self.lowest, "highest": self.highest,
                "longest_seq_len": self.longest, "stopped_at_max": self.stopped_at_max}


def cap_bytes(cap_gib: float | None, on_gpu: bool) -> int | None:
    if cap_gib is None:
        if on_gpu:
            return None
        raise ProbeError("--cap-gib: required on CPU (no device memory to cap by): the memory each rank may hold, "
                         "in GiB, e.g. --cap-gib 4")
    if not cap_gib > 0:
        raise ProbeError(f"--cap-gib: expected a positive number of GiB, given {cap_gib}")
    return int(cap_gib * GIB)


def probe_stage(params: Params, params_file: Path, stage: StageName, settings: ProbeSettings,
                log: Callable[[str], None] = print) -> StageProbe:
    """Search the longest `seq_len` `stage` trains at (see search.longest_fitting)."""
    stage_params = params.stages[stage]
    nproc = params.parallel.nproc_per_node
    if nproc % stage_params.sp_size:
        raise ProbeError(f"stages.{stage}.sp_size: expected a divisor of parallel.nproc_per_node = {nproc} "
                         f"(the probe runs on this node), given {stage_params.sp_size}")
    if not (Path(params.model.path) / "config.json").is_file():
        raise ProbeError(f"model.path: expected a local model directory with config.json, given "
                         f"{params.model.path!r}; build the tiny one with `dvc repro model_tiny`")
    step = 2 * stage_params.sp_size
    video, shortest = None, 1
    if STAGE_KIND[stage] == "video":
        video, shortest = _probe_video(params, stage, settings.out / "trials" / stage / "video.mp4")
    lowest = max(shortest, settings.min_seq_len or 1)
    lowest = -(-lowest // step) * step
    highest = (settings.max_seq_len or MAX_SEQ_LEN_FACTOR * stage_params.seq_len) // step * step
    if highest < lowest:
        raise ProbeError(f"--max-seq-len: expected at least {lowest} for {stage} (the shortest row to try: "
                         f"a multiple of 2 x sp_size = {step}"
                         + (f", at least {shortest} to hold the video and text" if video else "")
                         + f"), given {settings.max_seq_len}")
    probe = StageProbe(stage, stage_params.sp_size, lowest, highest)

    def fits(seq_len: int) -> bool:
        trial = run_trial(params_file, stage, seq_len, nproc, settings, video)
        probe.trials.append(trial)
        peaks = ", ".join(f"{b / GIB:.2f}" for b in trial.peak_bytes) or "out of GPU memory"
        log(f"[{stage}] seq_len {seq_len}: {'fits' if trial.fits else 'does not fit'} (peak GiB per rank: {peaks})")
        return trial.fits

    probe.longest = longest_fitting(fits, lowest, highest, step)
    return probe


def _probe_video(params: Params, stage: StageName, path: Path) -> tuple[Path, int]:
    """The video stage's synthetic video, written once for all its trials, and the shortest row holding it."""
    from transformers import AutoConfig

    from omnilong.train.synthetic_rows import probe_clip, shortest_video_row, write_probe_video

    sampling, family = params.stages[stage].video_frames, params.model.family
    model_config = AutoConfig.from_pretrained(params.model.path, trust_remote_code=False)
    try:
        write_probe_video(path, sampling, family, model_config, params.model.video)
    except ValueError as exc:
        raise ProbeError(f"stages.{stage}.{exc}") from None
    return path, shortest_video_row(probe_clip(path, sampling, family, model_config, params.model.video))


def run_trial(params_file: Path, stage: StageName, seq_len: int, nproc: int, settings: ProbeSettings,
              video: Path | None) -> Trial:
    """One fresh torchrun job of the stage at `seq_len`; its ranks' records judged against the cap."""
    trial_dir = settings.out / "trials" / stage / f"len{seq_len}"
    shutil.rmtree(trial_dir, ignore_errors=True)  # a record left by an earlier probe must not count
    trial_dir.mkdir(parents=True)
    args = ["--params", str(params_file), "--stage", stage, "--seq-len", str(seq_len), "--out", str(trial_dir)]
    args += ["--video", str(video)] if video else []
    args += ["--peak-function", settings.peak_function] if settings.peak_function else []
    log_file = trial_dir / "torchrun.log"
    with log_file.open("w") as output:
        exit_code = torchrun("omnilong.probe.trial", args, nproc, output=output)
    records = [json.loads(path.read_text()) for rank in range(nproc) if (path := rank_file(trial_dir, rank)).is_file()]
    if any(record.get("oom") for record in records):
        return Trial(stage, seq_len, False, [], [], None, None, oom=True)
    errors = [record["error"] for record in records if "error" in record]
    if exit_code != 0 or errors or len(records) != nproc:
        # A rank's own traceback says what failed; without one (a rank killed), the log's end.
        log_text = log_file.read_text(errors="replace")
        tail = "\n".join((errors[0] if errors else log_text).splitlines()[-LOG_TAIL_LINES:])
        killed = " (a rank was killed: by the kernel's out-of-memory killer? lower --cap-gib)" if "SIGKILL" in log_text else ""
        raise TrialError(f"{stage} at seq_len {seq_len}: the trial failed (torchrun exit code {exit_code}{killed}, "
                         f"{len(records) - len(errors)} of {nproc} ranks reported); see {log_file}:\n{tail}")
    peaks = [record["peak_bytes"] for record in records]
    caps = [min(c for c in (settings.cap_bytes, record["device_bytes"]) if c is not None) for record in records]
    seconds = max(record["seconds"] for record in records)
    return Trial(stage, seq_len, all(peak <= cap for peak, cap in zip(peaks, caps, strict=True)), peaks, caps,
                 seconds, records[0]["tokens"] / seconds)

