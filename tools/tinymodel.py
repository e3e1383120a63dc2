"""Offline test models: a random-weight Llama with a locally trained byte-level BPE tokenizer.

`write_tiny_model(out_dir, ...)` writes an HF-format directory (config.json, model.safetensors in
float32, tokenizer.json + tokenizer_config.json with a role-tagged chat template) that vLLM loads with
`dtype=float32`. Nothing is downloaded: the tokenizer is trained on a corpus generated here.

Determinism: the corpus does not depend on the seed (every tiny model shares one tokenizer, so a prompt
has the same token count on each); the weights come from `torch.manual_seed(seed)`. The same arguments
give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLES = ("system", "user", "assistant", "tool")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)

# Role-tagged template: `<s><|user|>\nhello</s>\n<|assistant|>\n`. Role tags are special tokens so a
# test can count them in the prompt the engine saw.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their been has when who will more no if out so "
    "said what up its about than into them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since against go "
    "came right used take three model token batch request engine prompt output latency schedule "
    "stage device memory cache kernel tensor parallel sample simulate profile plan queue finish"
).split()


def _corpus(n_lines: int = 6000) -> list[str]:
    """Deterministic training text: English-like sentences, pseudo-words, numbers and code."""
    rng = random.Random(1234)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "qu", "ph", "str", "ng", "ae", "ou"]
    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
        elif kind == 1:
            words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4)))
                     for _ in range(rng.randint(4, 12))]
            lines.append(" ".join(words))
        elif kind == 2:
            lines.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 6)))
                                  for _ in range(rng.randint(3, 9))))
        else:
            name = rng.choice(_WORDS) + "_" + rng.choice(_WORDS)
            lines.append(f"def {name}(x, y={rng.randint(0, 99)}):\n    return x * y + "
                         f"{rng.randint(0, 999)}  # {rng.choice(_WORDS)}")
    return lines


def build_tokenizer(vocab: int = 2048):
    """A byte-level BPE `PreTrainedTokenizerFast` of exactly `vocab` tokens with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=1,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab:
        # The model's embedding has `vocab` rows; a smaller tokenizer would let the engine sample ids
        # it cannot detokenize.
        raise ValueError(f"tokenizer reached {tok.get_vocab_size()} tokens, wanted {vocab}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_model(out_dir: str | Path, layers: int = 2, hidden: int = 128, heads: int = 2,
                     kv_heads: int = 1, intermediate: int | None = None, vocab: int = 2048,
                     max_position: int = 4096, seed: int = 0) -> Path:
    """Write the model to `out_dir` (created) and return its path. Deterministic for the arguments."""
    if hidden % heads or hidden // heads < 32:
        raise ValueError("hidden/heads must be an integer >= 32 (vLLM CPU attention head size)")
    if heads % kv_heads:
        raise ValueError("kv_heads must divide heads")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _normalize_tokenizer_config(out)
    return out


def _normalize_tokenizer_config(out: Path) -> None:
    """Keep the chat template inside tokenizer_config.json too (older loaders read it only there)."""
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def tiny_model_main(args: argparse.Namespace) -> int:
    """`samullm tiny-model OUT_DIR [...]` (the parser lives in cli/main.py)."""
    path = write_tiny_model(
        args.out_dir, layers=args.layers, hidden=args.hidden, heads=args.heads,
        kv_heads=args.kv_heads, intermediate=getattr(args, "intermediate", None),
        vocab=getattr(args, "vocab", 2048), max_position=getattr(args, "max_position", 4096),
        seed=args.seed,
    )
    print(path)
    return 0
