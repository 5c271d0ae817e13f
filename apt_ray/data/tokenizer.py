"""A word-level tokenizer built from a corpus with `tokenizers`, saved in transformers format."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _empty_pipeline() -> Tokenizer:
    """A tokenizer with the normaliser and pre-tokenizer set and an empty vocabulary."""
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation
    return tok


def count_words(texts: Iterable[str]) -> Counter[str]:
    """Word counts after lower-casing and splitting on whitespace and punctuation."""
    pipeline = _empty_pipeline()
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = pipeline.normalizer.normalize_str(text)
        counts.update(piece for piece, _ in pipeline.pre_tokenizer.pre_tokenize_str(normalized))
    return counts


def build_wordlevel_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None = None,
    *,
    min_frequency: int = 1,
    model_max_length: int = 512,
) -> PreTrainedTokenizerFast:
    """Build a WordLevel tokenizer over `texts` and, if `out_dir` is given, `save_pretrained` it there.

    Ids: the special tokens [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then words by falling
    frequency (ties alphabetical), so the same corpus always gives the same ids. Encoding adds
    [CLS] ... [SEP] (and [SEP] between a pair). The result loads with
    `transformers.AutoTokenizer.from_pretrained(out_dir)`.
    """
    counts = count_words(texts)
    words = sorted((w for w, n in counts.items() if n >= min_frequency and w not in SPECIAL_TOKENS),
                   key=lambda w: (-counts[w], w))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *words])}
    tok = _empty_pipeline()
    tok.model = models.WordLevel(vocab=vocab, unk_token="[UNK]")
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast
