"""The embedded default corpus, made offline and deterministically (`omnilong data synth`).

Layout written to `out_dir` (atomically, as a whole):
    text/documents.jsonl    TextRecord: stage-1 long documents from code and docs on this machine
    instruct/samples.jsonl  InstructRecord: stage-2 long-context retrieval and QA chats
    video/video-*.mp4       stage-3 rendered scenes
    video/long-video-*.mp4  stage-3 long scenes, each with its subtitles in long-video-*.srt
    video/qa.jsonl          VideoRecord: questions the scenes (and subtitles) answer

The same seed and sources give byte-identical files: every choice comes from seeded
generators, JSON is written with sorted keys and fixed separators, and nothing records a time
or a path of this machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel
from tqdm import tqdm

from omnilong.atomic import atomic_dir, write_text
from omnilong.config import SynthParams
from omnilong.data.synth.instruct import synthesize_instructions
from omnilong.data.synth.text import synthesize_text
from omnilong.data.synth.video import synthesize_videos


def to_jsonl(records: Iterable[BaseModel]) -> str:
    return "".join(
        json.dumps(
            record.model_dump(mode="json", exclude_none=True),
            sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        ) + "\n"
        for record in records
    )


def synthesize_default_corpus(params: SynthParams, out_dir: Path) -> None:
    """Write the default corpus to `out_dir`, replacing what was there only once all of it is made."""
    with atomic_dir(out_dir) as staging:
        docs = list(tqdm(synthesize_text(params.text, params.seed), total=params.text.num_documents,
                         desc="synth text", unit="doc"))
        write_text(staging / "text" / "documents.jsonl", to_jsonl(doc.to_record() for doc in docs))

        samples = tqdm(synthesize_instructions(params.instruct, docs, params.seed), total=params.instruct.num_samples,
                       desc="synth instruct", unit="sample")
        write_text(staging / "instruct" / "samples.jsonl", to_jsonl(samples))

        video_dir = staging / "video"
        video_dir.mkdir()
        videos = tqdm(synthesize_videos(params.video, params.seed, video_dir),
                      total=params.video.num_videos + params.video.long.num_videos,
                      desc="synth video", unit="video")
        write_text(video_dir / "qa.jsonl", to_jsonl(videos))
