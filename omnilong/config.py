"""Typed parameters: `params.yaml` parsed once into pydantic models and passed down.

This module is the only place parameters are read. Every model forbids unknown keys, so a
typo fails loudly instead of being ignored. `load_params` turns pydantic's errors into a
`ConfigError` whose message names each offending key path (`stages.stage1.seq_len`),
what was expected and what was given; the CLI maps it to exit code 2.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

Family = Literal["qwen2_5_vl", "llava_onevision"]
StageName = Literal["stage1", "stage2", "stage3"]
RingBackend = Literal["torch", "ring_flash_attn"]
STAGE_NAMES: tuple[StageName, ...] = ("stage1", "stage2", "stage3")
# What each stage trains on: continual pretraining, text instructions, video instructions.
STAGE_KIND: dict[StageName, Literal["text", "instruct", "video"]] = {
    "stage1": "text",
    "stage2": "instruct",
    "stage3": "video",
}

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
CorpusName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
# host:port, the host a name, an IPv4 address or a bracketed IPv6 address (as torchrun takes it).
Endpoint = Annotated[str, Field(pattern=r"^([A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$")]


class ConfigError(ValueError):
    """A parameter file that cannot be used; the message names every bad key path."""


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TinyModelParams(_Params):
    """Shape of the random-initialised model built by `omnilong model tiny` (the default demo)."""

    hidden_size: PositiveInt = 64
    num_hidden_layers: PositiveInt = 2
    num_attention_heads: PositiveInt = 4
    num_key_value_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 128
    vision_hidden_size: PositiveInt = 32
    vision_depth: PositiveInt = 2
    vision_num_heads: PositiveInt = 2
    vocab_size: Annotated[int, Field(ge=512)] = 4096
    """Target size of the BPE vocabulary trained offline on the default corpus."""
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelParams:
        if self.hidden_size % self.num_attention_heads:
            raise _FieldError(
                "num_attention_heads", f"a divisor of hidden_size ({self.hidden_size})", self.num_attention_heads
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise _FieldError(
                "num_key_value_heads",
                f"a divisor of num_attention_heads ({self.num_attention_heads})",
                self.num_key_value_heads,
            )
        if self.vision_hidden_size % self.vision_num_heads:
            raise _FieldError(
                "vision_num_heads",
                f"a divisor of vision_hidden_size ({self.vision_hidden_size})",
                self.vision_num_heads,
            )
        return self


class QwenVideoParams(_Params):
    """Qwen2.5-VL: each frame is resized to a pixel budget (sides multiples of 28)."""

    min_pixels: PositiveInt = 28 * 28 * 4
    max_pixels: PositiveInt = 28 * 28 * 16

    @model_validator(mode="after")
    def _ordered(self) -> QwenVideoParams:
        if self.min_pixels > self.max_pixels:
            raise _FieldError("min_pixels", f"at most max_pixels ({self.max_pixels})", self.min_pixels)
        return self


class LlavaVideoParams(_Params):
    """LLaVA-OneVision: frames are resized to the vision tower's input and features pooled."""

    tokens_per_frame: PositiveInt | None = None
    """Visual tokens per frame after bilinear pooling of the vision tower's patch grid to a
    square of this many cells (a perfect square: 196 = 14 x 14, 144 = 12 x 12, at most the grid's
    cells). null: the model's own 2x pooling, ceil(grid / 2) ** 2 (196 for a 27 x 27 grid)."""

    @field_validator("tokens_per_frame")
    @classmethod
    def _square(cls, value: int | None) -> int | None:
        if value is not None and math.isqrt(value) ** 2 != value:
            raise ValueError(f"a perfect square (e.g. 144 or 196), given {value}")
        return value


class VideoTokenParams(_Params):
    qwen2_5_vl: QwenVideoParams = QwenVideoParams()
    llava_onevision: LlavaVideoParams = LlavaVideoParams()


class ModelParams(_Params):
    family: Family = "qwen2_5_vl"
    path: Annotated[str, Field(min_length=1)]
    """Local directory of a Hugging Face model (real weights, or the tiny one built by DVC)."""
    rope_theta: Annotated[float, Field(gt=0)] | None = None
    """Override of the language model's RoPE base for long contexts; null keeps the model's."""
    tiny: TinyModelParams = TinyModelParams()
    video: VideoTokenParams = VideoTokenParams()


class TextSynthParams(_Params):
    source_dirs: list[str] = []
    """Directories to read source and docs from; empty means the Python standard library."""
    num_documents: PositiveInt = 120
    min_chars: PositiveInt = 2_000
    max_chars: PositiveInt = 16_000

    @model_validator(mode="after")
    def _ordered(self) -> TextSynthParams:
        if self.min_chars > self.max_chars:
            raise _FieldError("min_chars", f"at most max_chars ({self.max_chars})", self.min_chars)
        return self


