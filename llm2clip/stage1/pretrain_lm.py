"""Pretrain a tiny causal LM on the shapes-world corpus, so it knows the world's language before
stage 1 (the embedded default's stand-in for Llama's pretraining). Real runs skip this step.

`packing: blocks` is GPT-style: the corpus is tokenised once, joined with EOS, and cut into `seq_len`
blocks, so a block starts mid-text and attends across texts. `packing: documents` trains each text on
its own from position 0 (as Llama 3 masks attention between documents), in length-bucketed padded
batches of at most `batch_size * seq_len` tokens: the way the embedder later reads a caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..embedder import resolve_device
from ..errors import ConfigError
from ..files import atomic_dir
from ..precision import bf16_autocast
from ..tiny import LLM_FAMILIES, tiny_llm_config
from .common import TrainState, make_optimizer, seed_everything


@dataclass
class PretrainLMConfig:
    enabled: bool = False  # tiny world only: real LLMs arrive pretrained
    family: str = "llama"  # llama | mistral | qwen2 | qwen3 | gemma | gemma2 | gemma3
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    seq_len: int = 128  # blocks: block length; documents: longest text (longer ones are cut)
    packing: str = "blocks"  # blocks | documents
    batch_size: int = 32
    steps: int = 400
    # blocks only: the last `long_context_steps` of `steps` train on blocks of `long_context_len` (the same
    # tokens a step), as real LLMs extend their context at the end of pretraining, so no position the
    # embedder reads is untrained
    long_context_steps: int = 0
    long_context_len: int = 512
    lr: float = 3e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    attn_implementation: str = "sdpa"  # sdpa | eager (eager is faster on CPU at short lengths)
    precision: str = "bf16"  # bf16: autocast where it pays (llm2clip.precision) | fp32
    corpus: str = "${run.out_dir}/data/corpus.txt"
    tokenizer: str = "${run.out_dir}/data/tokenizer"
    out: str = "${run.out_dir}/stage1/lm"

    def validate(self) -> None:
        if self.family not in LLM_FAMILIES:
            raise ConfigError(f"stage1.pretrain.family: '{self.family}' is not one of {sorted(LLM_FAMILIES)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("stage1.pretrain.hidden_size must be divisible by stage1.pretrain.num_heads")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ConfigError("stage1.pretrain.attn_implementation must be sdpa or eager")
        if self.packing not in ("blocks", "documents"):
            raise ConfigError(f"stage1.pretrain.packing: '{self.packing}' must be blocks or documents")
        if not 0 <= self.long_context_steps <= self.steps:
            raise ConfigError("stage1.pretrain.long_context_steps must be in [0, stage1.pretrain.steps]")
        if self.long_context_steps and self.packing != "blocks":
            raise ConfigError("stage1.pretrain.long_context_steps needs packing: blocks (documents already "
                              "train every text whole); set it to 0")
        if self.long_context_steps and self.long_context_len <= self.seq_len:
            raise ConfigError("stage1.pretrain.long_context_len must be longer than stage1.pretrain.seq_len")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"stage1.pretrain.precision: '{self.precision}' must be bf16 or fp32")


def tokenize_corpus(lines: list[str], tokenizer) -> list[list[int]]:
    """Each line's ids, starting with BOS and ending with EOS (once, for every packing)."""
    return [[tokenizer.bos_token_id, *row, tokenizer.eos_token_id]
            for row in tokenizer(lines, add_special_tokens=False)["input_ids"]]


