"""A real byte-level BPE tokenizer trained on the shapes-world corpus with HF `tokenizers`.

Saved with `save_pretrained`, so tiny models load it through `AutoTokenizer.from_pretrained` exactly
as they would a Llama-3 tokenizer (byte-level BPE, no prefix space, BOS prepended, no mask token).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CJK_CHAR = r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"  # ideographs and CJK punctuation


def train_tokenizer(lines: Iterable[str], out_dir: str | Path, vocab_size: int = 2048, model_max_length: int = 512):
    """Train, save to `out_dir` and return a `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # CJK characters are isolated before byte-level splitting, so merges stay inside a character and
    # Chinese stays compositional (one token per character) instead of whole memorised phrases.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHAR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no <unk> at run time
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )
    fast.save_pretrained(str(out_dir))
    return fast