class InstructSynthParams(_Params):
    num_samples: PositiveInt = 48
    context_chars: PositiveInt = 6_000
    """Length of the long context each instruction sample is built around."""


class LongVideoSynthParams(_Params):
    """Long videos (the short ones' scene over many more frames, same size and rate), each with
    an .srt of subtitles; some of their questions only the subtitles answer."""

    num_videos: NonNegativeInt = 2
    num_frames: Annotated[int, Field(ge=2)] = 512


class VideoSynthParams(_Params):
    num_videos: PositiveInt = 8
    num_frames: Annotated[int, Field(ge=2)] = 48
    """At least 2: the shape changes colour half-way and one digit follows another."""
    height: Annotated[int, Field(ge=16)] = 64
    width: Annotated[int, Field(ge=16)] = 64
    fps: PositiveInt = 4
    long: LongVideoSynthParams = LongVideoSynthParams()

    @field_validator("height", "width")
    @classmethod
    def _even(cls, value: int, info: ValidationInfo) -> int:
        if value % 2:
            raise ValueError("Value should be even (H.264 needs even frame sides)")
        return value


class SynthParams(_Params):
    seed: int = 0
    text: TextSynthParams = TextSynthParams()
    instruct: InstructSynthParams = InstructSynthParams()
    video: VideoSynthParams = VideoSynthParams()


ColumnName = Annotated[str, Field(min_length=1)]


class CorpusFields(_Params):
    """Where a user corpus keeps what a record holds (omnilong/data/schemas.py), so it is read as it
    is: Parquet columns, `datasets` features or JSON keys. Only the fields named here are read;
    others are ignored. A row without a named field (or with null there) is an error naming it."""

    id_field: ColumnName | None = "id"
    """null: a row's id is its source's file name and its line or row (`part.parquet:17`)."""
    text_field: ColumnName = "text"
    """Text records: the document."""
    source_field: ColumnName | None = "source"
    """Text records: where the document comes from; null: the source's file name."""
    messages_field: ColumnName = "messages"
    """Instruct and video records: the list of turns."""
    role_field: ColumnName = "role"
    """The key of a turn's speaker (`from` in ShareGPT's layout)."""
    content_field: ColumnName = "content"
    """The key of a turn's text (`value` in ShareGPT's layout)."""
    roles: dict[str, Literal["system", "user", "assistant"]] = {}
    """The corpus's role names mapped to ours (`{human: user, gpt: assistant}`); others are kept."""


class DataParams(_Params):
    raw_dir: str = "data/raw"
    """Raw corpora: `default/` made by `omnilong data synth`, `user/<name>/` added by users."""
    fields: dict[CorpusName, CorpusFields] = {}
    """By user corpus name: its field mapping (`omnilong data add` and `prepare` read it). A corpus
    without one holds our own records, checked strictly (a key they do not have is an error)."""
    tokenized_dir: str = "data/tokenized"
    packed_dir: str = "data/packed"
    prepare_workers: PositiveInt = 1
    """Processes that encode text and chats in `prepare` (1: in this process). Each starts in under
    a second (it imports the tokenizers library only) and pays off from about a million tokens;
    the output is the same for any number."""
    loader_workers: NonNegativeInt = 1
    """DataLoader worker processes per rank that decode videos ahead of training (0: in-process)."""
    synth: SynthParams = SynthParams()

    @field_validator("fields")
    @classmethod
    def _not_default(cls, fields: dict[str, CorpusFields]) -> dict[str, CorpusFields]:
        if "default" in fields:
            raise ValueError("user corpus names only: `default` is synthesised in our own records")
        return fields


