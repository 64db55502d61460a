"""What `sllm fn deploy` checks before it talks to the gateway: the yaml, the model source,
the handler module; and the request it builds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sllm.errors import InvalidInput, ValidationFailed
from sllm_cli import deploy
from sllm_cli.fn import invoke_body

from .conftest import RunCli


def write_function(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "function.yaml").write_text(body)
    return folder


def hf_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_yaml_errors_name_key_and_line(tmp_path: Path) -> None:
    folder = write_function(tmp_path / "f", "name: ok\nmodel: ./m\nscale:\n  mni: 1\n")
    with pytest.raises(ValidationFailed) as info:
        deploy.load_function(folder)
    assert "scale.mni (line 4): unknown key" in info.value.message
    assert str(folder / "function.yaml") in info.value.message
    write_function(tmp_path / "g", "name: ok\nmodel: ./m\ngeneration:\n  max_tokens: lots\n")
    with pytest.raises(ValidationFailed, match=r"generation.max_tokens \(line 4\): expected int"):
        deploy.load_function(tmp_path / "g" / "function.yaml")


def test_missing_yaml_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"function\.yaml: no such file"):
        deploy.load_function(tmp_path)


def test_model_resolves_relative_to_the_yaml(tmp_path: Path) -> None:
    hf_dir(tmp_path / "models" / "tiny")
    folder = write_function(tmp_path / "fn", "name: a\nmodel: ../models/tiny\n")
    source = deploy.resolve_model(deploy.load_function(folder))
    assert source == deploy.ModelSource("hf", (tmp_path / "models" / "tiny").resolve())


def test_missing_model_names_the_path(tmp_path: Path) -> None:
    folder = write_function(tmp_path / "fn", "name: a\nmodel: ./nowhere\n")
    with pytest.raises(InvalidInput, match=r"model: './nowhere' does not exist") as info:
        deploy.resolve_model(deploy.load_function(folder))
    assert str(folder / "nowhere") in info.value.message


def test_model_kinds(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert deploy.classify_model_path(gguf, "model").kind == "gguf"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "index.json").write_text("{}")
    assert deploy.classify_model_path(ckpt, "model").kind == "sllm"
    folder_with_gguf = tmp_path / "gg"
    folder_with_gguf.mkdir()
    (folder_with_gguf / "x.gguf").write_bytes(b"GGUF")
    assert deploy.classify_model_path(folder_with_gguf, "model").path.name == "x.gguf"
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InvalidInput, match=r"not a \.gguf model"):
        deploy.classify_model_path(tmp_path / "notes.txt", "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="holds no model"):
        deploy.classify_model_path(tmp_path / "empty", "model")


def test_package_models() -> None:
    # PyYAML is a base dependency, so its files are always there to glob.
    found = deploy.resolve_package_model("package://PyYAML/yaml/__init__.py", "model")
    assert found.name == "__init__.py" and found.is_file()
    with pytest.raises(InvalidInput, match="not installed"):
        deploy.resolve_package_model("package://no-such-dist-xyz/*.gguf", "model")
    with pytest.raises(InvalidInput, match="no file matching"):
        deploy.resolve_package_model("package://PyYAML/*.gguf", "model")
    with pytest.raises(InvalidInput, match="several files"):
        deploy.resolve_package_model("package://PyYAML/*.py", "model")
    with pytest.raises(InvalidInput, match="must look like"):
        deploy.resolve_package_model("package://PyYAML", "model")


def test_remote_models_are_refused_clearly(tmp_path: Path) -> None:
    folder = write_function(tmp_path / "fn", "name: a\nmodel: s3://bucket/m\n")
    with pytest.raises(InvalidInput, match="local path or package://"):
        deploy.resolve_model(deploy.load_function(folder))


def test_handler_sources_ship_python_files_only_for_custom_handlers(tmp_path: Path) -> None:
    folder = write_function(tmp_path / "fn", "name: a\nmodel: ./m\nhandler: pkg.main:handle\n")
    with pytest.raises(InvalidInput, match=r"module 'pkg.main' not found .*pkg/main.py"):
        deploy.handler_sources(deploy.load_function(folder))
    (folder / "pkg").mkdir()
    (folder / "pkg" / "main.py").write_text("def handle(r, c): return r\n")
    (folder / "helpers.py").write_text("X = 1\n")
    (folder / "pkg" / "__pycache__").mkdir()
    (folder / "pkg" / "__pycache__" / "junk.py").write_text("")
    (folder / "README.md").write_text("not code")
    sources = deploy.handler_sources(deploy.load_function(folder))
    assert sources == {"helpers.py": "X = 1\n", "pkg/main.py": "def handle(r, c): return r\n"}
    builtin = write_function(tmp_path / "b", "name: b\nmodel: ./m\nhandler: chat\n")
    assert deploy.handler_sources(deploy.load_function(builtin)) == {}


def test_oversized_handler_sources_are_refused(tmp_path: Path) -> None:
    folder = write_function(tmp_path / "fn", "name: a\nmodel: ./m\nhandler: h:handle\n")
    (folder / "h.py").write_text("x = '" + "a" * (deploy.MAX_HANDLER_SOURCE_BYTES + 1) + "'\n")
    with pytest.raises(ValidationFailed, match="exceed 512 KiB"):
        deploy.handler_sources(deploy.load_function(folder))


def test_fingerprint_changes_with_the_files(tmp_path: Path) -> None:
    model = hf_dir(tmp_path / "m")
    source = deploy.ModelSource("hf", model)
    first = deploy.source_fingerprint(source)
    assert deploy.source_fingerprint(source) == first
    (model / "config.json").write_text('{"hidden_size": 8}')
    assert deploy.source_fingerprint(source) != first


def test_key_and_body() -> None:
    assert deploy.checkpoint_key("chat", "0123456789abcdef") == "checkpoints/chat/0123456789abcdef"
    from sllm.spec import FunctionSpec

    spec = FunctionSpec(name="chat", model="./m")
    body = deploy.deploy_body(spec, "checkpoints/chat/0123456789abcdef", 42, {})
    assert body["spec"]["name"] == "chat" and body["checkpoint_bytes"] == 42
    assert FunctionSpec.from_dict(body["spec"]) == spec


def test_requirements_travel_with_the_function(tmp_path: Path) -> None:
    folder = deploy.load_function(write_function(tmp_path, "name: fmt\nmodel: ./m\n"))
    assert deploy.requirements_text(folder) == ""
    (tmp_path / "requirements.txt").write_text("# formatting\nhumanize==4.12.3\n")
    text = deploy.requirements_text(folder)
    assert text == "# formatting\nhumanize==4.12.3\n"
    body = deploy.deploy_body(folder.spec, "checkpoints/fmt/0123456789abcdef", 1, {}, text)
    assert body["requirements"] == text
    (tmp_path / "requirements.txt").write_text("x" * (1 << 20))
    with pytest.raises(ValidationFailed, match=r"requirements\.txt: larger than"):
        deploy.requirements_text(folder)


def test_local_store_of_a_remote_gateway_is_refused(tmp_path: Path) -> None:
    deploy.check_store_reachable("s3://bucket/p", "http://gw.example:8080")
    deploy.check_store_reachable("/nonexistent/store", "http://127.0.0.1:8080")
    deploy.check_store_reachable(str(tmp_path), "http://gw.example:8080")  # a shared mount
    with pytest.raises(InvalidInput, match="cannot reach"):
        deploy.check_store_reachable("/nonexistent/store", "http://gw.example:8080")


def args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {
        "json": False,
        "no_stream": False,
        "max_tokens": None,
        "temperature": None,
        "seed": None,
    }
    return argparse.Namespace(**(base | kw))


def test_invoke_bodies() -> None:
    assert invoke_body("chat", "Hi there\n", args()) == {
        "messages": [{"role": "user", "content": "Hi there"}],
        "stream": True,
    }
    assert invoke_body("completion", "Once", args(no_stream=True, max_tokens=5, seed=1)) == {
        "prompt": "Once",
        "stream": False,
        "max_tokens": 5,
        "seed": 1,
    }
    assert invoke_body("h:handle", '{"text": "x", "stream": false}', args(json=True)) == {
        "text": "x",
        "stream": False,
    }
    assert invoke_body("h:handle", '{"text": "x"}', args(json=True)) == {"text": "x"}
    assert invoke_body("h:handle", '{"text": "x"}', args(json=True, no_stream=True)) == {
        "text": "x",
        "stream": False,
    }
    with pytest.raises(InvalidInput, match="not valid JSON"):
        invoke_body("h:handle", "{nope", args(json=True))
    with pytest.raises(InvalidInput, match="must be a JSON object"):
        invoke_body("h:handle", "[1]", args(json=True))


def test_deploy_cli_reports_bad_input_without_a_gateway(run_cli: RunCli, tmp_path: Path) -> None:
    folder = write_function(tmp_path / "fn", "name: a\nmodel: ./missing\n")
    code, _, err = run_cli("fn", "deploy", "-f", str(folder), "--url", "http://127.0.0.1:9")
    assert code == 1 and "does not exist" in err and err.count("\n") == 1


def test_commands_without_gateway_say_how_to_start_it(run_cli: RunCli) -> None:
    from sllm_cli.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["fn", "list"], ["fn", "describe", "x"], ["nodes"], ["fn", "remove", "x"]):
        code, out, err = run_cli(*argv, "--url", url)
        assert code == 1 and out == "", argv
        assert err.startswith("sllm: error: no gateway is answering at " + url), argv
        assert "sllm up" in err and err.count("\n") == 1, argv


def test_scale_refuses_negative_replicas(run_cli: RunCli) -> None:
    code, _, err = run_cli("fn", "scale", "chat", "-1", "--url", "http://127.0.0.1:9")
    assert code == 1 and "REPLICAS: must be >= 0, got -1" in err
