"""Tiny random-initialised models of every supported family, and tiny story files, for tests.

The tokenizer is a byte-level BPE trained on a few bilingual sentences; it adds a BOS token so
that special tokens are present (they must never become rows).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "gpt_neox")
VALUES = ("prosperity", "integrity", "friendliness")

_EN = [
    "A neighbour asks Li Na to help carry groceries up six floors.",
    "The shop owner found an extra banknote in the till at closing time.",
    "Tom could copy his classmate's homework before the bell rings.",
    "A delivery rider sees a wallet lying on the wet pavement.",
    "The village committee must decide where to build the new well.",
    "Grandma Zhao wants to learn how to pay online with her phone.",
]
_ZH = [
    "邻居请李娜帮忙把菜搬上六楼。",
    "店主在打烊时发现收银台里多了一张钞票。",
    "汤姆可以在上课铃响前抄同学的作业。",
    "外卖骑手看到湿漉漉的人行道上有一个钱包。",
    "村委会要决定新水井建在哪里。",
    "赵奶奶想学会用手机在网上付款。",
]


def make_stories(path: str | Path, per_value: int = 2, split: str = "activation", seed: int = 0) -> list[dict[str, Any]]:
    """Write a small story file in the schema (zh/en parallel ids), with varied lengths."""
    rows = []
    for vi, value in enumerate(VALUES):
        for k in range(per_value):
            j = (vi * per_value + k + seed) % len(_EN)
            extra_en = " It is late and raining." * (k % 3)
            extra_zh = "天色已晚，还下着雨。" * (k % 3)
            for lang, story, al, vio, rat in (
                ("en", _EN[j] + extra_en, "She helps at once.", "She pretends not to notice.", f"This shows {value}."),
                ("zh", _ZH[j] + extra_zh, "她马上帮忙。", "她假装没看见。", f"这体现了{value}。"),
            ):
                row = {"id": f"{value}-{split[0]}{k:02d}-{lang}", "value": value, "lang": lang, "split": split,
                       "story": story, "aligned": al, "violating": vio}
                if split == "activation":
                    row["rationale"] = rat
                rows.append(row)
    Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


def make_tokenizer(out: str | Path, *, extra_corpus: tuple[str, ...] = (), add_bos: bool = True) -> Any:
    """A byte-level BPE tokenizer trained on the test sentences (+ ``extra_corpus``), saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_EN + _ZH + ["A B", "Option A: B:", *extra_corpus], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def make_config(family: str, vocab: int = 64, layers: int = 2, inter: int = 48) -> Any:
    """A tiny config of one supported architecture (hidden 32, 4 heads)."""
    from transformers import AutoConfig

    ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "vocab_size": vocab}
    attn = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    if family in ("llama", "mistral", "qwen2", "qwen3"):
        extra = {"head_dim": 8} if family == "qwen3" else {}
        return AutoConfig.for_model(family, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                                    **attn, **ids, **extra)
    if family in ("gemma", "gemma2", "gemma3_text"):
        extra = {} if family == "gemma" else {"sliding_window": 4, "final_logit_softcapping": 30.0}
        return AutoConfig.for_model(family, hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                                    head_dim=8, **attn, **ids, **extra)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_inner=inter, n_layer=layers, n_head=4, n_positions=256, **ids)
    if family == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=32, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5, **ids)
    raise ValueError(family)


def make_model(
    out: str | Path, family: str = "llama", layers: int = 2, inter: int = 48, seed: int = 0, *, add_bos: bool = True,
    extra_corpus: tuple[str, ...] = (), init_std: float | None = 0.2,
) -> Path:
    """Save a tiny random model of ``family`` (with its tokenizer) to ``out``; returns ``out``.

    ``init_std`` redraws every weight matrix with that spread, so activations are not all tiny
    (``None`` keeps the library's initialisation).
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    tok = make_tokenizer(out, extra_corpus=extra_corpus, add_bos=add_bos)
    cfg = make_config(family, len(tok), layers, inter)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, init_std)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def act_modules(model: Any) -> list[Any]:
    """Our own walk to the activation-function module of each layer (independent of vstore)."""
    return [m for name, m in model.named_modules() if name.endswith(("mlp.act_fn", "mlp.act"))]


def oracle_acts(model_dir: str | Path, texts: list[str]) -> list[tuple[Any, Any]]:
    """Per text, unpadded and alone: (token ids, array (layers, tokens, neurons)) by our own hooks."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    for t in texts:
        got: list[Any] = []
        hs = [m.register_forward_hook(lambda m, i, o, got=got: got.append(o[0].detach().numpy().copy())) for m in act_modules(model)]
        try:
            ids = tok(t, return_tensors="pt")
            with torch.no_grad():
                model(**ids)
        finally:
            for h in hs:
                h.remove()
        out.append((ids["input_ids"][0].numpy(), np.stack(got)))
    return out
