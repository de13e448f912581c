"""`granite-speech-triton`: render repositories, serve, run the demo, make tiny checkpoints.

    granite-speech-triton render --out build/repository --set ar_checkpoint=DIR ...
    granite-speech-triton serve  --set ar_checkpoint=DIR [--variants ar,nar]
    granite-speech-triton demo   --set ar_checkpoint=DIR --audio samples/hello.wav
    granite-speech-triton make-checkpoint build/tiny-ar [--nar] [--size tiny|reduced|real]
    granite-speech-triton export --checkpoint DIR --variant ar|nar --out build/libtorch [--device cuda --dtype bfloat16]
    granite-speech-triton bench  --tiny | --device cuda --dtype bfloat16 [--concurrency 1,8,32]

Every `--set key=value` is a DeploySettings field (see serving/repository.py); unknown keys
are rejected. Environment variables GST_<KEY> (e.g. GST_DEVICE=cuda) set defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from dataclasses import fields
from pathlib import Path

from .serving import server
from .serving.repository import VARIANTS, DeploySettings, render

ENV_PREFIX = "GST_"


def settings_from(pairs: list[str]) -> DeploySettings:
    """DeploySettings from GST_* environment variables, overridden by --set key=value pairs."""
    names = {f.name for f in fields(DeploySettings)}
    values = {n: os.environ[ENV_PREFIX + n.upper()] for n in names if ENV_PREFIX + n.upper() in os.environ}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        values[key] = value
    try:
        return DeploySettings.from_strings(values)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def parse_variants(text: str) -> tuple[str, ...]:
    variants = tuple(v.strip() for v in text.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        raise argparse.ArgumentTypeError(f"variants must be a comma-separated subset of {','.join(VARIANTS)}")
    return variants


def add_deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a DeploySettings field")
    parser.add_argument("--variants", type=parse_variants, default=("ar",), help="ar, nar or ar,nar (default ar)")
    parser.add_argument("--out", type=Path, default=Path("build/repository"), help="rendered repositories")


def cmd_render(args: argparse.Namespace) -> int:
    for folder in render(args.out, settings_from(args.set), args.variants):
        print(folder)
    return 0


def server_options(args: argparse.Namespace, repositories: list[Path]) -> server.ServerOptions:
    return server.ServerOptions(
        repositories=repositories,
        build_dir=Path("build"),
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        address=args.address,
        tritonserver=args.tritonserver,
        backend_directory=args.backend_directory,
        backend_config=args.backend_config,
    )


def resolved(settings: DeploySettings, variants: tuple[str, ...]) -> DeploySettings:
    """Settings whose checkpoints are local directories: hub ids are downloaded once, here,
    instead of by every model instance, and an unreachable hub fails before the server starts."""
    from .model.errors import CheckpointError
    from .model.weights import resolve_checkpoint

    paths = {}
    try:
        if "ar" in variants:
            paths["ar_checkpoint"] = str(resolve_checkpoint(settings.ar_checkpoint))
        if "nar" in variants:
            paths["nar_checkpoint"] = str(resolve_checkpoint(settings.nar_checkpoint, settings.nar_revision or None))
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}\n(no network? `make demo-tiny` runs on tiny random checkpoints)") from exc
    return dataclasses.replace(settings, **paths)


def cmd_serve(args: argparse.Namespace) -> int:
    repositories = render(args.out, resolved(settings_from(args.set), args.variants), args.variants)
    options = server_options(args, repositories)
    os.execvpe(options.command()[0], options.command(), options.environment())
    return 1  # not reached


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    repositories = render(args.out, resolved(settings_from(args.set), args.variants), args.variants)
    options = server_options(args, repositories)
    return run_demo(options, args.audio, args.variants, Path(args.out) / "server.log")


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from . import tiny

    maker = tiny.make_nar_checkpoint if args.nar else tiny.make_ar_checkpoint
    print(maker(args.out, tiny.SIZES[args.size]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granite-speech-triton", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render_p = sub.add_parser("render", help="fill the Triton templates into a servable folder")
    add_deploy_arguments(render_p)
    render_p.set_defaults(func=cmd_render)
    for name, func, help_text in (
        ("serve", cmd_serve, "render, then run tritonserver in the foreground"),
        ("demo", cmd_demo, "render, start tritonserver, transcribe an audio file, stop"),
    ):
        p = sub.add_parser(name, help=help_text)
        add_deploy_arguments(p)
        p.add_argument("--http-port", type=int, default=8000)
        p.add_argument("--grpc-port", type=int, default=8001)
        p.add_argument("--metrics-port", type=int, default=8002)
        p.add_argument("--address", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
        p.add_argument(
            "--backend-config", action="append", default=[], metavar="BACKEND,KEY=VALUE", help="tritonserver option"
        )
        p.add_argument("--tritonserver", type=Path, default=None, help="server binary (default: nvidia-pytriton's)")
        p.add_argument("--backend-directory", type=Path, default=None, help="Triton backends folder")
        p.set_defaults(func=func)
    sub.choices["demo"].add_argument("--audio", type=Path, default=Path("samples/granite_speech_demo.wav"))
    tiny_p = sub.add_parser(
        "make-checkpoint",
        aliases=["make-tiny-checkpoint"],
        help="write a random-weight checkpoint in the real layout (meaningless output)",
    )
    tiny_p.add_argument("out", type=Path)
    tiny_p.add_argument("--nar", action="store_true", help="the NAR layout instead of the AR one")
    tiny_p.add_argument(
        "--size", choices=("tiny", "reduced", "real"), default="tiny", help="real: the 2b dimensions, ~4.5 GB bf16"
    )
    tiny_p.set_defaults(func=cmd_make_checkpoint)
    # Listed for --help only: `main` hands `export ...` to export.main, whose parser needs torch imported.
    sub.add_parser("export", help="TorchScript of the encoder, projectors, NAR head for Triton's PyTorch backend")
    from . import bench  # here, not at the top: bench imports this module

    bench_p = sub.add_parser("bench", help="benchmark: in-process reference vs Triton at several concurrencies")
    bench.add_arguments(bench_p)
    bench_p.set_defaults(func=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        from .export import main as export_main

        return export_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
