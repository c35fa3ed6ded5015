"""The deck's three evaluations on one model, with the same settings for every model.

Text NIAH (omnilong/eval/niah.py), V-NIAH (vniah.py) and VideoMME (videomme.py) run through one
`ModelAnswerer`; each writes its JSON and plots under `out_dir/<evaluation>/`, and the flat
metrics they give are returned (and written to `out_dir/metrics.json`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch.distributed as dist

from omnilong import atomic
from omnilong.config import Params, corpus_path


def evaluation_settings(params: Params) -> dict:
    """What makes two models' scores comparable: the evaluation parameters and the model's
    video tokenisation. Recorded with every gate score."""
    return {"eval": params.eval.model_dump(mode="json", exclude={"heldout_documents", "sp_size"}),
            "video": params.model.video.model_dump(mode="json")}


def vniah_haystack(params: Params, root: Path = Path(".")) -> Path:
    """`eval.vniah.haystack`, or the default corpus's first long synthetic video."""
    if params.eval.vniah.haystack is not None:
        return root / params.eval.vniah.haystack
    videos = sorted((corpus_path(root / params.data.raw_dir, "default") / "video").glob("long-video-*.mp4"))
    if not videos:
        raise FileNotFoundError(
            f"eval.vniah.haystack: null means the default corpus's long videos, but there are none under "
            f"{root / params.data.raw_dir}/default/video (run `omnilong data synth`, or set it)"
        )
    return videos[0]


def evaluate_model(params: Params, model_dir: Path, out_dir: Path, root: Path = Path("."),
                   group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """The three evaluations' metrics; their files go to `out_dir`. Under a sequence-parallel
    `group` every rank calls this and asks the same questions; only the first rank's files are
    kept (the evaluations write as they go: the others write into a scratch directory)."""
    if group is not None and dist.get_rank(group) != 0:
        with tempfile.TemporaryDirectory(prefix="omnilong-eval-") as scratch:
            return _evaluate_model(params, model_dir, Path(scratch), root, group)
    return _evaluate_model(params, model_dir, out_dir, root, group)


def _evaluate_model(params: Params, model_dir: Path, out_dir: Path, root: Path,
                    group: dist.ProcessGroup | None) -> dict[str, float]:
    from omnilong.eval.niah import run_niah
    from omnilong.eval.niah_haystack import niah_haystack_text
    from omnilong.eval.videomme import evaluate_videomme
    from omnilong.eval.videomme_score import videomme_metrics
    from omnilong.eval.vniah import run_vniah
    from omnilong.infer.generate import ModelAnswerer

    answerer = ModelAnswerer(model_dir, params.model.video, sp_group=group, ring_backend=params.parallel.ring_attention)
    niah = run_niah(answerer, answerer.tokenizer, niah_haystack_text(params, root), params.eval.niah, out_dir / "niah")
    vniah = run_vniah(answerer, vniah_haystack(params, root), params.eval.vniah, out_dir / "vniah")
    videomme = evaluate_videomme(answerer, params.eval.videomme, out_dir / "videomme")
    metrics = {
        "niah.accuracy": float(niah["mean_score"]),
        "vniah.teacher_forced": vniah["teacher_forced"],
        "vniah.generation": vniah["generation"],
        **videomme_metrics(videomme),
    }
    atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return metrics
