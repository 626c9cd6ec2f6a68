"""Loads a config file by path, as the launch scripts' --config flag does (variants after ':')."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_config(spec: str):
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('bench_config', REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)
