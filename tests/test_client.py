"""granite_speech_client against a real tritonserver (tiny AR checkpoint), over gRPC and HTTP.

The tiny model's text is meaningless, so results are compared between paths (file vs array,
split piece vs the same samples sent alone), never with expected words.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
import tritonclient.grpc as grpcclient
from granite_speech_client import (
    SAMPLE_RATE,
    AudioInputError,
    GraniteSpeechClient,
    InvalidRequestError,
    ModelNotReadyError,
    Piece,
    RequestTimeoutError,
    ServerRejectedError,
    ServerUnreachableError,
    Word,
)
from granite_speech_client.client import request_inputs, stitch_words
from granite_speech_client.options import RequestOptions

from granite_speech_triton.serving.server import free_port

PROTOCOLS = ("grpc", "http")
NEW_TOKENS = 12  # enough for texts to differ between inputs, short enough to be fast
GAP_S = 1.0  # planted pauses in the long file


def espeak(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def to_16k_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """The reference conversion: average the channels, resample with soxr."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    return mono if rate == SAMPLE_RATE else soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """About 3 s of espeak-ng speech, mono float32 at 16 kHz."""
    path = espeak("hello world this is a test of the speech system", tmp_path_factory.mktemp("speech") / "s.wav")
    samples, rate = soundfile.read(path, dtype="float32")
    return to_16k_mono(samples, rate)


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request, ar_server):
    url = ar_server.grpc_url if request.param == "grpc" else ar_server.http_url
    with GraniteSpeechClient(url, request.param, timeout_s=120) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(ar_server):
    """For protocol-independent behaviour (splitting), to keep the suite short."""
    with GraniteSpeechClient(ar_server.grpc_url, timeout_s=120) as client:
        yield client


def write_variants(speech: np.ndarray, folder: Path) -> dict[str, Path]:
    """The same speech as wav 8 kHz, flac 22.05 kHz, ogg 44.1 kHz, stereo wav 48 kHz, wav 16 kHz."""
    stereo = np.stack([speech, 0.5 * speech], axis=1)  # [samples, 2]
    specs = {
        "8k.wav": (speech, 8_000),
        "22k.flac": (speech, 22_050),
        "44k.ogg": (speech, 44_100),
        "48k_stereo.wav": (stereo, 48_000),
        "16k.wav": (speech, 16_000),
    }
    paths = {}
    for name, (samples, rate) in specs.items():
        paths[name] = folder / name
        soundfile.write(
            paths[name], soxr.resample(samples, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else samples, rate
        )
    return paths


@pytest.mark.server
def test_files_bytes_and_arrays_equal_the_16k_mono_array(client, speech, tmp_path):
    """Every format and rate gives the result of its own 16 kHz mono conversion sent directly;
    a file's bytes, and a decoded stereo array with its rate, give the same result as the file."""
    paths = write_variants(speech, tmp_path)
    texts = {}
    for name, path in paths.items():
        samples, rate = soundfile.read(path, dtype="float32")
        direct = client.transcribe(to_16k_mono(samples, rate), sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS)
        from_file = client.transcribe(path, max_new_tokens=NEW_TOKENS)
        assert from_file.token_ids == direct.token_ids and from_file.text == direct.text, name
        assert len(from_file.token_ids) == NEW_TOKENS and from_file.pieces == () and from_file.variant == "ar"
        assert from_file.audio_seconds == pytest.approx(speech.shape[0] / SAMPLE_RATE, abs=0.01)
        texts[name] = from_file
    ogg_bytes = client.transcribe(paths["44k.ogg"].read_bytes(), max_new_tokens=NEW_TOKENS)
    assert ogg_bytes == dataclasses.replace(texts["44k.ogg"], latency_s=ogg_bytes.latency_s)
    stereo, rate = soundfile.read(paths["48k_stereo.wav"], dtype="float32")
    assert stereo.shape[1] == 2 and rate == 48_000
    as_array = client.transcribe(stereo, sample_rate=rate, max_new_tokens=NEW_TOKENS)
    assert as_array.token_ids == texts["48k_stereo.wav"].token_ids


