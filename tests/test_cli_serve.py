"""The tutorials' server commands parse as written (flags with dashes, underscores or pasted en dashes)."""
from __future__ import annotations

from quantserve.cli.args import engine_config
from quantserve.cli.main import build_parser


def parse(line: str):
    return build_parser().parse_args(line.split()[1:])


def test_homework_command():
    ns = parse("quantserve serve api_server /m --model-format hf --quant-policy 4 --cache-max-entry-count 0.4 "
               "--server-name 0.0.0.0 --server-port 23333 --tp 1")
    cfg = engine_config(ns)
    assert (ns.model_path, ns.server_name, ns.server_port) == (["/m"], "0.0.0.0", 23333)
    assert (cfg.quant_policy, cfg.cache_max_entry_count, cfg.tp, cfg.model_format) == (4, 0.4, 1, "hf")


def test_old_tutorial_flags_with_underscores_and_instance_num():
    ns = parse("quantserve serve api_server ./workspace --server_name 0.0.0.0 --server_port 23333 --instance_num 64 --tp 1")
    assert ns.server_port == 23333 and engine_config(ns).max_batch_size == 64


def test_flags_pasted_with_en_dashes():
    ns = parse("quantserve serve api_server /m –model-format hf –quant-policy 4 –cache-max-entry-count 0.4 "
               "–server-name 0.0.0.0 –server-port 23333 –tp 1")
    assert ns.quant_policy == 4 and ns.server_port == 23333 and ns.model_path == ["/m"]


def test_api_client_command():
    ns = parse("quantserve serve api_client http://localhost:23333 --api-key k")
    assert (ns.serve_command, ns.api_server_url, ns.api_key) == ("api_client", "http://localhost:23333", "k")


def test_gradio_commands():
    client = parse("quantserve serve gradio http://localhost:23333 --server-name 0.0.0.0 --server-port 6006")
    assert (client.serve_command, client.model_path, client.server_port) == ("gradio", "http://localhost:23333", 6006)
    local = parse("quantserve serve gradio /m --quant-policy 8")
    assert local.model_path == "/m" and engine_config(local).quant_policy == 8 and local.server_port == 6006


def test_several_models_by_path_by_name_and_from_a_models_directory(tmp_path):
    import pytest

    from quantserve.cli.serve import served_models
    from quantserve.config import ConfigError

    for name in ("m1", "m2"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "config.json").write_text("{}")
    m1, m2 = str(tmp_path / "models" / "m1"), str(tmp_path / "models" / "m2")
    assert served_models(parse(f"quantserve serve api_server {m1} {m2} --model-name a b")) == [("a", m1), ("b", m2)]
    assert served_models(parse(f"quantserve serve api_server {tmp_path / 'models'}")) == [("m1", m1), ("m2", m2)]
    assert served_models(parse("quantserve serve api_server")) == [("SmolLM2-135M-Instruct", None)]
    for line, field in ((f"quantserve serve api_server {m1} {m2} --model-name a", "model_name"),
                        (f"quantserve serve api_server {m1} {m2} --model-name a a", "model_name"),
                        ("quantserve serve api_server /nowhere", None)):
        with pytest.raises(ConfigError) as e:
            served_models(parse(line))
        assert e.value.field == field
