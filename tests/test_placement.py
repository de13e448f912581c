"""Placement discipline: the adapter loop places a request's tensors once; no predict mixes devices.

Each component's predict runs on inputs made as its adapter's `decode` makes them (host float32
tensors), placed by `serving.placement.place` (what `BatchAdapter.run` does), with the model in
float64 and on the emulated device of `placement_check.DeviceDiscipline`: an op that mixes host and
device tensors fails here as it would on a GPU, and a float32 tensor that reaches a float64 layer
fails as torch always makes it fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from audio_samples import synthetic
from placement_check import DEVICE, HOST, DeviceDiscipline, DeviceMixError

from granite_speech_triton.model.audio import FEATURE_DIM, Framing, LogMelFrontEnd, check_waveform
from granite_speech_triton.model.config import ARModelConfig, read_config_json
from granite_speech_triton.model.decoder import load_ar_decoder
from granite_speech_triton.model.encoder import encode_batch, load_encoder, pad_batch
from granite_speech_triton.model.nar import (
    load_nar_config,
    load_nar_encoder,
    load_nar_language_model,
    load_nar_projector,
)
from granite_speech_triton.model.projector import load_projector
from granite_speech_triton.model.prompts import SpeechRequest
from granite_speech_triton.serving.placement import place

CPU = torch.device("cpu")
MODEL_DTYPE = torch.float64  # no request tensor arrives in it: an unplaced input cannot pass unnoticed
FRAMES = (230, 41, 97)


@dataclass
class Component:
    """A component's model (built by `load`) and its predict, with decoded requests to feed it."""

    load: Callable[[Path, Path], Callable[[list], list]]  # (AR, NAR checkpoint) -> predict
    requests: Callable[[], list]  # what decode makes of a few requests


def features() -> list[torch.Tensor]:
    return [torch.randn(n, FEATURE_DIM) for n in FRAMES]


def rows(width: int, counts=FRAMES) -> list[torch.Tensor]:
    return [torch.randn(n, width) for n in counts]


def front_end(_ar: Path, _nar: Path):
    extract = LogMelFrontEnd(Framing.AR, CPU)
    return lambda batch: [extract(audio) for audio, _ in batch]


def ar_encoder(ar: Path, _nar: Path):
    encoder = load_encoder(ar, ARModelConfig.from_dict(read_config_json(ar)).encoder, CPU, MODEL_DTYPE)
    return lambda batch: encode_batch(encoder, batch)


def nar_encoder(_ar: Path, nar: Path):
    encoder = load_nar_encoder(nar, load_nar_config(nar), CPU, MODEL_DTYPE)
    return lambda batch: encoder.encode(*pad_batch(batch)).projector_inputs


def ar_projector(ar: Path, _nar: Path):
    return load_projector(ar, ARModelConfig.from_dict(read_config_json(ar)).projector, CPU, MODEL_DTYPE)


def nar_projector(_ar: Path, nar: Path):
    return load_nar_projector(nar, load_nar_config(nar), CPU, MODEL_DTYPE)


def llm_decoder(ar: Path, _nar: Path):
    decoder = load_ar_decoder(ar, CPU, MODEL_DTYPE)
    return decoder.engine.generate


def nar_head(_ar: Path, nar: Path):
    head = load_nar_language_model(nar, load_nar_config(nar), CPU, MODEL_DTYPE)
    return lambda batch: head([audio for audio, _ in batch], [draft for _, draft in batch])


def decode_items(ar: Path) -> list:
    decoder = load_ar_decoder(ar)  # `sequence` only reads the tokenizer and the rows' count
    request = SpeechRequest(max_new_tokens=5)
    return [decoder.sequence(request, embeds) for embeds in rows(64, (30, 9))]


def waveforms() -> list:
    audio = [check_waveform(synthetic(s, 3), 16_000, 16_000 * 10) for s in (0.7, 2.1)]
    return [(a, SpeechRequest()) for a in audio]


COMPONENTS = {
    "feature_extractor": Component(front_end, waveforms),
    "ar_conformer_encoder": Component(ar_encoder, features),
    "nar_conformer_encoder": Component(nar_encoder, features),
    "ar_qformer_projector": Component(ar_projector, lambda: rows(32)),
    "nar_qformer_projector": Component(nar_projector, lambda: rows(4 * 32)),
    "nar_head": Component(nar_head, lambda: [(r, [5, 9, 9, 11]) for r in rows(64, (46, 8, 19))]),
}