def raw_infer(url: str, audio: np.ndarray, **options: tuple[str, object]) -> tuple[int, ...]:
    """Token ids from the ensemble called with tritonclient directly (the contract's inputs)."""
    triton = grpcclient.InferenceServerClient(url)
    inputs = [grpcclient.InferInput("AUDIO", [1, audio.shape[0]], "FP32")]
    inputs[0].set_data_from_numpy(audio[None])
    for name, (datatype, value) in options.items():
        dtype = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32}[datatype]
        inputs.append(grpcclient.InferInput(name, [1, 1], datatype))
        inputs[-1].set_data_from_numpy(np.array([[value]], dtype=dtype))
    try:
        return tuple(triton.infer("granite_speech", inputs).as_numpy("TOKEN_IDS")[0].tolist())
    finally:
        triton.close()


@pytest.mark.server
def test_options_map_to_the_ensemble_inputs(client, ar_server, speech):
    limit = ("INT32", NEW_TOKENS)
    cases = [
        (dict(keywords="granite, triton"), dict(KEYWORDS=("BYTES", b"granite,triton"))),
        (dict(punctuate=True, language="fr"), dict(PUNCTUATE=("BOOL", True), LANGUAGE=("BYTES", b"fr"))),
    ]
    seen = set()
    for kwargs, inputs in cases:
        result = client.transcribe(speech, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS, **kwargs)
        assert result.token_ids == raw_infer(ar_server.grpc_url, speech, MAX_NEW_TOKENS=limit, **inputs)
        seen.add(result.token_ids)
    translated = client.translate(speech, sample_rate=SAMPLE_RATE, target_language="de", max_new_tokens=NEW_TOKENS)
    task = dict(TASK=("BYTES", b"translate"), TARGET_LANGUAGE=("BYTES", b"de"), MAX_NEW_TOKENS=limit)
    assert translated.token_ids == raw_infer(ar_server.grpc_url, speech, **task)
    assert translated.task == "translate"
    plain = client.transcribe(speech, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS).token_ids
    assert len(seen | {plain, translated.token_ids}) > 1, "options should change the prompt and so the output"


