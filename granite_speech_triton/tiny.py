"""Tiny random-weight checkpoints in the real Hugging Face layouts, for tests and smoke runs.

Their output is meaningless text: they exist so that loading, batching and exactness can be
checked without the multi-gigabyte real checkpoints.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|end_of_text|>"
PAD = "<|pad|>"
AUDIO = "<|audio|>"
# Renders `USER: <|audio|>{instruction}\n ASSISTANT:`, the 4.1-2b prompt format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %} ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
CORPUS = [
    "can you transcribe the speech into a written format?",
    "transcribe the speech with proper punctuation and capitalization.",
    "transcribe the speech to text. Keywords: Granite, Triton, Conformer",
    "translate the speech to English. French German Spanish Portuguese Japanese Italian Chinese",
    "the quick brown fox jumps over the lazy dog while the band plays on",
    "le renard brun saute par dessus le chien paresseux",
    "der schnelle braune Fuchs springt über den faulen Hund",
    "el rápido zorro marrón salta sobre el perro perezoso",
    "USER: ASSISTANT: hello world, speech recognition and translation on a server.",
]


def make_tokenizer(out: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Granite's special tokens and chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[PAD, EOS, AUDIO],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None, padding_side="left"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def encoder_config(hidden: int = 32, layers: int = 4) -> dict:
    return dict(
        input_dim=160, num_layers=layers, hidden_dim=hidden, feedforward_mult=4, num_heads=4,
        dim_head=hidden // 4, output_dim=12, context_size=200, max_pos_emb=512,
        conv_kernel_size=15, conv_expansion_factor=2,
    )  # fmt: skip


def text_config(tokenizer: PreTrainedTokenizerFast, vocab_size: int, hidden: int = 64, tied: bool = False) -> dict:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    return dict(
        model_type="granite", hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=2 * hidden, vocab_size=vocab_size,
        max_position_embeddings=4096, embedding_multiplier=12.0, attention_multiplier=0.25,
        residual_multiplier=1.0, logits_scaling=1.0, bos_token_id=eos, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied, initializer_range=0.1,
    )  # fmt: skip


def make_tiny_ar_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """A tiny GraniteSpeechForConditionalGeneration saved with transformers' save_pretrained."""
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out)
    vocab = len(tokenizer)
    config = GraniteSpeechConfig(
        text_config=text_config(tokenizer, vocab),
        encoder_config=encoder_config(),
        projector_config=dict(
            model_type="blip_2_qformer",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=32,
            cross_attention_frequency=1,
        ),  # fmt: skip
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO),
        has_lora_adapter=False,
        downsample_rate=5,
        window_size=15,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config).eval()
    _randomise_batch_norms(model)
    model.save_pretrained(out)
    return out


def _randomise_batch_norms(model: torch.nn.Module) -> None:
    """Give BatchNorm running statistics non-trivial values so that loading them is tested."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