class ParallelParams(_Params):
    nnodes: PositiveInt = 1
    nproc_per_node: PositiveInt = 2
    ring_attention: RingBackend = "torch"
    """Ring attention backend when sp_size > 1: `torch` (PyTorch kernels, CPU and GPU) or
    `ring_flash_attn` (the ring-flash-attn package, GPU with flash-attn only, experimental)."""
    timeout_s: Annotated[float, Field(gt=0)] = 900
    """Seconds a rank waits in a collective for its peers before the job fails (a peer hung or
    died), naming the rank, the step and the collective; torch's own defaults are 30 min (gloo)
    and 10 min (NCCL), and a hang then names neither. 15 minutes: a rank never waits alone on a
    peer for that long in a healthy run (the longest such wait is a peer writing its checkpoint
    shard or the exported model), and a hang costs the job at most that long before the retry.
    Not a resume input: raising it resumes a stage that timed out."""
    rdzv_endpoint: Endpoint | None = None
    """Several nodes (nnodes > 1): `host:port` of the c10d rendezvous, the same on every node; the
    torchrun agent on that host serves it (with the store the ranks share, the servers of OmniLong
    that listen beyond 127.0.0.1: every node connects to them). Unset: torchrun's own variable
    PET_RDZV_ENDPOINT. Unused with one node (standalone, on loopback). Not a resume input: a
    restarted job may meet elsewhere."""
    rdzv_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] = "omnilong"
    """The rendezvous's name (torchrun's --rdzv-id), the same on every node of a job."""
    hierarchical_partition: bool = False
    """ZeRO++ hierarchical partitioning (hpZ, `zero_hpz_partition_size` = nproc_per_node): each
    node also keeps the parameters partitioned over its own ranks only, so the forward and
    backward all-gathers stay inside the node; costs that secondary copy's memory. Several nodes
    only; inert with one rank per node."""

    @model_validator(mode="after")
    def _hierarchical_partition_needs_nodes(self) -> ParallelParams:
        if self.hierarchical_partition and self.nnodes == 1:
            raise _FieldError("hierarchical_partition", "false with one node (parallel.nnodes 1)", True)
        return self

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def hpz_partition_size(self) -> int | None:
        """DeepSpeed's zero_hpz_partition_size, where hierarchical partitioning is on."""
        return self.nproc_per_node if self.hierarchical_partition else None


class LoraParams(_Params):
    r: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], Field(min_length=1)] = [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]
    """Module names of the language model to adapt (the vision tower is left as it is)."""


class TiledMLPParams(_Params):
    """The language model's MLPs run over tiles of the sequence (omnilong/train/tiling.py)."""

    enabled: bool = False
    tile_tokens: PositiveInt | Literal["auto"] = "auto"
    """Tokens per tile; `auto`: the model's hidden size, so one tile's [tile, intermediate]
    activation is the size of one MLP weight (DeepSpeed ALST's choice)."""


class TrainParams(_Params):
    finetune: Literal["full", "lora"] = "full"
    lora: LoraParams = LoraParams()
    lr: Annotated[float, Field(gt=0)] = 1e-3
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: NonNegativeInt = 2
    max_steps: PositiveInt = 20
    """Optimizer steps."""
    micro_batch_size: PositiveInt = 1
    grad_accum_steps: PositiveInt = 1
    grad_clip: Annotated[float, Field(gt=0)] = 1.0
    max_nonfinite_steps: PositiveInt = 3
    """A step whose loss or gradient norm is NaN or inf on any rank updates nothing (counted,
    logged); this many such steps in a row stop the stage with an error."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 on GPU, fp32 on CPU."""
    offload_optimizer: bool = False
    """ZeRO-3: keep optimizer states (and do the optimizer step) on the CPU."""
    offload_params: bool = False
    """ZeRO-3: keep partitioned parameters on the CPU between uses."""
    activation_checkpointing: bool = True
    offload_activations: bool = False
    """Keep the layer-boundary checkpoints in (pinned) host memory until backward; needs
    `activation_checkpointing`."""
    tiled_mlp: TiledMLPParams = TiledMLPParams()
    checkpoint_every: PositiveInt = 10
    """Optimizer steps between DeepSpeed checkpoints (one is always written at the end)."""
    keep_checkpoints: PositiveInt = 2
    """Complete checkpoints kept (the newest); older ones are deleted once a new one is complete."""
    seed: int = 0

    @model_validator(mode="after")
    def _offload_needs_checkpoints(self) -> TrainParams:
        if self.offload_activations and not self.activation_checkpointing:
            raise _FieldError(
                "offload_activations", "false unless activation_checkpointing is true (it offloads the checkpoints)",
                self.offload_activations,
            )
        return self


class LossParams(_Params):
    """The LM head's cross-entropy (omnilong/loss): chunked, so no [tokens x vocab] logits exist."""

    impl: Literal["chunked", "reference"] = "chunked"
    """`reference` materialises the full logits: for checks on small runs only."""
    chunk_tokens: PositiveInt | Literal["auto"] = "auto"
    """Tokens per chunk; `auto`: the most that fit in `memory_budget_mb`."""
    memory_budget_mb: PositiveInt = 256
    """Workspace for one chunk's logits and their gradient, used by `chunk_tokens: auto`."""
    label_smoothing: Annotated[float, Field(ge=0, le=1)] = 0.0
    z_loss: Annotated[float, Field(ge=0)] = 0.0
    """Coefficient of logsumexp(logits)**2, summed over the valid tokens."""
    softcap: Annotated[float, Field(gt=0)] | None = None
    """Logits become softcap * tanh(logits / softcap) before the softmax; null: off."""


