"""Common client libraries against a real `edge-qwen serve` on the default model: which calls work.

    pip install openai langchain-openai ollama instructor "pydantic-ai-slim[openai]" llm litellm
    python benchmarks/check_clients.py

Starts the server in this process (ServerThread), runs each check as a user of that library
would write it (temperature 0, short replies) and prints one Markdown table: client, check,
pass/fail and the first line of the error. A library that is not installed is reported as such.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
Q = [{"role": "user", "content": "What's the weather in Paris?"}]


class City(BaseModel):
    name: str
    country: str


class User(BaseModel):
    name: str
    age: int


def checks(url: str) -> list[tuple[str, str, Callable[[], Any]]]:
    v1 = f"{url}/v1"
    out: list[tuple[str, str, Callable[[], Any]]] = []

    def add(client: str, name: str):
        def deco(fn):
            out.append((client, name, fn))
            return fn
        return deco

    def oa():
        import openai

        return openai.OpenAI(base_url=v1, api_key="unused", max_retries=0, timeout=300)

    @add("openai", "chat")
    def _():
        assert oa().chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": "Say hi."}],
                                            temperature=0, max_tokens=10).choices[0].message.content

    @add("openai", "stream + usage")
    def _():
        chunks = list(oa().chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": "Say hi."}],
                                                   temperature=0, max_tokens=10, stream=True,
                                                   stream_options={"include_usage": True}))
        assert chunks[-1].usage and chunks[-1].usage.completion_tokens > 0

    @add("openai", "json_schema")
    def _():
        r = oa().chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": "Paris as JSON"}],
                                         temperature=0, max_tokens=120, response_format={
                                             "type": "json_schema", "json_schema": {"name": "city", "strict": True,
                                                                                    "schema": {**City.model_json_schema(),
                                                                                               "additionalProperties": False}}})
        City.model_validate_json(r.choices[0].message.content)

    @add("openai", "chat.completions.parse")
    def _():
        r = oa().chat.completions.parse(model="qwen2.5", messages=[{"role": "user", "content": "Paris, as a city"}],
                                        temperature=0, max_tokens=40, response_format=City)
        assert isinstance(r.choices[0].message.parsed, City)

    @add("openai", "models")
    def _():
        assert [m.id for m in oa().models.list()]

    @add("openai", "tools auto")
    def _():
        r = oa().chat.completions.create(model="qwen2.5", messages=Q, tools=[WEATHER], temperature=0, max_tokens=60)
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"]

    @add("openai", "tools named, streamed")
    def _():
        s = oa().chat.completions.create(model="qwen2.5", messages=Q, tools=[WEATHER], temperature=0, max_tokens=60,
                                         stream=True, tool_choice={"type": "function",
                                                                   "function": {"name": "get_weather"}})
        args = "".join(d.function.arguments or "" for c in s if c.choices for d in c.choices[0].delta.tool_calls or [])
        assert json.loads(args)["city"]

    @add("openai", "tools required")
    def _():
        r = oa().chat.completions.create(model="qwen2.5", messages=Q, tools=[WEATHER], temperature=0, max_tokens=60,
                                         tool_choice="required")
        assert r.choices[0].finish_reason == "tool_calls"
        assert json.loads(r.choices[0].message.tool_calls[0].function.arguments)["city"]

    @add("openai", "logprobs")
    def _():
        r = oa().chat.completions.create(model="qwen2.5", messages=[{"role": "user", "content": "Say hi."}],
                                         temperature=0, max_tokens=5, logprobs=True, top_logprobs=2)
        assert r.choices[0].logprobs.content and len(r.choices[0].logprobs.content[0].top_logprobs) == 2

    @add("openai", "responses.create")
    def _():
        assert oa().responses.create(model="qwen2.5", input="Say hi.", max_output_tokens=16).output_text

    @add("openai", "completions.create")
    def _():
        assert oa().completions.create(model="qwen2.5", prompt="def add(a, b):", max_tokens=10, temperature=0,
                                       suffix="\n").choices[0].text

    @add("openai", "embeddings.create")
    def _():
        assert len(oa().embeddings.create(model="qwen2.5", input="hi").data[0].embedding) > 0

    def lc():
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(base_url=v1, api_key="unused", model="qwen2.5", temperature=0, max_tokens=60, max_retries=0)

    @add("langchain-openai", "invoke")
    def _():
        assert lc().invoke("Say hi.").content

    @add("langchain-openai", "stream")
    def _():
        assert "".join(c.content for c in lc().stream("Say hi."))

    @add("langchain-openai", "with_structured_output (json_schema)")
    def _():
        assert isinstance(lc().with_structured_output(City, method="json_schema").invoke("Paris"), City)

    @add("langchain-openai", "bind_tools")
    def _():
        class GetWeather(BaseModel):
            """Get the current weather in a city."""

            city: str

        assert lc().bind_tools([GetWeather]).invoke("What's the weather in Paris?").tool_calls

    @add("langchain-openai", "with_structured_output (function_calling)")
    def _():
        assert isinstance(lc().with_structured_output(User, method="function_calling").invoke("Ann is 30."), User)

    for mode in ("JSON", "JSON_SCHEMA", "TOOLS"):
        def ins(mode=mode):
            import instructor

            client = instructor.from_openai(oa(), mode=getattr(instructor.Mode, mode))
            u = client.chat.completions.create(model="qwen2.5", response_model=User, temperature=0, max_tokens=60,
                                               messages=[{"role": "user", "content": "Ann is 30 years old."}])
            assert isinstance(u, User)
        out.append(("instructor", f"Mode.{mode}", ins))

    def pai(output_type: Any = str, responses: bool = False):
        from pydantic_ai import Agent
        from pydantic_ai.providers.openai import OpenAIProvider

        provider = OpenAIProvider(base_url=v1, api_key="unused")
        if responses:
            from pydantic_ai.models.openai import OpenAIResponsesModel

            model = OpenAIResponsesModel("qwen2.5", provider=provider)
        else:
            try:
                from pydantic_ai.models.openai import OpenAIChatModel as Chat
            except ImportError:
                from pydantic_ai.models.openai import OpenAIModel as Chat
            model = Chat("qwen2.5", provider=provider)
        return Agent(model, output_type=output_type, model_settings={"temperature": 0, "max_tokens": 80})

    @add("pydantic-ai", "text")
    def _():
        assert pai().run_sync("Say hi.").output

    @add("pydantic-ai", "tool output (default)")
    def _():
        assert isinstance(pai(City).run_sync("Paris is the capital of France.").output, City)

    @add("pydantic-ai", "NativeOutput")
    def _():
        from pydantic_ai import NativeOutput

        assert isinstance(pai(NativeOutput(City)).run_sync("Paris is the capital of France.").output, City)

    @add("pydantic-ai", "PromptedOutput")
    def _():
        from pydantic_ai import PromptedOutput

        assert isinstance(pai(PromptedOutput(City)).run_sync("Paris is the capital of France.").output, City)

    @add("pydantic-ai", "OpenAIResponsesModel")
    def _():
        assert pai(responses=True).run_sync("Say hi.").output

    home = Path(tempfile.mkdtemp(prefix="llm-home-"))
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: edge-qwen\n  model_name: qwen2.5\n  api_base: {v1}\n  api_key_name: none\n"
        "  supports_tools: true\n  supports_schema: true\n")
    env = {**os.environ, "LLM_USER_PATH": str(home), "LLM_OPENAI_SHOW_RESPONSES": "0"}
    (home / "keys.json").write_text(json.dumps({"none": "unused"}))

    def llm_cli(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "llm", "-m", "edge-qwen", *args, "-o", "temperature", "0"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (r.stderr or r.stdout).strip().splitlines()[-1:]
        return r.stdout

    @add("llm", "prompt")
    def _():
        assert llm_cli("Say hi.", "--no-stream").strip()

    @add("llm", "stream")
    def _():
        assert llm_cli("Say hi.").strip()

    @add("llm", "--schema")
    def _():
        json.loads(llm_cli("Paris", "--schema", "name, country"))

    @add("llm", "-T tools")
    def _():
        assert llm_cli("What version of llm is this? Use the tool.", "-T", "llm_version", "--td").strip()

    def lite(**kw):
        import litellm

        return litellm.completion(model="openai/qwen2.5", api_base=v1, api_key="unused", temperature=0,
                                  max_tokens=10, messages=[{"role": "user", "content": "Say hi."}], **kw)

    @add("litellm", "completion")
    def _():
        assert lite().choices[0].message.content

    @add("litellm", "stream")
    def _():
        assert "".join(c.choices[0].delta.content or "" for c in lite(stream=True))

    def ol():
        import ollama

        return ollama.Client(host=url, timeout=300)

    @add("ollama", "chat")
    def _():
        assert ol().chat(model="qwen2.5", messages=[{"role": "user", "content": "Say hi."}],
                         options={"temperature": 0, "num_predict": 10}).message.content

    @add("ollama", "generate")
    def _():
        assert ol().generate(model="qwen2.5", prompt="Say hi.", options={"temperature": 0, "num_predict": 10}).response

    @add("ollama", "list")
    def _():
        assert ol().list().models

    @add("ollama", "chat stream")
    def _():
        assert "".join(c.message.content for c in ol().chat(
            model="qwen2.5", messages=[{"role": "user", "content": "Say hi."}], stream=True,
            options={"temperature": 0, "num_predict": 10}))

    @add("ollama", "show")
    def _():
        assert ol().show("qwen2.5").modelinfo

    @add("ollama", "embed")
    def _():
        assert len(ol().embed(model="qwen2.5", input=["hi", "你好"]).embeddings) == 2

    @add("ollama", "format schema")
    def _():
        r = ol().chat(model="qwen2.5", messages=[{"role": "user", "content": "Paris as JSON"}],
                      format=City.model_json_schema(), options={"temperature": 0, "num_predict": 60})
        City.model_validate_json(r.message.content)

    @add("ollama", "tools")
    def _():
        r = ol().chat(model="qwen2.5", messages=Q, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
        assert r.message.tool_calls and r.message.tool_calls[0].function.arguments["city"]

    return out


def main() -> None:
    from edge_qwen.serve.app import ServerThread, create_app

    rows = []
    with ServerThread(create_app()) as url:
        only = os.environ.get("CHECK_CLIENTS_ONLY", "")  # e.g. "llm" or "json_schema": a subset
        for client, name, fn in checks(url):
            if only and only not in f"{client}: {name}":
                continue
            t = time.perf_counter()
            try:
                fn()
                ok, why = True, ""
            except ImportError as e:
                ok, why = False, f"not installed ({e.name})"
            except Exception as e:  # noqa: BLE001 -- a failed check is a row in the table
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                ok, why = False, f"{type(e).__name__}: {first[:150]}"
                if os.environ.get("CHECK_CLIENTS_DEBUG"):
                    traceback.print_exc()
            rows.append((client, name, ok, why, time.perf_counter() - t))
            print(f"{'PASS' if ok else 'FAIL'} {client}: {name} {why}", file=sys.stderr, flush=True)
    passed = sum(r[2] for r in rows)
    print(f"\n{passed} of {len(rows)} checks pass (default model, temperature 0)\n")
    print("| client | check | result | note |")
    print("| --- | --- | --- | --- |")
    for client, name, ok, why, s in rows:
        print(f"| {client} | {name} | {'pass' if ok else 'FAIL'} | {why.replace('|', '/')} |")


if __name__ == "__main__":
    main()