def placed_batch(check: DeviceDiscipline, requests: list, dtype: torch.dtype) -> list:
    """What BatchAdapter.run does with decoded requests (host tensors): place each one."""
    check.mark(requests, HOST)
    return [place(item, CPU, dtype) for item in requests]


def assert_on_device(check: DeviceDiscipline, outputs: list, dtype: torch.dtype) -> None:
    """Every tensor a predict returns is on the model's device; float ones in its dtype (token ids come
    back as Python lists)."""
    tensors = [t for out in outputs for t in (out if isinstance(out, list) else [out]) if isinstance(t, torch.Tensor)]
    assert all(check.side(t) == DEVICE for t in tensors)
    assert all(t.dtype == dtype for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_each_predict_keeps_to_the_model_device(name, tiny_ar_checkpoint, tiny_nar_checkpoint):
    """Models are loaded inside the check: the loaders must put every parameter and buffer on the device."""
    component = COMPONENTS[name]
    dtype = torch.float32 if name == "feature_extractor" else MODEL_DTYPE  # the front end has no dtype setting
    with DeviceDiscipline() as check:
        predict = component.load(tiny_ar_checkpoint, tiny_nar_checkpoint)
        requests = component.requests()
        outputs = predict(placed_batch(check, requests, dtype))
    assert len(outputs) == len(requests)
    assert_on_device(check, outputs, dtype)


def test_the_decoding_engine_keeps_to_the_model_device(tiny_ar_checkpoint):
    items = decode_items(tiny_ar_checkpoint)
    with DeviceDiscipline() as check:
        predict = llm_decoder(tiny_ar_checkpoint, tiny_ar_checkpoint)
        outputs = predict(placed_batch(check, items, MODEL_DTYPE))
    assert [0 < len(ids) <= 5 for ids in outputs] == [True, True]


def test_host_rows_reaching_the_nar_head_fail_as_on_a_gpu(tiny_nar_checkpoint):
    """The bug the check exists for: audio rows from the host concatenated with device embeddings
    (the NAR head's adapter before placement moved to the shared loop)."""
    with DeviceDiscipline() as check:
        head = load_nar_language_model(tiny_nar_checkpoint, load_nar_config(tiny_nar_checkpoint), CPU, MODEL_DTYPE)
        audio = rows(64, (20,))
        check.mark(audio, HOST)
        with pytest.raises(DeviceMixError, match="mixes host and device"):
            head(audio, [[5, 9]])
        assert head(place(audio, CPU, MODEL_DTYPE), [[5, 9]])  # placed, the same call runs


def test_the_check_follows_transfers_and_factories():
    with DeviceDiscipline() as check:
        weight = torch.randn(3, 4)
        check.mark(weight, DEVICE)
        request = torch.ones(2, 4)  # made without device=: a host tensor
        assert check.side(request) == HOST
        with pytest.raises(DeviceMixError):
            torch.nn.functional.linear(request, weight)
        placed = request.to(weight.device)
        assert check.side(placed) == DEVICE and check.side(torch.nn.functional.linear(placed, weight)) == DEVICE
        assert check.side(torch.arange(3, device=weight.device)) == DEVICE and check.side(torch.arange(3)) == HOST
        assert check.side(weight[torch.tensor([0, 2])]) == DEVICE  # host indices are fine, as on CUDA
        assert check.side((weight * 2).cpu()) == HOST
        weight * torch.tensor(2.0)  # a 0-dim host tensor is a scalar


@dataclass
class Item:
    ids: list[int]
    rows: torch.Tensor
    lengths: torch.Tensor


def test_place_moves_every_tensor_and_copies_nothing_already_in_place():
    item = Item([1, 2], torch.ones(2, 3), torch.tensor([4, 5]))
    placed = place((item, {"x": torch.zeros(1)}, "text"), CPU, torch.float64)
    assert placed[0].rows.dtype == torch.float64 and placed[0].lengths.dtype == torch.int64  # ints keep their type
    assert placed[0].ids is item.ids and placed[2] == "text" and placed[1]["x"].dtype == torch.float64
    same = (item, [torch.ones(2, dtype=torch.float64)])
    assert place(same[1], CPU, torch.float64) is same[1]  # in place already: the very same objects
    assert place(Item([1], torch.ones(1, dtype=torch.float64), torch.tensor([1])), CPU, torch.float64).ids == [1]
