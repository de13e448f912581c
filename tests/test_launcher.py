"""The launcher (serving/server.py) and the commands around it: serve, demo, bench and the Makefile.

A newcomer's path: ports checked before anything loads, the start reported model by model, a
Triton started with options that fit the host, and a demo whose output reads as "works".
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from granite_speech_triton.demo import RANDOM_WEIGHTS_NOTE, describe, escape
from granite_speech_triton.serving import server
from granite_speech_triton.serving.repository import ENSEMBLE_FOLDERS, MODELS, DeploySettings, render

ROOT = Path(__file__).resolve().parents[1]
# What Triton logs on a host without a GPU unless it is started with options for one.
GPU_NOISE = ("NVML", "DCGM", "Unable to allocate pinned system memory")
TERMINAL_NOISE = (*GPU_NOISE, "CUDA", "CudaDriverHelper", "model of type", "Traceback")


def command(*args: str | Path) -> subprocess.CompletedProcess:
    """`python -m granite_speech_triton.cli ARGS` from the repository root."""
    argv = [sys.executable, "-m", "granite_speech_triton.cli", *map(str, args)]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)


def port_args(http: int | None = None) -> list[str]:
    """--http-port (`http`, or a free one), --grpc-port and --metrics-port (free ones)."""
    ports = (http or server.free_port(), server.free_port(), server.free_port())
    return [f"--{name}-port={port}" for name, port in zip(("http", "grpc", "metrics"), ports, strict=True)]


@pytest.fixture
def busy_port():
    """A port something listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- ports ---------------------------------------------------------------------------------------


def test_check_ports_names_the_taken_port_and_accepts_free_ones(busy_port):
    free = server.free_port()
    server.check_ports("127.0.0.1", {"HTTP": free})
    for name in ("HTTP", "gRPC", "metrics"):
        ports = {"HTTP": server.free_port(), "gRPC": server.free_port(), "metrics": server.free_port(), name: busy_port}
        with pytest.raises(server.PortError) as error:
            server.check_ports("127.0.0.1", ports)
        message = str(error.value)
        assert f"{name} port {busy_port} on 127.0.0.1 is already in use" in message and "\n" not in message
        assert "HTTP_PORT" in message and "--http-port" in message
    with pytest.raises(server.PortError, match=f"the HTTP and gRPC ports are both {free}"):
        server.check_ports("127.0.0.1", {"HTTP": free, "gRPC": free})
    with socket.socket() as everywhere:  # a listener on every interface blocks loopback too
        everywhere.bind(("0.0.0.0", 0))
        everywhere.listen()
        with pytest.raises(server.PortError, match="already in use"):
            server.check_ports("127.0.0.1", {"HTTP": everywhere.getsockname()[1]})


@pytest.mark.parametrize("subcommand", ["serve", "demo", "bench"])
def test_a_busy_port_is_one_line_before_anything_loads(subcommand, busy_port, tmp_path):
    """The checkpoints do not exist: had anything been resolved or loaded first, the error would say so."""
    missing = tmp_path / "no-such-checkpoint"
    if subcommand == "bench":
        args = ["bench", "--ar-checkpoint", missing, "--audio-dir", tmp_path]
    else:
        args = [subcommand, "--set", f"ar_checkpoint={missing}"]
    done = command(*args, *port_args(busy_port), "--out", tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"error: HTTP port {busy_port} on 127.0.0.1 is already in use"), done.stderr
    assert not (tmp_path / "model_repository").exists() and not (tmp_path / "results.json").exists()


