"""The `granite-speech` command line, run in a subprocess against the real test server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from granite_speech_client import GraniteSpeechClient

from granite_speech_triton.serving.server import free_port

pytestmark = pytest.mark.server
NEW_TOKENS = "8"


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "granite_speech_client", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)  # a hang guard, not a speed bar


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli")
    paths = {name: folder / f"{name}.wav" for name in ("one", "two", "silent", "corrupt")}
    subprocess.run(["espeak-ng", "-w", paths["one"], "one small step for a man"], check=True)
    subprocess.run(["espeak-ng", "-w", paths["two"], "the rain in spain stays mainly in the plain"], check=True)
    soundfile.write(paths["silent"], np.zeros(16_000, np.float32), 16_000)
    paths["corrupt"].write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    return paths


def test_transcribe_json_lines_in_input_order(ar_server, files):
    done = cli(
        "transcribe", files["two"], files["one"], "--server", ar_server.grpc_url, "--json", "--max-new-tokens", "4"
    )
    done_http = cli(
        "transcribe", files["two"], "--server", ar_server.http_url, "--protocol", "http", "--max-new-tokens", NEW_TOKENS
    )
    assert done.returncode == 0 and done_http.returncode == 0, done.stderr + done_http.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(files["two"]), str(files["one"])]
    with GraniteSpeechClient(ar_server.grpc_url) as client:
        for line in lines:
            expected = client.transcribe(line["file"], max_new_tokens=4)
            assert line["ok"] and line["text"] == expected.text and tuple(line["token_ids"]) == expected.token_ids
            assert line["variant"] == "ar" and line["task"] == "transcribe" and line["audio_seconds"] > 1
        short = client.transcribe(files["two"], max_new_tokens=int(NEW_TOKENS))
    assert done_http.stdout == short.text + "\n"  # one file, plain text: just the transcript


def test_translate_and_progress_bar(ar_server, files):
    done = cli(
        "translate", files["one"], files["two"], "--to", "fr", "--punctuate", "--server", ar_server.grpc_url,
        "--max-new-tokens", NEW_TOKENS, "--progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with GraniteSpeechClient(ar_server.grpc_url) as client:
        texts = [
            client.translate(f, target_language="fr", punctuate=True, max_new_tokens=int(NEW_TOKENS)).text
            for f in (files["one"], files["two"])
        ]
    assert done.stdout.splitlines() == [f"{files['one']}: {texts[0]}", f"{files['two']}: {texts[1]}"]
    assert "2/2 files, 0 failed" in done.stderr


def test_exit_codes_per_failure_class(ar_server, files):
    server = ("--server", ar_server.grpc_url, "--max-new-tokens", NEW_TOKENS)
    closed = ("--server", f"127.0.0.1:{free_port()}", "--retries", "0")
    cases = [
        (("transcribe", files["one"], "--language", "xx", *server), 2, "invalid choice: 'xx'"),
        (("translate", files["one"], "--to", "en", *server), 2, "equals the source language"),
        (("transcribe", files["one"], "--variant", "nar", "--punctuate", *server), 2, "only supported by variant 'ar'"),
        (("transcribe", files["one"], *closed), 3, "is unreachable"),
        (("transcribe", files["one"], "--variant", "nar", "--server", ar_server.grpc_url), 4, "granite_speech_nar"),
        (("transcribe", files["corrupt"], *server), 5, "not a readable audio file"),
        (("transcribe", files["one"].with_name("missing.wav"), *server), 5, "no such file"),
        (("transcribe", files["one"], "--max-new-tokens", "1000", *server[:2]), 6, "MAX_NEW_TOKENS must be in 1..256"),
        (("transcribe", files["one"], files["silent"], files["corrupt"], *server), 1, "not a readable audio file"),
    ]
    for args, code, message in cases:
        done = cli(*args)
        assert done.returncode == code, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)


def test_silent_file_is_an_empty_result(ar_server, files):
    plain = cli("transcribe", files["silent"], "--server", ar_server.grpc_url)
    assert (plain.returncode, plain.stdout, plain.stderr) == (0, "\n", "")
    as_json = cli("transcribe", files["silent"], files["one"], "--server", ar_server.grpc_url, "--json")
    silent, spoken = (json.loads(line) for line in as_json.stdout.splitlines())
    assert as_json.returncode == 0, as_json.stderr
    assert silent["ok"] and (silent["text"], silent["token_ids"]) == ("", []) and spoken["token_ids"]


def test_partial_failure_reports_each_file(ar_server, files):
    done = cli(
        "transcribe", files["one"], files["corrupt"], "--server", ar_server.grpc_url, "--json", "--max-new-tokens", "4"
    )
    assert done.returncode == 1
    good, bad = (json.loads(line) for line in done.stdout.splitlines())
    assert good["ok"] and good["file"] == str(files["one"]) and good["text"]
    assert bad == {
        "file": str(files["corrupt"]),
        "ok": False,
        "error": bad["error"],
        "error_type": "AudioInputError",
        "exit_code": 5,
    }
    assert "not a readable audio file" in bad["error"]


def test_health(ar_server):
    done = cli("health", "--server", ar_server.http_url, "--protocol", "http")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"server {ar_server.http_url}: live yes, ready yes",
        "granite_speech (ar): ready",
        "granite_speech_nar (nar): not ready",
    ]
    as_json = cli("health", "--server", ar_server.grpc_url, "--json", "--variant", "nar")
    assert as_json.returncode == 4
    assert json.loads(as_json.stdout)["ensembles"] == {"granite_speech": True, "granite_speech_nar": False}
    unreachable = cli("health", "--server", f"127.0.0.1:{free_port()}", "--retries", "0")
    assert unreachable.returncode == 3 and "is unreachable" in unreachable.stderr


def test_deep_health_sends_a_request_through_every_ready_pipeline(ar_server):
    done = cli("health", "--deep", "--server", ar_server.grpc_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"server {ar_server.grpc_url}: live yes, ready yes"
    assert re.fullmatch(r"granite_speech \(ar\): ready, answered in \d+\.\d\d s", lines[1])
    assert lines[2] == "granite_speech_nar (nar): not ready"  # not deployed on this server: fine
    assert re.fullmatch(r"granite_speech_stream \(ar, streaming\): ready, answered in \d+\.\d\d s", lines[3])
    required = cli(
        "health", "--deep", "--variant", "nar", "--json", "--server", ar_server.http_url, "--protocol", "http"
    )
    assert required.returncode == 4, "the asked variant is not served"
    pipelines = json.loads(required.stdout)["pipelines"]
    assert pipelines["granite_speech"]["ok"] and pipelines["granite_speech_stream"]["ok"]
    assert pipelines["granite_speech_nar"] == {"ready": False, "seconds": None, "busy": False, "error": "", "ok": False}


def test_help_documents_exit_codes():
    done = cli("transcribe", "--help")
    assert done.returncode == 0
    for line in ("3  server unreachable", "4  model (ensemble) not ready", "5  bad input file", "6  server rejected"):
        assert line in done.stdout
    assert cli("transcribe").returncode == 2  # no files: usage error


def test_stream_prints_the_text_as_it_grows(ar_server, files):
    done = cli("transcribe", files["one"], "--stream", "--server", ar_server.grpc_url, "--max-new-tokens", NEW_TOKENS)
    as_json = cli(
        "translate", files["two"], "--to", "de", "--stream", "--json", "--server", ar_server.http_url,
        "--protocol", "http", "--max-new-tokens", NEW_TOKENS,
    )  # fmt: skip
    assert done.returncode == 0 and as_json.returncode == 0, done.stderr + as_json.stderr
    with GraniteSpeechClient(ar_server.grpc_url) as client:
        text = client.transcribe(files["one"], max_new_tokens=int(NEW_TOKENS)).text
        translation = client.translate(files["two"], target_language="de", max_new_tokens=int(NEW_TOKENS))
    assert done.stdout == text + "\n"
    updates = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(updates) >= 2 and [u["final"] for u in updates] == [False] * (len(updates) - 1) + [True]
    assert updates[-1]["text"] == translation.text and tuple(updates[-1]["token_ids"]) == translation.token_ids
    nar = cli("transcribe", files["one"], "--stream", "--variant", "nar", "--server", ar_server.grpc_url)
    assert nar.returncode == 2 and "--stream needs variant 'ar'" in nar.stderr