class FrameSampling(_Params):
    """Which frames of a video the model sees: `num_frames` spread uniformly over the video (or
    the record's start/end window), or `fps` frames per second capped at `max_frames` (beyond
    the cap, `max_frames` spread uniformly). Set exactly one of `num_frames` and `fps`."""

    num_frames: PositiveInt | None = None
    fps: Annotated[float, Field(gt=0)] | None = None
    max_frames: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> FrameSampling:
        if (self.num_frames is None) == (self.fps is None):
            raise _FieldError("num_frames", "exactly one of num_frames and fps to be set", self.num_frames)
        if self.max_frames is not None and self.fps is None:
            raise _FieldError("max_frames", "unset unless fps is set (num_frames is already a count)", self.max_frames)
        return self

    @property
    def most_frames(self) -> int | None:
        """The most frames of one video this setting samples; None: no cap (fps alone)."""
        return self.num_frames if self.num_frames is not None else self.max_frames

    @property
    def name(self) -> str:
        """A short name for paths and logs: `frames256`, `fps4-max256`, `fps0.5`."""
        if self.num_frames is not None:
            return f"frames{self.num_frames}"
        return f"fps{self.fps:g}" + (f"-max{self.max_frames}" if self.max_frames is not None else "")


class ContextStep(_Params):
    """From optimizer step `from_step` on, train on rows of `seq_len` tokens."""

    from_step: NonNegativeInt
    seq_len: PositiveInt
    micro_batch_size: PositiveInt | None = None
    """Rows per micro-batch from this step on; null: the stage's `train.micro_batch_size`. Short
    lengths can take more rows, keeping the tokens per step (and their signal) up as recipes do."""
    video_frames: FrameSampling | None = None
    """A video stage's frame sampling from this step on; null: the stage's `video_frames`. Growing
    it with `seq_len` grows the frames a video shows (256 -> 512 -> 1024 -> 2048) as recipes do."""


class PackedSet(NamedTuple):
    """What a phase of a stage trains on: rows of `seq_len` tokens whose videos show the frames
    `video_frames` samples (None for a text stage). The data is packed once for each."""

    seq_len: int
    video_frames: FrameSampling | None

    def __str__(self) -> str:
        return f"{self.seq_len}-token" + (f" {self.video_frames.name}" if self.video_frames else "")


class LongDocumentUpsampling(_Params):
    """Within each corpus of a mixture, documents of at least `min_tokens` tokens are drawn `factor`
    times as readily as shorter ones (per-source length upsampling, after Fu et al. 2024, "Data
    Engineering for Scaling Language Models to 128K Context"): the corpora keep their weights,
    the long documents take a larger part of each corpus's tokens."""

    min_tokens: PositiveInt
    factor: Annotated[float, Field(gt=1)]


