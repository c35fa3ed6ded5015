"""A byte-level BPE tokenizer trained offline, shaped like the family's real one (Qwen2's pipeline)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from omnilong.models.families import FamilySpec

_BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()


def train_tokenizer(
    texts: Iterable[str], family: FamilySpec, vocab_size: int
) -> PreTrainedTokenizerFast:
    """Train a BPE of `vocab_size` tokens in total (the family's special tokens included).

    Both families use Qwen2's tokenizer: NFC, Qwen2's pre-tokenisation regex, byte-level BPE
    with no prefix space and no BOS. Special tokens come after the learned vocabulary, as in
    the real tokenizers. The same texts give a byte-identical tokenizer.json.
    """
    learned_size = vocab_size - len(family.special_tokens)
    if learned_size <= len(_BYTE_ALPHABET):
        raise ValueError(
            f"vocab_size ({vocab_size}) must exceed the {len(_BYTE_ALPHABET)} byte tokens plus the "
            f"{len(family.special_tokens)} special tokens of {family.name}"
        )
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=learned_size,
        initial_alphabet=_BYTE_ALPHABET,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in family.special_tokens]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=family.eos_token,
        pad_token=family.pad_token,
        chat_template=family.chat_template,
    )
