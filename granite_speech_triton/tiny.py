"""Random-weight checkpoints in the real Hugging Face layouts: tiny ones for tests, real-size ones for GPUs.

Their output is meaningless text: they exist so that loading, batching, exactness and speed can be
checked without the multi-gigabyte real checkpoints (or a network). Every size goes through the same
code: a `CheckpointSize` names the dimensions, the config files and the stand-in tokenizer follow
from it, and the weights are written in the layout of MODEL_SPEC.md (AR: transformers'
`save_pretrained`, sharded like the hub's, plus `out_llm.safetensors`; NAR: one `model.safetensors`
with the hub's key names).

    TINY     a few hundred thousand parameters, float32, the modules' own seeded init (the tests)
    REDUCED  tiny dimensions with the real vocabulary, token ids, dtype and sharding (tests the real path)
    REAL     the 2b and 2b-nar dimensions: about 4.6 and 4.3 GB in bfloat16

REDUCED and REAL are built on the meta device and their tensors filled in place, so no time goes into
initialising two billion parameters that are overwritten anyway.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
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
TRAINED_TOKENS = 384  # BPE tokens learnt from CORPUS, special tokens included
OUT_LLM_FILE = "out_llm.safetensors"  # the AR model's BPE CTC head (MODEL_SPEC.md section 3)
ENCODER_COMMON = dict(
    input_dim=160, feedforward_mult=4, context_size=200, max_pos_emb=512, conv_kernel_size=15, conv_expansion_factor=2
)  # fmt: skip
PROJECTOR_RATE = 5  # encoder frames per projector output row (both models)
BPE_POOLING_WINDOW = 4


@dataclass(frozen=True)
class Vocabulary:
    """The stand-in tokenizer's id layout.

    `size` None: the special tokens at their ids, then the trained tokens, nothing else (tiny).
    Otherwise `size` ids: special tokens at their ids (the real checkpoints'), trained tokens from 0,
    never-produced filler tokens everywhere else, so any id a random model emits decodes.
    """

    size: int | None = None
    pad: int = 0
    eos: int = 1  # also bos, and the NAR blank
    audio: int | None = 2  # None: no <|audio|> token (the NAR model's vocabulary)

    def specials(self) -> dict[str, int]:
        ids = {PAD: self.pad, EOS: self.eos}
        return ids if self.audio is None else {**ids, AUDIO: self.audio}


@dataclass(frozen=True)
class CheckpointSize:
    """Dimensions and generation choices of one checkpoint size (both variants)."""

    name: str
    encoder: dict[str, Any]  # encoder_config beyond ENCODER_COMMON
    qformer: dict[str, Any]  # the AR projector_config (BLIP-2 Q-Former)
    text: dict[str, Any]  # granite text_config beyond vocabulary and token ids
    nar_projector: dict[str, Any]  # the NAR projector_config beyond what the encoder and LLM fix
    nar_layer_indices: tuple[int, ...]  # encoder_layer_indices of the NAR model
    nar_self_conditioning_layer: int
    ar_vocabulary: Vocabulary
    nar_vocabulary: Vocabulary
    initializer_range: float  # std of random matrices and biases
    blank_bias: float  # added to the CTC heads' blank logit: random heads then draft sparse, varied ids
    dtype: torch.dtype = torch.float32
    direct_init: bool = False  # True: meta device + tensors filled in place; False: the modules' seeded init
    max_shard_size: str | None = None  # AR safetensors shards (None: transformers' default, one file here)
    projector_window: int = 15  # encoder frames per projector window (window_size / block_size)
    nar_text: dict[str, Any] = field(default_factory=dict)  # NAR text_config overrides
    out_llm_blank_bias: float | None = None  # the AR draft head's blank bias (None: blank_bias)


TINY = CheckpointSize(
    name="tiny",
    encoder=dict(num_layers=4, hidden_dim=32, num_heads=4, dim_head=8, output_dim=12),
    qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
    text=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=4096,
        embedding_multiplier=12.0,
        attention_multiplier=0.25,
        residual_multiplier=1.0,
        logits_scaling=1.0,
    ),
    nar_projector=dict(hidden_size=64, num_heads=4),
    nar_layer_indices=(1, 2, 3, -1),  # the 2b-nar's [4, 8, 12, -1] scaled to 4 layers
    nar_self_conditioning_layer=2,
    ar_vocabulary=Vocabulary(),
    nar_vocabulary=Vocabulary(),
    initializer_range=0.1,
    # Random rows almost never let the blank win; with this bias the test tones get drafts of varying
    # lengths with blanks between repeated tokens.
    blank_bias=2.3,
    # Layers outweigh the (x12) input embeddings, so that the head edits the draft, not copies it.
    nar_text=dict(residual_multiplier=5.0),
    # The AR draft head sees the tiny encoder's other statistics: with this bias the test audio
    # gets drafts of 2 to 70 tokens, so that the draft modes' tests see both outcomes.
    out_llm_blank_bias=1.3,
)
REAL = CheckpointSize(
    name="real",
    encoder=dict(num_layers=16, hidden_dim=1024, num_heads=8, dim_head=128, output_dim=348),
    qformer=dict(hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, intermediate_size=4096),
    text=dict(
        hidden_size=2048,
        num_hidden_layers=40,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=4096,
        max_position_embeddings=4096,
        embedding_multiplier=12.0,
        attention_multiplier=0.0078125,
        residual_multiplier=0.22,
        logits_scaling=8.0,
        rms_norm_eps=1e-5,
    ),
    nar_projector=dict(hidden_size=2048, num_heads=32),
    nar_layer_indices=(4, 8, 12, -1),
    nar_self_conditioning_layer=8,
    ar_vocabulary=Vocabulary(size=100353, pad=100256, eos=100257, audio=100352),
    nar_vocabulary=Vocabulary(size=100352, pad=100256, eos=100257, audio=None),
    initializer_range=0.02,
    # Just under the typical lead of the largest of 100k random logits (std ~0.68) over the blank's: drafts
    # of about 1 to 5 tokens per second of the synthetic speech of gpu_check (real speech: about 3).
    blank_bias=2.57,
    dtype=torch.bfloat16,
    direct_init=True,
    max_shard_size="2GB",  # three shards, as the hub's
)
REDUCED = replace(
    TINY,
    name="reduced",
    ar_vocabulary=REAL.ar_vocabulary,
    nar_vocabulary=REAL.nar_vocabulary,
    blank_bias=REAL.blank_bias,
    out_llm_blank_bias=None,
    dtype=REAL.dtype,
    direct_init=True,
    max_shard_size="10MB",  # several shards, so that the index is read
)
SIZES = {size.name: size for size in (TINY, REDUCED, REAL)}


# ---- tokenizer --------------------------------------------------------------------------------


def make_tokenizer(out: Path, vocabulary: Vocabulary = Vocabulary()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Granite's special tokens (at `vocabulary`'s ids) and chat template."""
    specials = vocabulary.specials()
    vocab, merges = _trained_bpe(TRAINED_TOKENS - len(specials))
    size = vocabulary.size or len(vocab) + len(specials)
    regular = iter(i for i in range(size) if i not in specials.values())
    ids = {token: next(regular) for token in vocab}  # trained tokens keep their order
    ids.update({f"\u0120t{i}": i for i in regular})  # fillers: decode as " t<id>", never produced by encoding
    ids.update(specials)
    if len(ids) != size:
        raise ValueError(f"vocabulary layout {vocabulary} collides with the trained tokens")
    bpe = Tokenizer(models.BPE(vocab=ids, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(token, special=True) for token in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None, padding_side="left"
    )
    if vocabulary.audio is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": [AUDIO]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return tokenizer


def _trained_bpe(vocab_size: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-level BPE learnt from CORPUS: tokens in id order, merges."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    return vocab, [tuple(pair) for pair in model["merges"]]


# ---- configs ----------------------------------------------------------------------------------


def text_config(size: CheckpointSize, vocabulary: Vocabulary, vocab_size: int, tied: bool) -> dict[str, Any]:
    return dict(
        model_type="granite", **size.text, vocab_size=vocab_size, bos_token_id=vocabulary.eos,
        eos_token_id=vocabulary.eos, pad_token_id=vocabulary.pad, tie_word_embeddings=tied,
        initializer_range=size.initializer_range,
    )  # fmt: skip


def ar_config(size: CheckpointSize, vocab_size: int) -> dict[str, Any]:
    """The granite_speech config.json values of the AR model."""
    vocabulary = size.ar_vocabulary
    return dict(
        text_config=text_config(size, vocabulary, vocab_size, tied=False),
        encoder_config={**ENCODER_COMMON, **size.encoder},
        projector_config=dict(
            model_type="blip_2_qformer",
            **size.qformer,
            encoder_hidden_size=size.encoder["hidden_dim"],
            cross_attention_frequency=1,
        ),
        audio_token_index=vocabulary.audio,
        has_lora_adapter=False,
        downsample_rate=PROJECTOR_RATE,
        window_size=size.projector_window,
        tie_word_embeddings=False,
        initializer_range=size.initializer_range,
    )


def nar_config(size: CheckpointSize, vocab_size: int) -> dict[str, Any]:
    """The granite-speech-nar config.json of MODEL_SPEC.md section 4 (revision a1e3416e)."""
    vocabulary = size.nar_vocabulary
    encoder = dict(
        ENCODER_COMMON,
        **size.encoder,
        self_conditioning_layer=size.nar_self_conditioning_layer,
        bpe_output_dim=vocab_size,
        bpe_pooling_window=BPE_POOLING_WINDOW,
    )
    text = {**text_config(size, vocabulary, vocab_size, tied=True), **size.nar_text}
    projector = dict(
        encoder_dim=encoder["hidden_dim"], num_encoder_layers=len(size.nar_layer_indices), llm_dim=text["hidden_size"],
        num_layers=2, mlp_ratio=2, block_size=size.projector_window, downsample_rate=PROJECTOR_RATE, layernorm_eps=1e-6,
        attn_bias=True, mlp_bias=True, dropout_prob=0.1, **size.nar_projector,
    )  # fmt: skip
    return dict(
        architectures=["GraniteSpeechNarForASR"],
        model_type="granite_speech_nar",
        encoder_config=encoder,
        projector_config=projector,
        text_config=text,
        encoder_layer_indices=list(size.nar_layer_indices),
        scale_projected_embeddings=True,
        blank_token_id=vocabulary.eos,
        min_edit_sequence_length=8,
    )


# ---- weights ----------------------------------------------------------------------------------


def random_model(factory: Callable[[], nn.Module], size: CheckpointSize, seed: int) -> nn.Module:
    """`factory()` with random weights in `size.dtype`, on the CPU."""
    if not size.direct_init:
        torch.manual_seed(seed)
        model = factory()
        _randomise_batch_norms(model)
        return model.to(size.dtype)
    with torch.device("meta"):
        model = factory()
    model = model.to(size.dtype).to_empty(device="cpu")
    with torch.no_grad():
        fill_random(model.state_dict(), size.initializer_range, torch.Generator().manual_seed(seed))
    return model


def fill_random(tensors: dict[str, torch.Tensor], std: float, gen: torch.Generator) -> None:
    """Fill every tensor in place: norm scales and variances near 1, means near 0, the rest N(0, std)."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            tensor.zero_()  # BatchNorm's num_batches_tracked
        elif name.endswith("running_var") or (tensor.dim() == 1 and name.endswith("weight")):
            tensor.uniform_(0.5, 1.5, generator=gen)
        elif name.endswith("running_mean"):
            tensor.uniform_(-0.5, 0.5, generator=gen)
        else:
            tensor.normal_(0.0, std, generator=gen)


def _randomise_batch_norms(model: nn.Module) -> None:
    """Give BatchNorm running statistics non-trivial values so that loading them is tested."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)


def _randomise_projector(projector: nn.Module) -> None:
    """Learned queries, window positions and LayerNorm affines away from their trivial init."""
    with torch.no_grad():
        for param in (projector.query, projector.window_positions):
            param.normal_(std=param.shape[-1] ** -0.5)
        for module in projector.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)


def write_out_llm(out: Path, size: CheckpointSize, vocab_size: int, seed: int) -> None:
    """The AR checkpoint's BPE CTC head: Linear(encoder hidden -> vocab), label 0 = blank, label i = token i - 1."""
    head = {
        "weight": torch.empty(vocab_size, size.encoder["hidden_dim"], dtype=size.dtype),
        "bias": torch.empty(vocab_size, dtype=size.dtype),
    }
    fill_random(head, size.initializer_range, torch.Generator().manual_seed(seed + 1))
    head["bias"][0] += size.blank_bias if size.out_llm_blank_bias is None else size.out_llm_blank_bias
    save_file(head, out / OUT_LLM_FILE, metadata={"format": "pt"})


# ---- the two makers ---------------------------------------------------------------------------


def make_ar_checkpoint(out: str | Path, size: CheckpointSize = TINY, seed: int = 0) -> Path:
    """A GraniteSpeechForConditionalGeneration checkpoint saved with transformers' save_pretrained."""
    from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = len(make_tokenizer(out, size.ar_vocabulary))
    config = GraniteSpeechConfig(**ar_config(size, vocab_size))
    model = random_model(lambda: GraniteSpeechForConditionalGeneration(config).eval(), size, seed)
    shards = {"max_shard_size": size.max_shard_size} if size.max_shard_size else {}
    model.save_pretrained(out, **shards)
    write_out_llm(out, size, vocab_size, seed)
    return out


def make_nar_checkpoint(out: str | Path, size: CheckpointSize = TINY, seed: int = 0, old_layout: bool = False) -> Path:
    """A granite-speech-nar checkpoint in the hub layout of MODEL_SPEC.md section 4.

    `old_layout=True` writes the same weights in the older layout (revision 7d20732d): `llm_config`
    instead of `text_config` and a BPE head with one more row (label 0 = blank, label i = token i - 1).
    The blank is the tokenizer's end-of-text token, as in the real checkpoint.
    """
    from .model.nar import NARModel, NARModelConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = len(make_tokenizer(out, size.nar_vocabulary))
    blank = size.nar_vocabulary.eos
    config = nar_config(size, vocab_size)
    cfg = NARModelConfig.from_dict(config)
    model = random_model(lambda: NARModel.from_config(cfg), size, seed)
    if not size.direct_init:
        _randomise_projector(model.projector)
    with torch.no_grad():
        model.encoder.out_bpe.bias[blank] += size.blank_bias
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    if old_layout:
        tensors = _legacy_bpe_head(tensors, blank)
        config["llm_config"] = config.pop("text_config")
        config["encoder_config"]["bpe_output_dim"] = vocab_size + 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def make_tiny_ar_checkpoint(out: str | Path, seed: int = 0) -> Path:
    return make_ar_checkpoint(out, TINY, seed)


def make_tiny_nar_checkpoint(out: str | Path, seed: int = 0, old_layout: bool = False) -> Path:
    return make_nar_checkpoint(out, TINY, seed, old_layout)


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