class StageParams(_Params):
    corpora: Annotated[list[CorpusName], Field(min_length=1)] = ["default"]
    """Corpora under `data.raw_dir`: `default`, or the name of one added with `omnilong data add`."""
    mixture: dict[CorpusName, Annotated[float, Field(gt=0)]] | None = None
    """Stage 1: each corpus's share of the tokens the stage's steps read ({code: 0.3, web: 0.7}),
    one weight for each of `corpora`, summing to 1. The packer draws training documents to fill
    that total (every phase's steps x tokens per step) in these shares, with `seed`, repeating a
    corpus only when its share asks for more tokens than it has (omnilong/data/mixture.py).
    null: every training token is packed once."""
    long_documents: LongDocumentUpsampling | None = None
    """With a mixture: favour long documents within each corpus; null: every document alike."""
    seq_len: PositiveInt = 512
    """Row length of the packed data; the longest context of the stage."""
    context_schedule: list[ContextStep] = []
    """Progressive context growth (e.g. 64K -> 128K -> 256K -> 512K); empty: `seq_len` throughout.
    `from_step` strictly increasing from 0. The data is packed once per scheduled length; the last
    entry's seq_len must equal `seq_len`. A length may come back: its rows continue in the order
    where its last phase stopped (omnilong/train/row_order.py)."""
    sp_size: PositiveInt = 1
    """Sequence-parallel group size: ranks that share one sequence."""
    video_frames: FrameSampling | None = None
    """Which frames of each video the model sees (video stages only; required there)."""
    train: TrainParams = TrainParams()
    loss: LossParams = LossParams()

    @model_validator(mode="after")
    def _seq_lens_shard_evenly(self) -> StageParams:
        # Zigzag sharding splits the sequence into 2 * sp_size equal chunks.
        if self.seq_len % (2 * self.sp_size):
            raise _FieldError(
                "seq_len",
                f"a multiple of 2 x sp_size = {2 * self.sp_size}, so zigzag sharding gives equal chunks",
                self.seq_len,
            )
        if not self.context_schedule:
            return self
        if self.context_schedule[0].from_step != 0:
            raise _FieldError("context_schedule.0.from_step", "0 (the schedule covers every step)",
                              self.context_schedule[0].from_step)
        for i, (before, entry) in enumerate(itertools.pairwise(self.context_schedule), start=1):
            if entry.from_step <= before.from_step:
                raise _FieldError(f"context_schedule.{i}.from_step",
                                  f"more than the previous entry's from_step ({before.from_step})", entry.from_step)
        for i, entry in enumerate(self.context_schedule):
            if entry.seq_len % (2 * self.sp_size):
                raise _FieldError(
                    f"context_schedule.{i}.seq_len", f"a multiple of 2 x sp_size = {2 * self.sp_size}", entry.seq_len
                )
        if self.context_schedule[-1].seq_len != self.seq_len:
            raise _FieldError(
                "context_schedule", f"a last entry with seq_len = seq_len ({self.seq_len})",
                self.context_schedule[-1].seq_len,
            )
        last_frames = self.context_schedule[-1].video_frames
        if last_frames is not None and last_frames != self.video_frames:
            # The held-out set, evaluation and the probe use the stage's own setting: the one it ends on.
            raise _FieldError(
                f"context_schedule.{len(self.context_schedule) - 1}.video_frames",
                f"the stage's video_frames ({_frames_text(self.video_frames)}) or unset: the stage ends on its own "
                f"frame setting", last_frames.model_dump(exclude_none=True),
            )
        return self

    @model_validator(mode="after")
    def _mixture_weighs_each_corpus(self) -> StageParams:
        if self.mixture is None:
            if self.long_documents is not None:
                raise _FieldError("long_documents", "unset unless mixture is set (it reweights the mixture's draw)",
                                  self.long_documents.model_dump())
            return self
        for corpus in self.mixture:
            if corpus not in self.corpora:
                raise _FieldError(f"mixture.{corpus}", f"a corpus of this stage's corpora ({', '.join(self.corpora)})",
                                  corpus)
        if missing := [corpus for corpus in self.corpora if corpus not in self.mixture]:
            raise _FieldError("mixture", f"a weight for each of this stage's corpora; missing {', '.join(missing)}",
                              self.mixture)
        # Required rather than normalised: a mistyped weight would otherwise rescale every other share silently.
        if not math.isclose(total := sum(self.mixture.values()), 1, abs_tol=1e-6):
            raise _FieldError("mixture", f"weights summing to 1 (shares of the stage's tokens), not {total:g}",
                              self.mixture)
        for i, entry in enumerate(self.context_schedule):
            if entry.from_step >= self.train.max_steps:
                raise _FieldError(
                    f"context_schedule.{i}.from_step",
                    f"below train.max_steps ({self.train.max_steps}): with a mixture each phase's steps set "
                    f"the tokens drawn for its length", entry.from_step,
                )
        return self

    def _scheduled_at(self, step: int) -> ContextStep | None:
        active = [entry for entry in self.context_schedule if entry.from_step <= step]
        return active[-1] if active else None

    def seq_len_at(self, step: int) -> int:
        """The row length trained on at optimizer step `step`."""
        entry = self._scheduled_at(step)
        return entry.seq_len if entry else self.seq_len

    def video_frames_at(self, step: int) -> FrameSampling | None:
        """The frame sampling of the videos trained on at optimizer step `step`."""
        entry = self._scheduled_at(step)
        return entry.video_frames if entry and entry.video_frames else self.video_frames

    def packed_set_at(self, step: int) -> PackedSet:
        """The packed rows optimizer step `step` reads."""
        return PackedSet(self.seq_len_at(step), self.video_frames_at(step))

    @property
    def packed_sets(self) -> list[PackedSet]:
        """Every (length, frame setting) the stage trains on, the stage's own first; each is packed once."""
        scheduled = [PackedSet(entry.seq_len, entry.video_frames or self.video_frames)
                     for entry in self.context_schedule]
        return list(dict.fromkeys([PackedSet(self.seq_len, self.video_frames), *scheduled]))

    @property
    def frame_settings(self) -> list[FrameSampling]:
        """A video stage's frame settings, its own first; its videos are prepared once for each."""
        return list(dict.fromkeys(packed.video_frames for packed in self.packed_sets if packed.video_frames))

    def micro_batch_size_at(self, step: int) -> int:
        """Rows per micro-batch at optimizer step `step`."""
        entry = self._scheduled_at(step)
        return entry.micro_batch_size if entry and entry.micro_batch_size else self.train.micro_batch_size

    @property
    def packed_lengths(self) -> list[int]:
        """Every row length the stage trains on."""
        return sorted({self.seq_len, *(entry.seq_len for entry in self.context_schedule)})

    def tokens_read(self, dp_size: int) -> dict[int, int]:
        """Tokens (padding included) the stage's steps read at each packed length: per step,
        seq_len x micro-batch x grad_accum_steps x `dp_size` data-parallel ranks."""
        read = dict.fromkeys(self.packed_lengths, 0)
        for step in range(self.train.max_steps):
            seq_len = self.seq_len_at(step)
            read[seq_len] += seq_len * self.micro_batch_size_at(step) * self.train.grad_accum_steps * dp_size
        return read


