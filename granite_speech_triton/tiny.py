"""Tiny random-weight checkpoints in the real Hugging Face layouts, for tests and smoke runs.

Their output is meaningless text: they exist so that loading, batching and exactness can be
checked without the multi-gigabyte real checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
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

# Added to the tiny BPE draft head's blank logit. Random rows almost never let the blank win; with
# this bias the test tones get drafts of varying lengths with blanks between repeated tokens.
BLANK_BIAS = 2.3


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


def make_tiny_nar_checkpoint(out: str | Path, seed: int = 0, old_layout: bool = False) -> Path:
    """A tiny granite-speech-nar checkpoint in the hub layout of MODEL_SPEC.md section 4.

    `old_layout=True` writes the same weights in the older layout (revision 7d20732d): `llm_config`
    instead of `text_config` and a BPE head with one more row (label 0 = blank, label i = token i - 1).
    The blank is the tokenizer's end-of-text token, as in the real checkpoint.
    """
    from .model.nar import NARModel, NARModelConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out)
    vocab = len(tokenizer)
    blank = tokenizer.convert_tokens_to_ids(EOS)
    encoder = dict(encoder_config(), self_conditioning_layer=2, bpe_output_dim=vocab, bpe_pooling_window=4)
    config = dict(
        architectures=["GraniteSpeechNarForASR"],
        model_type="granite_speech_nar",
        encoder_config=encoder,
        projector_config=dict(
            encoder_dim=encoder["hidden_dim"],
            num_encoder_layers=4,
            hidden_size=64,
            llm_dim=64,
            num_heads=4,
            num_layers=2,
            mlp_ratio=2,
            block_size=15,
            downsample_rate=5,
            layernorm_eps=1e-6,
            attn_bias=True,
            mlp_bias=True,
            dropout_prob=0.1,
        ),
        # Layers outweigh the (x12) input embeddings, so that the head edits the draft, not copies it.
        text_config=dict(text_config(tokenizer, vocab, tied=True), residual_multiplier=5.0),
        encoder_layer_indices=[1, 2, 3, -1],  # the 2b-nar's [4, 8, 12, -1] scaled to 4 layers
        scale_projected_embeddings=True,
        blank_token_id=blank,
        min_edit_sequence_length=8,
    )
    torch.manual_seed(seed)
    model = NARModel.from_config(NARModelConfig.from_dict(config))
    _randomise_batch_norms(model)
    _randomise_projector(model.projector)
    with torch.no_grad():
        model.encoder.out_bpe.bias[blank] += BLANK_BIAS
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    if old_layout:
        tensors = _legacy_bpe_head(tensors, blank)
        config["llm_config"] = config.pop("text_config")
        encoder["bpe_output_dim"] = vocab + 1
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def _randomise_projector(projector: torch.nn.Module) -> None:
    """Learned queries, window positions and LayerNorm affines away from their trivial init."""
    with torch.no_grad():
        for param in (projector.query, projector.window_positions):
            param.normal_(std=param.shape[-1] ** -0.5)
        for module in projector.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)


def _legacy_bpe_head(tensors: dict[str, torch.Tensor], blank: int) -> dict[str, torch.Tensor]:
    """The BPE head as the older layout stores it: row 0 = blank, row i = token i - 1.

    The older head also has a row of its own for the blank's token (end of text), which the current
    layout has no place for: it gets random weights and a very low bias, and conversion drops it.
    """
    tensors = dict(tensors)
    for name in ("encoder.out_bpe.weight", "encoder.out_bpe.bias"):
        new = tensors[name]
        old = torch.cat([new[blank : blank + 1], new])
        old[blank + 1] = -30.0 if name.endswith("bias") else torch.randn_like(new[0])
        tensors[name] = old
    return tensors
