"""Teachers: load a GPT-2 from a directory or the local Hugging Face cache, or train a small one.

No GPT-2 weights can be assumed downloadable (offline machines, CI), so loading never touches the
network (``local_files_only=True``) and fails with a message that points at ``--teacher DIR`` and
``memstore teacher train``, which builds a GPT-2-architecture teacher from local text.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memstore.errors import bad_parameter
from memstore_gpt2.errors import TeacherNotFoundError
from memstore_gpt2.lm_training import (
    autocast,
    batch_for_step,
    check_precision,
    lm_logits,
    next_token_ce,
    perplexity,
    warmup_cosine,
)

EOS = "<|endoftext|>"


def load_teacher(name_or_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """(model, tokenizer) from a local directory or a hub name already in the local HF cache.

    ``cache_dir`` overrides the Hugging Face cache location (default: HF_HUB_CACHE / ~/.cache).
    The model is returned in eval mode. Raises TeacherNotFoundError (never blocks on the network).
    """
    from transformers import AutoTokenizer, GPT2LMHeadModel

    source = str(name_or_dir)
    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        raise TeacherNotFoundError(f"--teacher {source!r} is a file; give a model directory")
    where = str(path) if path.is_dir() else source
    try:
        model = GPT2LMHeadModel.from_pretrained(where, local_files_only=True, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise TeacherNotFoundError(
            f"teacher {source!r} is neither a model directory nor in the local Hugging Face cache "
            f"(no download is attempted): pass --teacher DIR, e.g. one made by "
            f"'memstore teacher train --data PATH --out DIR' ({type(exc).__name__})"
        ) from None
    if tokenizer.eos_token_id is None and EOS in tokenizer.get_vocab():
        tokenizer.eos_token = EOS
    model.eval()
    return model, tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2's scheme) trained on ``texts``, wrapped as a transformers tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise bad_parameter("vocab", f"must be at least 257 (256 bytes + EOS), got {vocab_size}")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS
    )


@dataclass
class TeacherSpec:
    """Architecture and training budget of a locally trained teacher (the evaluation protocol in docs/design.md uses 4/256/4/128)."""

    layers: int = 4
    width: int = 256
    heads: int = 4
    context: int = 128
    inner: int | None = None  # MLP hidden size; None -> 4 * width like GPT-2
    vocab: int = 4096
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    dropout: float = 0.1
    seed: int = 0
    precision: str = "fp32"  # "bf16": forwards under torch.autocast

    def validate(self) -> None:
        for name in ("layers", "width", "heads", "context", "vocab", "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise bad_parameter(name, f"must be positive, got {getattr(self, name)}")
        check_precision(self.precision)
        if self.width % self.heads:
            raise bad_parameter("width", f"{self.width} must be divisible by heads ({self.heads})")


def build_teacher_model(spec: TeacherSpec, tokenizer):
    """A freshly initialised GPT2LMHeadModel sized by ``spec``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.context,
        n_embd=spec.width,
        n_layer=spec.layers,
        n_head=spec.heads,
        n_inner=spec.inner,
        resid_pdrop=spec.dropout,
        embd_pdrop=spec.dropout,
        attn_pdrop=spec.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(spec.seed)
    return GPT2LMHeadModel(config)


def train_teacher(
    texts: list[str],
    out_dir: str | os.PathLike,
    spec: TeacherSpec,
    eval_texts: list[str] | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> dict:
    """Train tokenizer + GPT-2 teacher on ``texts`` and save both to ``out_dir`` (HF layout).

    Returns a summary (``teacher_ppl`` on ``eval_texts`` or a held-out 10 % slice, ``steps``,
    seconds, parameter count), also written to ``out_dir/teacher_train.json``.
    """
    from memstore_gpt2.interrupts import progress_bar
    from memstore_gpt2.text_data import holdout_split, pack_blocks, tokenize_texts

    spec.validate()
    started = time.perf_counter()
    tokenizer = train_tokenizer(texts, spec.vocab)
    blocks = pack_blocks(tokenize_texts(tokenizer, texts), spec.context)
    if eval_texts:
        train_blocks = blocks
        eval_blocks = pack_blocks(tokenize_texts(tokenizer, eval_texts), spec.context)
    else:
        train_blocks, eval_blocks = holdout_split(blocks)
    model = build_teacher_model(spec, tokenizer)
    device = torch.device(device)
    model.to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, spec.steps, spec.warmup)
    )
    bar = progress_bar(total=spec.steps, desc="teacher", disable=not progress)
    loss_value = float("nan")
    for step in range(spec.steps):
        ids = batch_for_step(train_blocks, step, spec.batch_size, spec.seed).to(device)
        with autocast(device, spec.precision):
            logits = lm_logits(model, ids)
        loss = next_token_ce(logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.3f}")
        bar.update(1)
    bar.close()
    model.eval()
    with autocast(device, spec.precision):
        ppl = perplexity(model, eval_blocks)
    model.cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    summary = {
        "teacher_ppl": ppl,
        "final_train_loss": loss_value,
        "steps": spec.steps,
        "seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": int(np.prod(train_blocks.shape)),
        "eval_tokens": int(np.prod(eval_blocks.shape)),
        "spec": asdict(spec),
        "out": str(out),
    }
    (out / "teacher_train.json").write_text(json.dumps(summary, indent=2))
    return summary