class StagesParams(_Params):
    stage1: StageParams
    stage2: StageParams
    stage3: StageParams

    def __getitem__(self, name: StageName) -> StageParams:
        return getattr(self, name)


DepthPercents = Annotated[list[Annotated[float, Field(ge=0, le=100)]], Field(min_length=1)]
"""Where a needle goes, in percent of the haystack."""


class NiahParams(_Params):
    """Text needle-in-a-haystack (omnilong/eval/niah.py)."""

    context_lengths: Annotated[list[PositiveInt], Field(min_length=1)] = [256, 512]
    """Tokens of the whole prompt as the model's chat template renders it (haystack, needle,
    question and the template's own tokens, generation prompt included)."""
    depths: DepthPercents = [0.0, 50.0, 100.0]
    needles_per_cell: PositiveInt = 1
    """Needles tried per (length, depth) cell, each with its own city and number; the cell
    scores the fraction found."""
    seed: int = 0
    """Draws the needles' cities and numbers."""
    max_new_tokens: PositiveInt = 32
    haystack_dir: str | None = None
    """A corpus directory (`text/*.jsonl` of text records) the haystack is cut from; null: the
    stage-1 corpora under `data.raw_dir`."""

    @model_validator(mode="after")
    def _distinct(self) -> NiahParams:
        for field in ("context_lengths", "depths"):
            values = getattr(self, field)
            if len(set(values)) != len(values):
                raise _FieldError(field, "distinct values (each is one row or column of the grid)", values)
        return self


class VniahParams(_Params):
    haystack: str | None = None
    """The haystack video; null: the default corpus's first long synthetic video."""
    frame_counts: Annotated[list[PositiveInt], Field(min_length=1)] = [16, 32]
    depths: DepthPercents = [0.0, 50.0, 100.0]
    max_new_tokens: PositiveInt = 8


VideommeSetting = Literal["without_subtitles", "with_subtitles"]


class VideommeParams(_Params):
    """VideoMME (omnilong/eval/videomme.py): the benchmark's multiple-choice prompt and scoring."""

    annotations: str | None = None
    """The benchmark's annotation file: its JSON (a list of videos with their questions) or the
    Hugging Face parquet (videomme/test-00000-of-00001.parquet, one row per question). null: a small
    synthetic fixture in the same layout, written beside the results."""
    video_dir: str | None = None
    """Where the videos (<videoID>.mp4, .mkv or .webm, also under data/ or video/) and subtitles
    (subtitle/<videoID>.srt, or beside the videos) are; null: the annotation file's directory."""
    frames: FrameSampling = FrameSampling(num_frames=16)
    """The frames the model sees of each video; the subtitle setting shows the subtitles on screen at them."""
    settings: Annotated[list[VideommeSetting], Field(min_length=1)] = ["without_subtitles", "with_subtitles"]
    max_new_tokens: PositiveInt = 16
    """lmms-eval's VideoMME tasks generate at most 16 tokens too."""

    @model_validator(mode="after")
    def _consistent(self) -> VideommeParams:
        if len(set(self.settings)) != len(self.settings):
            raise _FieldError("settings", "each setting at most once", self.settings)
        if self.video_dir is not None and self.annotations is None:
            raise _FieldError("video_dir", "unset unless annotations is set (the fixture has its own)", self.video_dir)
        return self


class GateParams(_Params):
    """Promotion: the `candidate` model (a label of `omnilong evaluate --model`) becomes the
    registered model's `champion` only if its `metric` is not below the current champion's."""

    metric: Annotated[str, Field(min_length=1)] = "videomme.with_subtitles.overall.official.accuracy"
    candidate: Annotated[str, Field(min_length=1)] = "stage3"


