"""The CLI as an Ollama or llama.cpp user types it (issue 28): one way to name a model, Ollama's verbs,
llama.cpp's flags, grouped help, exit codes, interactive commands, and `serve` + `ps`/`stop` against a
real server in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import click
import httpx
import pytest
from click.testing import CliRunner

from edge_qwen.cli import SECTIONS, main

CLI = [sys.executable, "-m", "edge_qwen.cli"]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, prefix + (name,))


# -- help, exit codes, suggestions (no model) -----------------------------------------------------

def test_every_option_has_help_and_help_is_grouped():
    missing = [f"{' '.join(path)} {p.opts[0]}" for path, cmd in _commands(main) for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not p.help]
    assert missing == []
    r = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert r.exit_code == 0
    for title, members in SECTIONS:
        assert f"\n{title}:\n" in r.output
    assert "list, ls" in r.output and "Environment:" in r.output and "EDGE_QWEN_MODEL" in r.output
    assert not [line for line in r.output.splitlines()[1:] if line.rstrip().endswith("...")]  # none cut short
    for verb in ("run", "list", "ls", "ps", "rm", "show", "cp", "stop"):
        assert verb in main.commands, verb


def test_unknown_command_suggests_the_nearest_and_exits_2():
    r = CliRunner().invoke(main, ["lst"])
    assert r.exit_code == 2 and "Did you mean 'list'?" in r.output
    r = CliRunner().invoke(main, ["serv", "x.gguf"])
    assert r.exit_code == 2 and "Did you mean 'serve'?" in r.output
    r = CliRunner().invoke(main, ["index", "lst"])
    assert r.exit_code == 2 and "Did you mean 'ls'?" in r.output and "index --help` lists the commands" in r.output


def test_usage_errors_exit_2_and_failures_exit_1(tmp_path):
    assert CliRunner().invoke(main, ["chat", "--temp", "3", "hi there"]).exit_code == 2
    assert CliRunner().invoke(main, ["show", "--nope"]).exit_code == 2
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 1 and "missing.gguf" in r.output
    r = CliRunner().invoke(main, ["ps", "--port", "1"])
    assert r.exit_code == 1 and "no edge-qwen server answered at http://127.0.0.1:1" in r.output
    r = CliRunner().invoke(main, ["chat", "a.gguf", "-m", "b.gguf", "hi"])
    assert r.exit_code == 2 and "two models given" in r.output
    r = CliRunner().invoke(main, ["run"])
    assert r.exit_code == 2 and "give the MODEL to run" in r.output


def test_old_flag_meanings_print_one_line_notices(tmp_path):
    r = CliRunner().invoke(main, ["quantize", "--list", "-t", "Q8_0"])
    assert r.exit_code == 0 and "Q4_K_M" in r.stdout
    assert r.stderr == ("note: -t Q8_0 is read as --type Q8_0 for this release only: -t means --threads now, "
                        "as in llama.cpp; write --type Q8_0\n")
    r = CliRunner().invoke(main, ["imatrix", str(tmp_path / "missing.gguf"), "--ctx", "64"])
    assert r.exit_code == 1
    assert "note: imatrix --ctx is now --chunk-size" in r.stderr and "missing.gguf" in r.stderr


def test_model_or_prompt(isolated_home, default_model):
    from edge_qwen.store import model_or_prompt

    assert model_or_prompt("What is 1/2 + 1/3?") == "prompt"
    assert model_or_prompt("你好") == "prompt"
    assert model_or_prompt(str(default_model)) == "model"
    assert model_or_prompt("default") == "model"
    assert model_or_prompt("models/typo.gguf") == "model"
    assert model_or_prompt("Qwen/Qwen2.5-7B-Instruct-GGUF") == "model"
    assert model_or_prompt("hello") == "ambiguous"
    r = CliRunner().invoke(main, ["chat", "hello"])
    assert r.exit_code == 2 and "chat -p 'hello'" in r.output and "edge-qwen list" in r.output


def test_model_named_by_env_says_so(isolated_home):
    r = CliRunner().invoke(main, ["chat", "-p", "hi"], env={"EDGE_QWEN_MODEL": "nope-model"})
    assert r.exit_code == 1 and r.stderr.startswith("Error: EDGE_QWEN_MODEL=nope-model: model 'nope-model'")


def test_server_warns_on_open_host_and_reads_the_key_from_a_file(tmp_path, default_model):
    from edge_qwen.serve.security import exposure_warning, read_api_key_file

    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "k") is None and exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None and exposure_warning("localhost", None) is None
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    assert read_api_key_file(str(key)) == "s3cret"
    with socket.socket() as busy:  # a taken port: serve fails before any model loads, after the warning
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        r = CliRunner().invoke(main, ["serve", str(default_model), "--host", "0.0.0.0", "--port",
                                      str(busy.getsockname()[1])])
    assert r.exit_code == 1 and "warning: --host 0.0.0.0 without an API key" in r.stderr
    assert "cannot listen on 0.0.0.0" in r.stderr
    (tmp_path / "empty").write_text("")
    r = CliRunner().invoke(main, ["serve", str(default_model), "--api-key-file", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "is empty" in r.stderr


# -- the store verbs ------------------------------------------------------------------------------

def test_list_cp_show_inspect_rm(isolated_home, default_model):
    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 0 and "no models in the store yet" in r.output
    r = CliRunner().invoke(main, ["cp", str(default_model), "coder"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["cp", str(default_model), "coder"])
    assert r.exit_code == 1 and "already has a model named 'coder'" in r.output
    r = CliRunner().invoke(main, ["ls"], terminal_width=200)
    assert r.exit_code == 0 and "coder" in r.output and "Q4_K_M" in r.output and "MB" in r.output
    assert f"-> {default_model}" in r.output and "ago" in r.output
    listed = json.loads(CliRunner().invoke(main, ["list", "--json"]).output)
    assert listed[0]["name"] == "coder" and listed[0]["size"] == default_model.stat().st_size
    r = CliRunner().invoke(main, ["inspect", "coder"])
    assert r.exit_code == 0 and "qwen2" in r.output and "bits/weight" in r.output
    r = CliRunner().invoke(main, ["show", "-m", "coder", "--template"])
    assert r.exit_code == 0 and "<|im_start|>" in r.output
    r = CliRunner().invoke(main, ["show", "coder", "--parameters"])
    assert "temperature 0.7" in r.output and 'stop        "<|im_end|>"' in r.output
    r = CliRunner().invoke(main, ["rm", "coder"], input="n\n")
    assert r.exit_code == 0 and "kept coder" in r.output
    r = CliRunner().invoke(main, ["rm", "coder", "--yes"])
    assert r.exit_code == 0 and "deleted coder" in r.output
    assert default_model.is_file()  # only the alias went
    r = CliRunner().invoke(main, ["rm", "coder", "-y"])
    assert r.exit_code == 1 and "no model named 'coder'" in r.output
    r = CliRunner().invoke(main, ["cp", str(default_model), "../evil"])
    assert r.exit_code == 1 and "cannot name a model" in r.output


def test_show_default(default_model):
    r = CliRunner().invoke(main, ["show", "default"])
    assert r.exit_code == 0, r.output
    for needle in ("architecture", "qwen2", "context length", "32768", "Q4_K_M", "license"):
        assert needle in r.output, needle
    r = CliRunner().invoke(main, ["show", "default", "--modelfile"])
    assert r.output.startswith(f"FROM {default_model}") and "PARAMETER temperature 0.7" in r.output


# -- running the real default model ---------------------------------------------------------------

@pytest.mark.slow
def test_run_default_and_llamacpp_flags(default_model):
    r = CliRunner().invoke(main, ["run", "default", "hi", "-n", "8", "-t", "0"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "note: -t 0 is read as --temperature 0" in r.stderr  # the old meaning, one release
    r = CliRunner().invoke(main, ["chat", "-m", str(default_model), "-n", "16", "--temp", "0", "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and r.stderr == ""
    again = CliRunner().invoke(main, ["chat", "-m", str(default_model), "-n", "4", "--temp", "0", "hi"])
    assert again.exit_code == 0 and r.stdout.startswith(again.stdout.strip())  # with -m, one argument is the prompt


@pytest.mark.slow
def test_a_question_alone_goes_to_the_default_model(default_model):
    r = CliRunner().invoke(main, ["chat", "What is 1/2 + 1/3?", "-n", "12", "--temp", "0", "-c", "1024", "-t", "2",
                                  "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"] == default_model.stem and out["content"] and out["usage"]["completion_tokens"] <= 12
    assert "1/2" in out["content"] or "fraction" in out["content"].lower(), out  # it answers the question
    assert "note: -t 2 means --threads 2 now" in r.stderr and "--json-object" in r.stderr


@pytest.mark.slow
def test_interactive_commands(default_model, tmp_path):
    saved = tmp_path / "conv.json"
    lines = "\n".join([
        "/?", "/set temperature 0", "/set top_k x", "/set system Answer with one word.", "/show",
        '"""Name the capital', 'of France."""', f"/save {saved}", "/clear", f"/load {saved}", "/show parameters",
        "/nonsense", "/bye", "never read"]) + "\n"
    r = CliRunner().invoke(main, ["run", str(default_model), "-n", "6", "--verbose"], input=lines)
    assert r.exit_code == 0, r.output
    out = r.output
    assert "/set PARAM VALUE" in out and "Set parameter 'temperature' to '0.0'" in out
    assert "'x' is not a valid top_k" in out and "Set system message." in out
    assert "context length" in out and "Q4_K_M" in out
    assert "Paris" in out and "eval rate:" in out and "prompt eval rate:" in out
    conv = json.loads(saved.read_text())
    assert [m["role"] for m in conv["messages"]] == ["system", "user", "assistant"]
    assert conv["messages"][1]["content"] == "Name the capital\nof France."
    assert "Cleared session context" in out and "Loaded 3 messages" in out
    assert "Unknown command '/nonsense'" in out and "never read" not in out


# -- serve, ps, stop against a real server --------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_ps_stop(default_model, tmp_path):
    import ollama

    port = _free_port()
    key = tmp_path / "key"
    key.write_text("k-123\n")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(CLI + ["serve", "-m", str(default_model), "-c", "2048", "--port", str(port),
                                       "--api-key-file", str(key), "--parallel", "1", "--quiet"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        name = default_model.stem
        cli = CliRunner()
        r = cli.invoke(main, ["ps", "--port", str(port), "--api-key", "k-123"])
        assert r.exit_code == 0, r.output
        assert name in r.stdout and "2048" in r.stdout and "Q4_K_M" in r.stdout
        r = cli.invoke(main, ["ps", "--port", str(port)])
        assert r.exit_code == 1 and "needs an API key" in r.stderr
        # The official ollama client sees the same.
        client = ollama.Client(host=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k-123"})
        assert [m.model for m in client.ps().models] == [name]
        env = {"EDGE_QWEN_API_KEY": "k-123"}
        r = cli.invoke(main, ["stop", name, "--port", str(port)], env=env)
        assert r.exit_code == 0 and f"stopped {name}" in r.stdout, r.output
        r = cli.invoke(main, ["ps", "--port", str(port), "--json"], env=env)
        assert json.loads(r.stdout) == []
        r = cli.invoke(main, ["stop", "nope", "--port", str(port)], env=env)
        assert r.exit_code == 1 and "'nope' is not served here" in r.stderr
        # The next request loads it again.
        reply = client.chat(model=name, messages=[{"role": "user", "content": "hi"}],
                            options={"num_predict": 4, "temperature": 0})
        assert reply.message.content
        assert [m.model for m in client.ps().models] == [name]
        assert client.ps().models[0].context_length == 2048
    finally:
        proc.terminate()
        proc.wait(timeout=30)
