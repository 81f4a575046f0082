"""`quantserve default-model`: prepare SmolLM2-135M-Instruct offline and print its directory."""
from __future__ import annotations


def add_arguments(p) -> None:
    pass


def run(ns) -> int:
    from quantserve.models.resolve import default_model_path

    print(default_model_path())
    return 0