def pack_corpus(docs: list[list[int]], seq_len: int) -> torch.Tensor:
    """[n_blocks, seq_len] token blocks of the texts joined end to end (the remainder is dropped)."""
    ids = [i for doc in docs for i in doc]
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise ConfigError(f"the corpus has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n_blocks * seq_len]).view(n_blocks, seq_len)


def block_batches(blocks: torch.Tensor, batch_size: int, generator: torch.Generator):
    """(endless [batch_size, seq_len] batches of packed blocks, reshuffled every epoch; block count)."""
    def batches():
        while True:
            order = torch.randperm(len(blocks), generator=generator)
            for start in range(0, len(blocks) - batch_size + 1, batch_size):
                batch = blocks[order[start:start + batch_size]]
                yield batch, batch, None  # no mask: the blocks have no padding
    return batches(), len(blocks)


def document_batches(docs: list[list[int]], tokens_per_batch: int, pad_id: int,
                     generator: torch.Generator):
    """Endless padded batches ([n, longest] ids, with -100 labels on padding), one epoch at a time.

    Each epoch shuffles the texts, sorts windows of 64 batches' worth by length (so little of a batch is
    padding) and shuffles the batches again.
    """
    mean_len = sum(map(len, docs)) / len(docs)
    window = max(1, int(64 * tokens_per_batch / mean_len))
    while True:
        order = torch.randperm(len(docs), generator=generator).tolist()
        batches: list[list[int]] = []
        for lo in range(0, len(order), window):
            batch: list[int] = []
            for i in sorted(order[lo:lo + window], key=lambda i: len(docs[i])):
                if batch and (len(batch) + 1) * len(docs[i]) > tokens_per_batch:
                    batches.append(batch)
                    batch = []
                batch.append(i)
            batches.append(batch)
        for b in torch.randperm(len(batches), generator=generator).tolist():
            longest = max(len(docs[i]) for i in batches[b])
            ids = torch.full((len(batches[b]), longest), pad_id)
            labels = torch.full((len(batches[b]), longest), -100)
            for row, i in enumerate(batches[b]):
                ids[row, :len(docs[i])] = labels[row, :len(docs[i])] = torch.tensor(docs[i])
            yield ids, labels, (labels != -100).long()


def pretrain_lm(cfg: PretrainLMConfig, seed: int = 0, progress: bool = True) -> dict:
    """Train from scratch; writes an HF causal-LM folder (weights + tokenizer) to cfg.out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    for path in (cfg.corpus, cfg.tokenizer):
        if not Path(path).exists():
            raise ConfigError(f"'{path}' does not exist; generate the shapes world first (llm2clip data synth)")
    seed_everything(seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    lines = Path(cfg.corpus).read_text(encoding="utf-8").splitlines()
    hf_config = tiny_llm_config(cfg.family, vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                                num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                intermediate_size=cfg.intermediate_size,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    device = resolve_device("auto")
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=cfg.attn_implementation).to(device)
    optimizer, scheduler = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.steps)
    generator = torch.Generator().manual_seed(seed)
    docs = tokenize_corpus(lines, tokenizer)
    long_batches = None
    if cfg.packing == "blocks":
        batches, units = block_batches(pack_corpus(docs, cfg.seq_len), cfg.batch_size, generator)
        if cfg.long_context_steps:
            long_batch = max(1, cfg.batch_size * cfg.seq_len // cfg.long_context_len)
            long_batches, _ = block_batches(pack_corpus(docs, cfg.long_context_len), long_batch, generator)
    else:
        docs = [doc[:cfg.seq_len] for doc in docs]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batches, units = document_batches(docs, cfg.batch_size * cfg.seq_len, pad_id, generator), len(docs)
    state = TrainState()
    tokens = 0
    model.train()
    for step in tqdm(range(cfg.steps), desc="pretrain-lm", disable=not progress):
        if step == cfg.steps - cfg.long_context_steps and long_batches is not None:
            batches = long_batches
        ids, labels, mask = (None if t is None else t.to(device) for t in next(batches))
        tokens += ids.numel() if mask is None else int(mask.sum())
        with bf16_autocast(device, enabled=cfg.precision == "bf16"):
            # HF shifts labels for causal LM; -100 marks padding
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.log(loss.item())
    with atomic_dir(cfg.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    first, last = state.mean_first(20), state.mean_last(20)
    return {"loss_first": first, "loss_last": last, "perplexity_last": math.exp(last),
            "tokens_seen": tokens, "packing": cfg.packing, "units": units,
            "parameters": sum(p.numel() for p in model.parameters())}
