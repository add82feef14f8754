"""`answerfirst export onnx|gguf|openvino`: dispatch to the exporter of each format."""

from __future__ import annotations

import argparse
import importlib

FORMATS = {"onnx": "answerfirst.export.onnx", "gguf": "answerfirst.export.gguf", "openvino": "answerfirst.export.openvino"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    formats = parser.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    for name, module in FORMATS.items():
        label = "OpenVINO IR" if name == "openvino" else name.upper()
        importlib.import_module(module).add_arguments(formats.add_parser(name, help=f"export to {label}"))


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(FORMATS[args.export_format]).run(args)