@pytest.mark.server
def test_transcribe_many_keeps_order_bounds_concurrency_and_isolates_failures(client, speech, tmp_path, monkeypatch):
    lengths = (3.0, 0.5, 2.5, 1.0, 2.0)  # seconds; long ones first so they finish out of order
    arrays = [speech[: int(s * SAMPLE_RATE)] for s in lengths]
    alone = [client.transcribe(a, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS) for a in arrays]
    items = [*arrays[:2], tmp_path / "missing.wav", *arrays[2:]]

    active, peak, lock, two_in_flight = [0], [0], threading.Lock(), threading.Event()
    run = client._run

    def counting_run(*args, **kwargs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            if active[0] == 2:
                two_in_flight.set()
        try:
            # The first request waits for a second one beside it, however slow the machine: only a client
            # that never sends two at once makes it wait out the timeout (and the peak then shows it).
            two_in_flight.wait(timeout=300)
            return run(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(client, "_run", counting_run)
    finished = []
    results = client.transcribe_many(
        items, max_in_flight=2, on_result=finished.append, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS
    )
    assert peak[0] == 2, "at most max_in_flight requests at once, and that many used"
    assert [r.index for r in results] == list(range(len(items)))
    assert sorted(r.index for r in finished) == list(range(len(items)))
    assert isinstance(results[2].error, AudioInputError) and "no such file" in str(results[2].error)
    assert results[2].source == str(tmp_path / "missing.wav") and not results[2].ok
    good = [r for r in results if r.ok]
    assert [r.result.token_ids for r in good] == [a.token_ids for a in alone]
    assert [r.source for r in good] == [f"<array #{i}>" for i in (0, 1, 3, 4, 5)]


def long_audio(speech: np.ndarray, gaps_at_s: tuple[float, ...], total_s: float) -> np.ndarray:
    """Speech repeated with 0.1 s pauses, plus GAP_S pauses starting at `gaps_at_s`; faint noise throughout."""
    rng = np.random.default_rng(0)
    audio = np.zeros(int(total_s * SAMPLE_RATE), np.float32)
    position, short_pause = 0, int(0.1 * SAMPLE_RATE)
    gaps = [int(g * SAMPLE_RATE) for g in gaps_at_s]
    while position < audio.shape[0]:
        gap = next((g for g in gaps if position <= g < position + speech.shape[0]), None)
        if gap is not None:  # fill up to the gap with the start of the utterance, then skip the gap
            audio[position:gap] = speech[: gap - position]
            position = gap + int(GAP_S * SAMPLE_RATE)
            continue
        piece = speech[: audio.shape[0] - position]
        audio[position : position + piece.shape[0]] = piece
        position += piece.shape[0] + short_pause
    return audio + rng.standard_normal(audio.shape[0]).astype(np.float32) * 1e-4


@pytest.mark.server
def test_long_audio_is_split_at_the_planted_pauses(grpc_client, speech, tmp_path):
    client = grpc_client
    gaps = (33.0, 66.5)  # seconds; the server's limit is 40 s
    audio = long_audio(speech, gaps, 100.0)
    path = tmp_path / "long.flac"
    soundfile.write(path, audio, SAMPLE_RATE)
    assert client.max_audio_seconds("ar") == 40.0  # learned from ar_feature_extractor's config
    result = client.transcribe(path, max_new_tokens=NEW_TOKENS)
    assert len(result.pieces) == 3 and result.audio_seconds == pytest.approx(100.0, abs=0.01)
    cuts = [p.end_s for p in result.pieces[:-1]]
    for cut, gap in zip(cuts, gaps, strict=True):
        assert gap < cut < gap + GAP_S, f"cut at {cut:.2f} s is not inside the pause at {gap}..{gap + GAP_S} s"
    for before, after in itertools.pairwise(result.pieces):
        assert after.start_s == pytest.approx(before.end_s - 0.2)  # small overlap
    decoded, _ = soundfile.read(path, dtype="float32")
    for piece in result.pieces:
        assert piece.end_s - piece.start_s < 40.0 and not piece.skipped
        samples = decoded[round(piece.start_s * SAMPLE_RATE) : round(piece.end_s * SAMPLE_RATE)]
        alone = client.transcribe(samples, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS)
        assert piece.token_ids == alone.token_ids and piece.text == alone.text
    assert result.text == " ".join(p.text.strip() for p in result.pieces if p.text.strip())
    assert result.token_ids == tuple(t for p in result.pieces for t in p.token_ids)


@pytest.mark.server
def test_all_zero_pieces_are_not_sent(grpc_client, speech):
    client = grpc_client
    audio = np.zeros(90 * SAMPLE_RATE, np.float32)
    audio[: speech.shape[0]] = speech
    audio[-speech.shape[0] :] = speech
    result = client.transcribe(audio, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS)
    assert [p.skipped for p in result.pieces] == [False, True, False]
    assert result.pieces[1].token_ids == () and len(result.token_ids) == 2 * NEW_TOKENS
    silent = client.transcribe(np.zeros(90 * SAMPLE_RATE, np.float32), sample_rate=SAMPLE_RATE)
    assert (silent.text, silent.token_ids) == ("", ()) and all(p.skipped for p in silent.pieces)


@pytest.mark.server
def test_digital_silence_is_an_empty_result(client):
    """Sent to the server, which answers all-zero audio with empty text instead of an error."""
    result = client.transcribe(np.zeros(SAMPLE_RATE, np.float32), sample_rate=SAMPLE_RATE)
    assert (result.text, result.token_ids, result.pieces) == ("", (), ())
    assert result.audio_seconds == 1.0


@pytest.mark.server
def test_server_rejections_are_passed_through(client):
    with pytest.raises(ServerRejectedError, match=r"MAX_NEW_TOKENS must be in 1\.\.256") as rejected:
        client.transcribe(np.ones(SAMPLE_RATE, np.float32) * 0.1, sample_rate=SAMPLE_RATE, max_new_tokens=1000)
    assert rejected.value.status in ("StatusCode.INVALID_ARGUMENT", "400")
    with pytest.raises(ServerRejectedError, match=r"KEYWORDS may not contain the model's special tokens"):
        client.transcribe(np.ones(SAMPLE_RATE, np.float32) * 0.1, sample_rate=SAMPLE_RATE, keywords="<|audio|>")


@pytest.mark.server
def test_unknown_ensemble_is_model_not_ready(client):
    with pytest.raises(ModelNotReadyError, match="granite_speech_nar"):
        client.transcribe(np.ones(SAMPLE_RATE, np.float32) * 0.1, sample_rate=SAMPLE_RATE, variant="nar")
    with pytest.raises(ModelNotReadyError, match="not ready"):
        client.check_ready("nar")
    health = client.health()
    assert health.live and health.ready
    assert health.ensembles == {"granite_speech": True, "granite_speech_nar": False}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_server_after_retries(protocol):
    url = f"127.0.0.1:{free_port()}"
    with GraniteSpeechClient(url, protocol, retries=2, retry_backoff_s=0.2) as client:
        started = time.monotonic()
        with pytest.raises(ServerUnreachableError, match=f"{url} \\({protocol}\\) is unreachable"):
            client.transcribe(np.ones(SAMPLE_RATE, np.float32), sample_rate=SAMPLE_RATE)
        assert time.monotonic() - started >= 0.2 + 0.4  # two retries with doubling backoff
        with pytest.raises(ServerUnreachableError):
            client.health()


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_timeout(ar_server, protocol):
    url = ar_server.grpc_url if protocol == "grpc" else ar_server.http_url
    client = GraniteSpeechClient(url, protocol, timeout_s=0.001, retries=0)
    with client, pytest.raises(RequestTimeoutError, match="did not answer within 0.001 s"):
        client.transcribe(np.ones(30 * SAMPLE_RATE, np.float32) * 0.1, sample_rate=SAMPLE_RATE)


def test_unreadable_inputs_fail_on_the_client(tmp_path):
    client = GraniteSpeechClient(f"127.0.0.1:{free_port()}", retries=0)  # nothing listens: errors are client-side
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    wav = tmp_path / "ok.wav"
    soundfile.write(wav, np.ones(SAMPLE_RATE, np.float32) * 0.1, SAMPLE_RATE)
    cases = [
        (tmp_path / "missing.wav", "no such file"),
        (not_audio, "not a readable audio file"),
        (wav.read_bytes()[:20], "audio bytes: not a readable audio file"),  # header cut short
        (b"\x00\x01garbage" * 100, "audio bytes: not a readable audio file"),
        (np.zeros(0, np.float32), "sample_rate is required"),
    ]
    for source, message in cases:
        with pytest.raises(AudioInputError, match=message):
            client.transcribe(source)
    with pytest.raises(AudioInputError, match="empty"):
        client.transcribe(np.zeros(0, np.float32), sample_rate=SAMPLE_RATE)
    with pytest.raises(AudioInputError, match="shape"):
        client.transcribe(np.zeros((2, 2, 2), np.float32), sample_rate=SAMPLE_RATE)


def test_audio_is_sent_as_one_row():
    """AUDIO goes out as [1, samples]; anything else is refused before it is sent."""
    audio = np.ones(SAMPLE_RATE, np.float32)
    assert request_inputs(audio, RequestOptions(), 30.0).get("AUDIO").shape == (1, SAMPLE_RATE)
    for bad in (np.ones((2, SAMPLE_RATE), np.float32), np.ones((1, SAMPLE_RATE), np.float32), np.zeros(0, np.float32)):
        with pytest.raises(AudioInputError, match=r"AUDIO must be one non-empty mono waveform, sent as \[1, samples\]"):
            request_inputs(bad, RequestOptions(), 30.0)


def test_nar_requests_carry_only_the_nar_inputs():
    audio = np.ones(SAMPLE_RATE, np.float32)
    inputs = request_inputs(audio, RequestOptions(variant="nar", language="fr").validate(), 30.0)
    assert sorted(inputs) == ["AUDIO", "LANGUAGE"]
    assert inputs["AUDIO"].shape == (1, SAMPLE_RATE) and inputs["LANGUAGE"].tolist() == [[b"fr"]]
    assert sorted(request_inputs(audio, RequestOptions(variant="nar"), 30.0)) == ["AUDIO"]  # defaults are not sent


def test_ar_requests_carry_the_client_timeout_as_their_server_deadline():
    audio = np.ones(SAMPLE_RATE, np.float32)
    assert request_inputs(audio, RequestOptions(), 12.5)["TIMEOUT_MS"].tolist() == [[12_500]]
    assert request_inputs(audio, RequestOptions(), 1e9)["TIMEOUT_MS"].tolist() == [[3_600_000]]  # the server's bound


@pytest.mark.server
def test_streams_grow_into_the_unary_result(client, speech):
    options = dict(sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS, punctuate=True)
    streams = {
        "transcribe": (list(client.transcribe_stream(speech, **options)), client.transcribe(speech, **options)),
        "translate": (
            list(client.translate_stream(speech, target_language="es", **options)),
            client.translate(speech, target_language="es", **options),
        ),
    }
    for name, (updates, unary) in streams.items():
        assert len(updates) >= 2 and updates[-1].final and not any(u.final for u in updates[:-1]), name
        assert (updates[-1].text, updates[-1].token_ids) == (unary.text, unary.token_ids), name
        for before, after in itertools.pairwise(updates):
            assert after.text.startswith(before.text) and after.token_ids[: len(before.token_ids)] == before.token_ids


@pytest.mark.server
def test_long_audio_streams_piece_after_piece(grpc_client, speech):
    audio = long_audio(speech, (33.0,), 50.0)
    whole = grpc_client.transcribe(audio, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS)
    updates = list(grpc_client.transcribe_stream(audio, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS))
    assert len(whole.pieces) == 2 and [u.final for u in updates].count(True) == 1 and updates[-1].final
    assert (updates[-1].text, updates[-1].token_ids) == (whole.text, whole.token_ids)
    first_piece = whole.pieces[0].token_ids
    assert any(u.token_ids == first_piece for u in updates)  # the first piece completed before the second began


def test_streaming_options_are_checked_before_anything_is_sent():
    with GraniteSpeechClient(f"127.0.0.1:{free_port()}", retries=0) as client:
        with pytest.raises(InvalidRequestError, match="unsupported language 'xx'"):
            client.transcribe_stream(np.ones(SAMPLE_RATE, np.float32), sample_rate=SAMPLE_RATE, language="xx")
        with pytest.raises(AudioInputError, match="empty"):
            client.translate_stream(np.zeros(0, np.float32), sample_rate=SAMPLE_RATE, target_language="fr")


def test_invalid_options_fail_before_anything_is_sent():
    """Pointed at a closed port: validation errors win over connection errors, so they are client-side."""
    audio = np.ones(SAMPLE_RATE, np.float32)
    cases = [
        (dict(language="xx"), "unsupported language 'xx' for variant ar"),
        (dict(language="ja", variant="nar"), "unsupported language 'ja' for variant nar"),
        (dict(variant="nar", keywords="a,b"), "keywords is only supported by variant 'ar'"),
        (dict(variant="nar", punctuate=True), "punctuate is only supported by variant 'ar'"),
        (dict(variant="xx"), "unknown variant 'xx'"),
        (dict(max_new_tokens=0), "max_new_tokens must be at least 1"),
        (dict(keywords=["a,b"]), "may not contain a comma"),
    ]
    with GraniteSpeechClient(f"127.0.0.1:{free_port()}", retries=0) as client:
        for kwargs, message in cases:
            with pytest.raises(InvalidRequestError, match=message):
                client.transcribe(audio, sample_rate=SAMPLE_RATE, **kwargs)
        translations = [
            (dict(target_language="en"), "equals the source language"),
            (dict(target_language="de", language="fr"), "fr->de unsupported: one side must be English"),
            (dict(target_language="xx"), "unsupported target language 'xx'"),
            (dict(target_language="fr", variant="nar"), "task 'translate' is only supported by variant 'ar'"),
        ]
        for kwargs, message in translations:
            with pytest.raises(InvalidRequestError, match=message):
                client.translate(audio, sample_rate=SAMPLE_RATE, **kwargs)
        with pytest.raises(InvalidRequestError, match="max_in_flight"):
            client.transcribe_many([audio], max_in_flight=0, sample_rate=SAMPLE_RATE)
    with pytest.raises(InvalidRequestError, match="unknown task 'summarize'"):
        RequestOptions(task="summarize").validate()
    with pytest.raises(InvalidRequestError, match="timestamps are only valid when transcribing"):
        RequestOptions(task="translate", target_language="fr", timestamps=True).validate()
    with pytest.raises(InvalidRequestError, match="max_pieces_in_flight"):
        GraniteSpeechClient("127.0.0.1:1", max_pieces_in_flight=0)


def test_stitched_words_drop_what_the_overlap_heard_twice():
    first = Piece(0.0, 10.0, " a b", (1, 2), 0.1, words=(Word(" a", 1.0, 2.0, (1,)), Word(" b", 9.7, 10.0, (2,))))
    # the second piece starts 0.2 s before the cut and hears the end of " b" again
    second_words = (Word("b", 9.8, 9.96, (2,)), Word(" c", 11.0, 12.0, (3,)), Word("d", 12.0, 12.5, (4,)))
    second = Piece(9.8, 20.0, "b c d", (2, 3, 4), 0.1, words=second_words)
    third = Piece(19.8, 25.0, "e", (5,), 0.1, words=(Word("e", 20.5, 21.0, (5,)),))
    words = stitch_words([first, second, third])
    assert [w.text for w in words] == [" a", " b", " c", "d", " e"]
    assert [w.start_s for w in words] == [1.0, 9.7, 11.0, 12.0, 20.5]
    straddling = Piece(9.8, 20.0, "x", (7,), 0.1, words=(Word(" x", 9.9, 10.3, (7,)),))
    assert [(w.start_s, w.end_s) for w in stitch_words([first, straddling])][-1] == (10.0, 10.3)


@pytest.mark.server
def test_long_audio_words_are_each_pieces_words_from_its_start(grpc_client, speech):
    """Timestamps of a split file: every piece's words are those of its samples sent alone, shifted by
    where the piece starts; the result's words are in order and make its text."""
    client = grpc_client
    audio = long_audio(speech, (33.0, 66.5), 100.0)
    result = client.transcribe(audio, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS, timestamps=True)
    assert len(result.pieces) == 3
    for piece in result.pieces:
        samples = audio[round(piece.start_s * SAMPLE_RATE) : round(piece.end_s * SAMPLE_RATE)]
        alone = client.transcribe(samples, sample_rate=SAMPLE_RATE, max_new_tokens=NEW_TOKENS, timestamps=True)
        assert alone.words and alone.text == "".join(w.text for w in alone.words)
        assert alone.token_ids == tuple(t for w in alone.words for t in w.token_ids)
        assert [w.text for w in piece.words] == [w.text for w in alone.words]
        shifted = [t + piece.start_s for w in alone.words for t in (w.start_s, w.end_s)]
        assert [t for w in piece.words for t in (w.start_s, w.end_s)] == pytest.approx(shifted, abs=1e-4)
        assert all(piece.start_s <= w.start_s < w.end_s <= piece.end_s + 1e-6 for w in piece.words)
    words = result.words
    assert all(a.start_s <= b.start_s for a, b in itertools.pairwise(words))
    assert result.text == "".join(w.text for w in words).strip()
    assert result.token_ids == tuple(t for w in words for t in w.token_ids)


@pytest.mark.server
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nar_variant_end_to_end(nar_server, speech, tmp_path, protocol):
    """The NAR ensemble through the client: file and array agree with a direct tritonclient call."""
    from triton_helpers import infer

    url = nar_server.grpc_url if protocol == "grpc" else nar_server.http_url
    path = tmp_path / "speech.flac"
    soundfile.write(path, speech, SAMPLE_RATE)
    expected_text, expected_ids = infer(nar_server.grpc_url, "granite_speech_nar", speech)
    with GraniteSpeechClient(url, protocol) as client:
        from_file = client.transcribe(path, variant="nar", language="de")
        from_array = client.transcribe(speech, sample_rate=SAMPLE_RATE, variant="nar")
        assert client.health().ensembles["granite_speech_nar"] is True
    assert (from_file.text, list(from_file.token_ids)) == (expected_text, expected_ids)
    assert from_array.token_ids == from_file.token_ids and from_file.variant == "nar"
