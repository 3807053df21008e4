"""A tiny base model for tests: a randomly initialized 2-layer Llama (hidden 64) with a
small byte-level BPE tokenizer and a ChatML template, built offline in well under a second."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from adapters.synthetic import HELD_OUT_PROMPTS, qa_pairs, style_answer

__all__ = ["CHATML_TEMPLATE", "export_tiny_student", "make_tiny_base", "publish_student"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML without a default system prompt (the tiny base's template)."""

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_SPECIAL_ROLES = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
}


def make_tiny_base(
    path: Path, *, seed: int = 0, hidden_size: int = 64, layers: int = 2, context: int = 512
) -> Path:
    """Write a tiny random Llama (config, safetensors, tokenizer, chat template) to ``path``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [f"{q} {style_answer(a, 'pirate')}" for q, a in qa_pairs(random.Random(seed), 64)]
    corpus += ["user assistant system", *HELD_OUT_PROMPTS]
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer_cls: Any = PreTrainedTokenizerFast
    fast = tokenizer_cls(tokenizer_object=tok, **_SPECIAL_ROLES)
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(path))
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model_cls: Any = LlamaForCausalLM
    model_cls(config).save_pretrained(str(path), safe_serialization=True)
    return path


def publish_student(home: Path, onnx_dir: Path, name: str = "fake-student") -> None:
    """Publish an exported student (``tiny_onnx``) for the fake engine's ``fake-model``
    into ``home``'s student registry."""
    from gateway.students import StudentRegistry

    StudentRegistry(home / "students").publish(
        name, onnx_dir, teacher_model="fake-model", precision="fp32", report={"agreement": 1.0}
    )


def export_tiny_student(out: Path, *, seed: int = 3) -> Path:
    """Build and export a tiny student (fp32 ONNX, context 2048) into ``out/onnx``; returns it."""
    from distill.export import build_onnx

    out = Path(out)
    base = make_tiny_base(out / "tiny-student", seed=seed, hidden_size=64, context=2048)
    return build_onnx(base, out / "onnx", "fp32")


if __name__ == "__main__":  # python -m tests.tiny OUT: a tiny exported student (benchmarks)
    import sys

    print(export_tiny_student(Path(sys.argv[1])))