class EvalParams(_Params):
    heldout_documents: int | float = 2
    """Documents of each stage kept out of training: a count, or a fraction in (0, 1) of the
    stage's documents (rounded up). They are drawn with `seed` before packing and packed into
    their own shards at the stage's `seq_len`; held-out loss and perplexity are measured there."""
    niah: NiahParams = NiahParams()
    vniah: VniahParams = VniahParams()
    videomme: VideommeParams = VideommeParams()
    gate: GateParams = GateParams()
    sp_size: PositiveInt = 1
    """Ranks that share each prompt's prefill, sequence-parallel as in training (ring attention,
    each rank encoding its share of the frames); `omnilong generate` and `omnilong evaluate`
    then run themselves as that many torchrun processes on this node. A divisor of the world
    size (parallel.nnodes x parallel.nproc_per_node). Scores do not depend on it (up to
    floating-point rounding), so it is not part of the evaluation settings."""

    @field_validator("heldout_documents")
    @classmethod
    def _count_or_fraction(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0 < value < 1 or isinstance(value, int) and value < 1:
            raise ValueError("a count of documents (an integer >= 1) or a fraction in (0, 1)")
        return value

    def heldout_count(self, num_documents: int) -> int:
        """How many of a stage's `num_documents` are held out."""
        if isinstance(self.heldout_documents, float):
            # Less a hair: 0.1 x 30 is 3.0000000000000004 in floating point, and must give 3.
            return math.ceil(self.heldout_documents * num_documents - 1e-9)
        return self.heldout_documents


class TrackingParams(_Params):
    enabled: bool = True
    """False: training stages log to the console and save their loss curve, but start no MLflow
    run and register nothing (a machine without MLflow, a quick benchmark)."""
    uri: str | None = None
    """MLflow tracking URI; None means the SQLite store under `mlflow/` in the project."""
    experiment: Annotated[str, Field(min_length=1)] = "omnilong"


class SageMakerParams(_Params):
    """A stage as a SageMaker training job (`omnilong launch sagemaker`): the job runs the
    project's training image on `instance_count` instances of `instance_type`, one torchrun agent
    each with `parallel.nproc_per_node` ranks."""

    role_arn: str
    """The job's execution role: it reads the DVC remote and the staged code, writes `output_path`."""
    image_uri: str
    """The training image (the project's Dockerfile) in a registry SageMaker can pull from (ECR)."""
    instance_type: str
    """e.g. ml.p4d.24xlarge."""
    instance_count: PositiveInt = 1
    """Instances, one torchrun node each: equal to `parallel.nnodes`."""
    output_path: str
    """S3 prefix of the job's outputs (`<output_path>/<job>/output/model.tar.gz`) and staged code."""
    region: str
    volume_size_gb: PositiveInt = 100
    """Each instance's storage volume: the stage's pulled inputs, checkpoints and exported model."""
    max_runtime_s: PositiveInt = 86_400
    """SageMaker stops the job after this long."""
    dvc_remote: Annotated[str, Field(min_length=1)] | None = None
    """The DVC remote (S3) the job pulls the stage's inputs from; null: the project's default remote."""
    mlflow_credentials_secret: Annotated[str, Field(min_length=1)] | None = None
    """Name or ARN of a Secrets Manager secret, a JSON object with `username` and `password`, that
    the job reads with its role for an MLflow server with basic auth, so that no password is in
    the job's request (which DescribeTrainingJob shows to anyone allowed to call it)."""
    poll_s: Annotated[float, Field(gt=0)] = 30
    """Seconds between status checks of `--wait`."""

    @field_validator("role_arn", "image_uri", "instance_type", "output_path", "region")
    @classmethod
    def _shaped(cls, value: str, info: ValidationInfo) -> str:
        pattern, expected = _SAGEMAKER_FIELD_SHAPES[info.field_name]
        if not re.fullmatch(pattern, value):
            raise ValueError(f"expected {expected}")
        return value


# What SageMaker accepts in each field, checked here rather than when CreateTrainingJob refuses it.
_SAGEMAKER_FIELD_SHAPES = {
    "role_arn": (r"arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]+",
                 "an IAM role ARN (arn:aws:iam::<account>:role/<name>)"),
    "image_uri": (r"[a-z0-9.-]+(:[0-9]+)?/[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})",
                  "an image URI with a tag or digest (<account>.dkr.ecr.<region>.amazonaws.com/<name>:<tag>)"),
    "instance_type": (r"ml\.[a-z0-9-]+\.[a-z0-9]+", "a SageMaker instance type such as ml.p4d.24xlarge"),
    "output_path": (r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?", "an S3 URI (s3://<bucket>/<prefix>)"),
    "region": (r"[a-z]{2}(-[a-z]+)+-[0-9]+", "an AWS region such as us-east-1"),
}


class Params(_Params):
    seed: int = 1234
    model: ModelParams
    data: DataParams = DataParams()
    parallel: ParallelParams = ParallelParams()
    stages: StagesParams
    eval: EvalParams = EvalParams()
    tracking: TrackingParams = TrackingParams()
    sagemaker: SageMakerParams | None = None
    """Where `omnilong launch sagemaker` runs a stage; null: not set up."""

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        world = self.parallel.world_size
        if self.sagemaker and self.sagemaker.instance_count != self.parallel.nnodes:
            raise _FieldError(
                "sagemaker.instance_count", f"parallel.nnodes ({self.parallel.nnodes}): one torchrun node per instance",
                self.sagemaker.instance_count,
            )
        for name in STAGE_NAMES:
            stage = self.stages[name]
            if world % stage.sp_size:
                raise _FieldError(
                    f"stages.{name}.sp_size",
                    f"a divisor of the world size {world} "
                    f"(parallel.nnodes x parallel.nproc_per_node)",
                    stage.sp_size,
                )
            if STAGE_KIND[name] == "video" and stage.video_frames is None:
                raise _FieldError(
                    f"stages.{name}.video_frames",
                    "a frame sampling for a video stage ({num_frames: N} or {fps: F, max_frames: N})",
                    None,
                )
            if STAGE_KIND[name] != "text" and stage.mixture is not None:
                raise _FieldError(f"stages.{name}.mixture", "unset: a mixture draws the text documents of stage 1",
                                  stage.mixture)
            if STAGE_KIND[name] != "video":
                frame_fields = [("video_frames", stage.video_frames)] + [
                    (f"context_schedule.{i}.video_frames", entry.video_frames)
                    for i, entry in enumerate(stage.context_schedule)
                ]
                for field, sampling in frame_fields:
                    if sampling is not None:
                        raise _FieldError(f"stages.{name}.{field}", "unset: this stage trains on text",
                                          sampling.model_dump(exclude_none=True))
        if world % self.eval.sp_size:
            raise _FieldError(
                "eval.sp_size",
                f"a divisor of the world size {world} (parallel.nnodes x parallel.nproc_per_node)",
                self.eval.sp_size,
            )
        return self


def _frames_text(sampling: FrameSampling | None) -> str:
    return "unset" if sampling is None else ", ".join(f"{key}: {value}" for key, value in
                                                       sampling.model_dump(exclude_none=True).items())


class _FieldError(ValueError):
    """A cross-field check's failure, naming the field (relative to the model that checks)."""

    def __init__(self, field: str, expected: str, given: Any):
        self.field, self.expected, self.given = field, expected, given
        super().__init__(f"{field}: expected {expected}, given {given!r}")


def _format_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    field_error = (err.get("ctx") or {}).get("error")
    if isinstance(field_error, _FieldError):
        key = f"{loc}.{field_error.field}" if loc else field_error.field
        return f"{key}: expected {field_error.expected}, given {field_error.given!r}"
    loc = loc or "<top level>"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key (given {err['input']!r}); see `omnilong config schema` for the valid keys"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    return f"{loc}: {err['msg'].removeprefix('Value error, ')} (given {err['input']!r})"


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-loaded mapping; raises ConfigError naming every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, given {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_format_error(err) for err in exc.errors()]
        raise ConfigError(f"{source}: {len(lines)} invalid parameter(s)\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = "params.yaml", *, check_paths: bool = False) -> Params:
    """Read and validate a params file. With `check_paths`, local paths must exist too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    params = parse_params(raw, source=str(path))
    if check_paths:
        check_local_paths(params, base=path.parent)
    return params


def check_local_paths(params: Params, base: Path = Path(".")) -> None:
    """Paths that only exist on the machine that trains: checked when the work needs them."""
    model_dir = base / params.model.path
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"model.path: expected a local model directory with config.json, given "
            f"{params.model.path!r} ({'no config.json there' if model_dir.is_dir() else 'no such directory'}); "
            f"build the tiny one with `dvc repro model_tiny` or point it at downloaded weights"
        )
    raw_dir = base / params.data.raw_dir
    for name in STAGE_NAMES:
        for corpus in params.stages[name].corpora:
            corpus_dir = corpus_path(raw_dir, corpus)
            if not corpus_dir.is_dir():
                raise ConfigError(
                    f"stages.{name}.corpora: corpus {corpus!r} expected at {corpus_dir}, which does not exist"
                )


def corpus_path(raw_dir: Path, corpus: str) -> Path:
    """`default` is the synthesised corpus; any other name is a user corpus."""
    return raw_dir / "default" if corpus == "default" else raw_dir / "user" / corpus


def params_schema() -> dict[str, Any]:
    return Params.model_json_schema()
