"""VideoMME scores written out: the full JSON, a markdown table and a bar plot by duration."""

from __future__ import annotations

from pathlib import Path

from omnilong import atomic
from omnilong.eval.plots import grouped_bars_png
from omnilong.eval.videomme_score import GROUPINGS, GroupScore, SettingScore, VideommeScores

SCORES_FILE = "videomme.json"
TABLE_FILE = "videomme.md"
PLOT_FILE = "videomme_accuracy_by_duration.png"


def _rows(score: SettingScore) -> list[tuple[str, GroupScore]]:
    return [("overall", score.overall)] + [
        (f"{grouping}: {name}", group) for grouping in GROUPINGS for name, group in getattr(score, grouping).items()
    ]


def markdown_table(scores: VideommeScores) -> str:
    """One row per setting and group: both extractors, both denominators, the extraction rates."""
    lines = [
        "| setting | group | questions | accuracy | official figure | extracted | strict accuracy | strict extracted |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting, score in scores.settings.items():
        for name, group in _rows(score):
            official, strict = group.official, group.strict
            lines.append(
                f"| {setting} | {name} | {group.questions} | {official.accuracy:.3f} | "
                f"{official.answered_accuracy:.3f} | {official.extraction_rate:.3f} | "
                f"{strict.accuracy:.3f} | {strict.extraction_rate:.3f} |"
            )
    notes = (
        "\naccuracy: official extractor, every question counted (no letter read = wrong). "
        "official figure: the benchmark script's number, over the questions a letter was read from. "
        "strict: the stricter extractor, every question counted.\n"
    )
    return "\n".join(lines) + "\n" + notes


def accuracy_by_duration_png(scores: VideommeScores) -> bytes:
    """Bars of accuracy (official extractor, every question counted) per duration, one colour per setting."""
    durations = list(dict.fromkeys(name for score in scores.settings.values() for name in score.duration))
    series = {
        setting.replace("_", " "): [score.duration[d].official.accuracy if d in score.duration else 0.0 for d in durations]
        for setting, score in scores.settings.items()
    }
    return grouped_bars_png(series, durations, "VideoMME accuracy by video duration",
                            ylabel="accuracy (official extractor)", reference=(0.25, "chance (1 in 4)"))


def write_videomme_report(scores: VideommeScores, out_dir: Path) -> dict[str, Path]:
    """Write the scores JSON, the markdown table and the plot into `out_dir`; their paths by kind."""
    paths = {"scores": out_dir / SCORES_FILE, "table": out_dir / TABLE_FILE, "plot": out_dir / PLOT_FILE}
    atomic.write_text(paths["scores"], scores.model_dump_json(indent=1) + "\n")
    atomic.write_text(paths["table"], markdown_table(scores))
    atomic.write_bytes(paths["plot"], accuracy_by_duration_png(scores))
    return paths