MAKE_TARGETS = {  # target -> what its command line must contain
    "serve": "--http-port 9100 --grpc-port 9101 --metrics-port 9102",
    "demo": "--http-port 9100 --grpc-port 9101 --metrics-port 9102",
    "bench": "--http-port 9100 --grpc-port 9101 --metrics-port 9102",
    "bench-tiny": "--http-port 9100 --grpc-port 9101 --metrics-port 9102",
    "loadtest": "--server 127.0.0.1:9100",
    "soak": "--server 127.0.0.1:9100",
}


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_make_port_variables_reach_every_command(target):
    make = shutil.which("make")
    assert make, "make is needed (the README's commands are make targets)"
    ports = ["HTTP_PORT=9100", "GRPC_PORT=9101", "METRICS_PORT=9102"]
    done = subprocess.run([make, "-n", target, *ports], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.replace("\\\n", " ").splitlines()
    (line,) = [line for line in lines if "granite_speech_triton.cli" in line or "-m loadtest." in line]
    assert MAKE_TARGETS[target] in re.sub(r"\s+", " ", line)


# --- the command Triton is started with ----------------------------------------------------------


def options(**overrides) -> server.ServerOptions:
    """Options with a fixed shared-memory prefix (each server gets a new one by default)."""
    fixed = {"shm_prefix": "gst-1-00000000-"}
    return server.ServerOptions(
        repositories=[Path("/r")],
        build_dir=Path("build"),
        tritonserver=Path("/t"),
        backend_directory=Path("/b"),
        **{**fixed, **overrides},
    )


def test_triton_options_fit_the_host():
    cpu, gpu = options(gpu=False).command(), options(gpu=True).command()
    assert set(server.CPU_HOST_OPTIONS) <= set(cpu) and "--allow-gpu-metrics=false" in cpu
    assert not set(server.CPU_HOST_OPTIONS) & set(gpu)
    assert options(gpu=None).command() == (gpu if server.gpu_present() else cpu)
    for flag in ("http", "grpc", "metrics"):
        assert f"--{flag}-address=0.0.0.0" in options(address="0.0.0.0").command()


# --- startup progress --------------------------------------------------------------------------

LOG_PREFIX = "I1128 04:17:13.184563 9275 model_lifecycle.cc:472] "
FAILURE = (
    "E1128 04:20:34.565720 11838 model_lifecycle.cc:642] \"failed to load 'ar_qformer_projector' version 1: "
    "Internal: CheckpointError: checkpoint is missing tensor 'projector.query' (57 missing)\\n\\nAt:\\n"
    '  /work/granite_speech_triton/model/weights.py(70): load_into\\n"'
)


def test_startup_progress_reports_each_model_from_the_log(tmp_path):
    log = tmp_path / "server.log"
    lines: list[str] = []
    progress = server.StartupProgress(log, lines.append)
    log.write_text(
        f'{LOG_PREFIX}"loading: ar_feature_extractor:1"\n'
        'E1128 04:17:13.182275 9275 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        f"{LOG_PREFIX}\"successfully loaded 'ar_feature_extractor'\"\n"
        f"{LOG_PREFIX}\"successfully loaded 'ar_llm_"  # a line the server is still writing
    )
    progress.poll()
    assert len(lines) == 1 and re.fullmatch(r"  ar_feature_extractor +READY +\d+\.\d s", lines[0])
    with log.open("a") as f:
        f.write(f"decoder'\"\n{FAILURE}\nerror: creating server: Internal - failed to load all models\n")
    progress.poll()
    assert re.fullmatch(r"  ar_llm_decoder +READY +\d+\.\d s", lines[1])
    first_line = "Internal: CheckpointError: checkpoint is missing tensor 'projector.query' (57 missing)"
    assert re.fullmatch(rf"  ar_qformer_projector +FAILED +\d+\.\d s: {re.escape(first_line)} \(log: {log}\)", lines[2])
    assert len(lines) == 3 and progress.ready == ["ar_feature_extractor", "ar_llm_decoder"]
    assert str(progress.failure(1)) == (
        f"tritonserver exited with code 1: 1 model(s) failed to load: ar_qformer_projector; log: {log}"
    )
    assert not progress.listening


def test_without_a_failed_model_the_last_error_line_is_the_cause(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        'E1128 04:27:40.800733 16366 main.cc:257] "failed to start HTTP service: Unavailable - Socket '
        "'127.0.0.1:18630' already in use \"\n"
    )
    progress = server.StartupProgress(log, lambda line: None)
    progress.poll()
    message = str(progress.failure(1))
    assert message.startswith("tritonserver exited with code 1: failed to start HTTP service: Unavailable - Socket")
    assert message.endswith(f"already in use; log: {log}")


def test_a_model_that_fails_to_load_is_named_with_its_error(tiny_ar_checkpoint, tmp_path):
    """A real server, only the projector loaded, from a checkpoint without the projector's tensors."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_ar_checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("projector.")}, broken / "model.safetensors")
    http = server.free_port()
    opts = server.ServerOptions(
        repositories=render(tmp_path / "repository", DeploySettings(ar_checkpoint=str(broken)), ("ar",)),
        build_dir=Path("build"),
        http_port=http,
        grpc_port=server.free_port(),
        metrics_port=server.free_port(),
        model_control_mode="explicit",
        load_models=["ar_qformer_projector"],
    )
    log, lines = tmp_path / "server.log", []
    process = server.start(opts, log)
    try:
        with pytest.raises(server.ServerStartError) as error:
            server.wait_ready(http, process, log, report=lines.append)
    finally:
        server.stop(process)
    (line,) = lines
    assert line.startswith("  ar_qformer_projector") and " FAILED " in line and line.endswith(f"(log: {log})")
    assert "CheckpointError: checkpoint is missing tensor 'projector." in line
    assert str(error.value).endswith(f"1 model(s) failed to load: ar_qformer_projector; log: {log}")


# --- the demo ----------------------------------------------------------------------------------


class Result:  # the fields of granite_speech_client.SpeechResult that the demo prints
    def __init__(self, text: str, tokens: int):
        self.text, self.token_ids, self.audio_seconds, self.latency_s = text, tuple(range(tokens)), 7.4, 0.5


def test_escape_shows_what_a_terminal_would_not():
    assert escape("Héllo, wörld! 日本語") == "Héllo, wörld! 日本語"  # real text stays as it is
    assert escape("a\nb\x1b[2J\ufffdc\td") == "a\\nb\\x1b[2J\\ufffdc\\td"


def test_demo_line_has_token_count_and_escaped_text():
    line = describe("ar", Path("a.wav"), Result("x\ufffd\n" * 60, 200), random_weights=True)
    assert line.startswith("[ar] a.wav: 7.4 s of audio in 0.50 s (RTFx 14.8), 200 tokens: x\\ufffd\\nx")
    assert line.endswith("... (140 more characters)") and line.isprintable()
    assert describe("nar", Path("a.wav"), Result("hello world", 2), random_weights=False).endswith(
        "2 tokens: hello world"
    )


@pytest.mark.server
def test_demo_reports_each_model_then_a_transcript_a_newcomer_can_read(tiny_ar_checkpoint, tmp_path):
    ports = port_args()
    done = command(
        "demo", "--random-weights", "--set", f"ar_checkpoint={tiny_ar_checkpoint}", *ports, "--out", tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    http, grpc, metrics = (p.split("=")[1] for p in ports)
    log_path = tmp_path / "server.log"
    assert (
        lines[0] == f"starting tritonserver on 127.0.0.1 (HTTP {http}, gRPC {grpc}, metrics {metrics}; log: {log_path})"
    )
    ready = [line.split()[0] for line in lines if re.fullmatch(r"  \w+ +READY +\d+\.\d s", line)]
    expected = [*MODELS["ar"], *ENSEMBLE_FOLDERS["ar"]]
    assert sorted(ready) == sorted(expected)
    assert re.fullmatch(rf"server ready: {len(expected)} models in \d+\.\d s", lines[1 + len(expected)])
    transcript = lines[2 + len(expected)]
    assert re.match(
        r"\[ar\] granite_speech_demo\.wav: 7\.4 s of audio in \d+\.\d\d s \(RTFx [\d.]+\), \d+ tokens: ", transcript
    )
    assert transcript.isprintable() and lines[3 + len(expected) :] == [RANDOM_WEIGHTS_NOTE]
    output = done.stdout + done.stderr
    assert not [noise for noise in TERMINAL_NOISE if noise in output], output
    log = log_path.read_text()
    assert "successfully loaded 'ar_llm_decoder'" in log  # the log keeps everything ...
    assert not [noise for noise in GPU_NOISE if noise in log]  # ... but the server was started for a CPU host


@pytest.mark.server
def test_nar_server_log_has_no_model_type_warning(nar_server):
    log = nar_server.log_path.read_text()
    assert "successfully loaded 'nar_head'" in log
    assert "model of type" not in log and not [noise for noise in GPU_NOISE if noise in log]


def test_nar_tokenizer_loads_without_the_model_type_warning(tiny_nar_checkpoint, caplog):
    from transformers import AutoTokenizer

    from granite_speech_triton.model.decoder import load_tokenizer

    with caplog.at_level(logging.WARNING):
        plain = AutoTokenizer.from_pretrained(str(tiny_nar_checkpoint))
    assert "model of type `granite_speech_nar`" in caplog.text  # what transformers says unprompted
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ours = load_tokenizer(tiny_nar_checkpoint)
    assert caplog.text == ""
    assert type(ours) is type(plain) and ours.get_vocab() == plain.get_vocab()
    assert ours.all_special_tokens == plain.all_special_tokens and ours.chat_template == plain.chat_template
    assert ours("hello <|audio|> world")["input_ids"] == plain("hello <|audio|> world")["input_ids"]


# --- bench and cli -------------------------------------------------------------------------------


def test_cli_does_not_import_bench():
    code = "import sys, granite_speech_triton.cli; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", f"import json; {code}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    modules = json.loads(done.stdout)
    assert "granite_speech_triton.cli" in modules and "granite_speech_triton.bench" not in modules
    help_text = command("bench", "--help")
    assert help_text.returncode == 0 and "usage: granite-speech-triton bench" in help_text.stdout
