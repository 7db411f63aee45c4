"""The llmos command line (typer + rich)."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Annotated

import typer

from llmos import __version__
from llmos.commands._common import console, err, fail

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="llmos: an operating system for LLM agents.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: llmos and its peers side by side.")
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registered name, GGUF file or HF directory.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"llmos {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """llmos: an operating system for LLM agents."""


@contextmanager
def _user_errors():
    """Turn the errors a user can cause (bad model, bad settings, bad parameters) into one red line."""
    from llmos.engine import ConfigError, InvalidRequestError
    from llmos.models.config import ModelError

    try:
        yield
    except (ModelError, ConfigError, InvalidRequestError) as e:
        fail(str(e))


def _streamer():
    """An on_step callback that writes one request's new text to stdout as it grows."""
    shown = 0

    def show(outputs) -> None:
        nonlocal shown
        for o in outputs:
            text = o.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)

    return show


QuantOpt = Annotated[str, typer.Option(
    help="Weights: auto (a GGUF's own Q4_0/Q4_1/Q8_0 on the CPU unless --dtype is given), gguf, "
         "int8 (per output channel) or none (dequantized to --dtype).")]


def _load_engine(model: str, **engine_kwargs):
    """Load a model and build an engine behind a progress spinner; errors are one line."""
    from llmos.engine import LLM

    with console.status(f"loading {model} ..."), _user_errors():
        return LLM(model, **engine_kwargs)


@app.command()
def generate(
    prompts: Annotated[list[str], typer.Argument(help="One or more prompts, run as one batch.")],
    model: ModelOpt = "smollm2-135m-instruct",
    chat: Annotated[bool | None, typer.Option("--chat/--raw", help="Send each prompt as a user message in "
                                              "the model's chat template (the default when the model has "
                                              "one), or continue the raw text.", show_default=False)]
    = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    quantization: QuantOpt = "auto",
) -> None:
    """Generate text; one prompt streams to the terminal, several run as one batch.

    An instruct model answers each prompt as a chat message (its chat template applied, as Ollama and
    llama-cli do); --raw continues the text as written. Ends with tokens and speed (on stderr).

    Example: llmos generate "What is an operating system?" "Name three colors."
    """
    import time

    err.print(f"[dim]loading {model} ...[/]", highlight=False)  # before the imports: torch takes seconds
    from llmos.engine import SamplingParams

    with _user_errors():
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop or [])
    llm = _load_engine(model, dtype=dtype, quantization=quantization)
    use_chat = bool(llm.tokenizer.chat_template) if chat is None else chat
    if use_chat and not llm.tokenizer.chat_template:
        fail(f"{model} has no chat template; use --raw")
    inputs = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) if use_chat else p
              for p in prompts]
    started = time.perf_counter()
    with _user_errors():
        if len(prompts) > 1:
            with console.status(f"generating {len(prompts)} completions in one batch ..."):
                results = llm.generate(inputs, params)
        else:
            results = llm.generate(inputs, params, on_step=_streamer())
    elapsed = time.perf_counter() - started
    if len(prompts) == 1:
        print()
    else:
        for prompt, result in zip(prompts, results, strict=True):
            out = result.outputs[0]
            console.rule(f"[bold]{prompt}")
            console.print(out.text, markup=False, highlight=False)
            console.print(f"[dim]{len(out.token_ids)} tokens, finish: {out.finish_reason}[/]")
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in results)
    err.print(f"[dim]{tokens} tokens in {elapsed:.2f} s, {tokens / max(elapsed, 1e-9):.1f} tok/s "
              f"(prompt {prompt_tokens} tokens, {'chat template' if use_chat else 'raw text'})[/]",
              highlight=False)


@app.command()
def chat(
    model: ModelOpt = "smollm2-135m-instruct",
    system: Annotated[str | None, typer.Option(help="A system message to start the chat with.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens per reply at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.7,
    seed: int | None = None,
    agent: Annotated[str | None, typer.Option(help="Chat with this persistent MemGPT agent instead; "
                                              "it keeps its memory across runs.")] = None,
    context_window: Annotated[int | None, typer.Option(help="With --agent: a smaller window to page in.")]
    = None,
    backend_url: Annotated[str | None, typer.Option(help="With --agent: an OpenAI-compatible server.")]
    = None,
    api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Key for --backend-url.")]
    = None,
) -> None:
    """Chat in the terminal; the conversation is kept until /exit or Ctrl-D.

    Line editing and history (Up/Down); /help, /clear and /exit are for the CLI, not the model; Ctrl-C
    stops a reply and keeps the session.

    Example: llmos chat --system "You are terse."   or   llmos chat --agent sam
    """
    from llmos.engine import SamplingParams

    if agent is not None:
        from llmos.commands.memory import chat_with_agent

        with _user_errors():
            try:
                chat_with_agent(agent, model, backend_url, api_key, context_window)
            except ValueError as e:
                fail(str(e))
        return

    with _user_errors():
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    llm = _load_engine(model)
    from llmos.commands._repl import chat_loop

    chat_loop(llm, params, system, max_tokens)


@app.command()
def serve(
    ctx: typer.Context,
    model_arg: Annotated[str | None, typer.Argument(metavar="MODEL", show_default=False,
                                                    help="The model to serve (as `vllm serve MODEL`); "
                                                    "the same as --model.")] = None,
    model: Annotated[str, typer.Option("--model", "-m", envvar="LLMOS_MODEL",
                                       help="Registered name, GGUF file or HF directory.")]
    = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(envvar="LLMOS_HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LLMOS_PORT", help="Port to listen on.")] = 8000,
    kv_budget: Annotated[str, typer.Option(envvar="LLMOS_KV_BUDGET",
                                           help="KV cache size: bytes (2GiB) or a fraction (0.5).")] = "0.9",
    api_key: Annotated[str | None, typer.Option(envvar="LLMOS_API_KEY",
                                                help="Require this bearer token (its holder is the admin); "
                                                "keys of `llmos users add` work too.")] = None,
    backend_url: Annotated[str | None, typer.Option(help="Run agents on this OpenAI-compatible server "
                                                    "instead of the embedded engine.")] = None,
    backend_api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY",
                                                        help="Key for --backend-url.")] = None,
    backend_model: Annotated[str | None, typer.Option(help="Model name on --backend-url.")] = None,
    policy: Annotated[str, typer.Option(help="Agent scheduling: fifo, rr, priority, fair or sjf.")] = "fair",
    max_running: Annotated[int, typer.Option(help="LLM calls on the engine at once.")] = 8,
    quantum: Annotated[int, typer.Option(help="rr time slice / fair granularity, in tokens.")] = 16,
    grants: Annotated[str | None, typer.Option(help="Capability policy file for agents (default: the "
                                               "ordinary grants).")] = None,
    operator: Annotated[bool, typer.Option(help="Run the operator agent on the kernel.")] = False,
    served_model_name: Annotated[str | None, typer.Option(help="The model's name in the API "
                                                          "(default: the model's).")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length (default: the model's).")] = None,
    max_num_seqs: Annotated[int | None, typer.Option(help="Sequences running at once at most.")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    quantization: QuantOpt = "auto",
    chat_template: Annotated[str | None, typer.Option(help="A chat template: a file or jinja text.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info (a line per request), warning or error.")]
    = "info",
    config: Annotated[str | None, typer.Option(help="Read these options from a YAML or TOML file (an "
                                               "[engine] table as `llmos tune` writes is read too).")] = None,
    replicas: Annotated[int, typer.Option(help="Engine replicas, each a Ray actor on its own cores or GPU "
                                          "(needs the replicas extra); 1: the one embedded engine, no Ray.")]
    = 1,
    ray_address: Annotated[str | None, typer.Option(help="Run the replicas on this Ray cluster (host:port or "
                                                    "ray://...) instead of a local Ray.")] = None,
    router: Annotated[str, typer.Option(help="Where requests go over replicas: prefix (the replica holding "
                                        "their prefix), least-loaded or round-robin.")] = "prefix",
) -> None:
    """Boot the whole OS once and serve it: the OpenAI API, the agents API (Letta's), the kernel API.

    One kernel (scheduling, memory, reference monitor, audit log) on one llmos home; `llmos ps`, `top`,
    `kill` and `audit` find it there. Example: llmos serve --port 8000, then point an OpenAI client at
    http://127.0.0.1:8000/v1 or a Letta client at http://127.0.0.1:8000
    """
    import asyncio
    import logging

    import uvicorn

    from llmos.home import llmos_home
    from llmos.kernel import POLICIES
    from llmos.replicas.router import POLICIES as ROUTERS
    from llmos.server import create_app, serve_config
    from llmos.server.system import boot, find_server

    given = {k: v for k, v in ctx.params.items() if k != "model_arg"}
    given["model"] = model_arg or model
    explicit = {k for k in given if getattr(ctx.get_parameter_source(k), "name", "DEFAULT") != "DEFAULT"}
    explicit |= {"model"} if model_arg else set()
    engine_settings: dict = {}
    try:
        if config:
            options, engine_settings = serve_config.read(config)
            given = serve_config.merge(given, explicit, options, config)
        (model, host, port, kv_budget, served_model_name, max_model_len, max_num_seqs, dtype, chat_template,
         log_level, policy) = (given[k] for k in ("model", "host", "port", "kv_budget", "served_model_name",
                                                  "max_model_len", "max_num_seqs", "dtype", "chat_template",
                                                  "log_level", "policy"))
        template = serve_config.chat_template(chat_template) if chat_template else None
        sock = serve_config.bind(host, port)  # a port in use fails now, before the model loads
    except serve_config.ServeConfigError as e:
        fail(str(e))
    if str(log_level).lower() not in ("debug", "info", "warning", "error", "critical"):
        fail(f"--log-level must be debug, info, warning, error or critical, got {log_level!r}")
    logging.basicConfig(level=str(log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if policy not in POLICIES:
        fail(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if replicas < 1 or router not in ROUTERS:
        fail(f"--replicas must be at least 1 and --router one of {', '.join(ROUTERS)}")
    running = find_server(llmos_home())
    if running is not None:  # two servers on one home would each recover (fail) the other's runs
        fail(f"llmos already serves this home ({llmos_home()}) at {running['url']} (pid {running['pid']}); "
             "stop it, or set LLMOS_HOME to another directory")
    llm = None
    with console.status(f"booting llmos on {backend_url or model} ..."), _user_errors():
        try:
            engine_kwargs = {"kv_budget": kv_budget, "dtype": dtype, "quantization": quantization,
                             **engine_settings,
                             **{k: v for k, v in (("max_model_len", max_model_len),
                                                  ("max_num_seqs", max_num_seqs)) if v is not None}}
            if not backend_url and (replicas > 1 or ray_address):
                from llmos.replicas import ReplicaPool

                pool = ReplicaPool(model, replicas, router=router, ray_address=ray_address, **engine_kwargs)
                if template is not None:
                    pool.tokenizer.chat_template = template
                system = boot(pool=pool, policy=policy, max_running=max_running, quantum=quantum,
                              grants=grants, api_key=api_key)
            elif not backend_url:
                from llmos.engine import AsyncLLM

                llm = AsyncLLM(model, **engine_kwargs)
                if template is not None:
                    llm.tokenizer.chat_template = template
            if llm is not None or backend_url:
                system = boot(model=model, llm=llm, backend_url=backend_url, backend_api_key=backend_api_key,
                              backend_model=backend_model, kv_budget=kv_budget, policy=policy,
                              max_running=max_running, quantum=quantum, grants=grants, api_key=api_key)
        except ValueError as e:
            fail(str(e))
    system.model_name = served_model_name or system.model_name
    url = f"http://{host}:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(system=system), host=host, port=port,
                                           log_level=str(log_level).lower(), access_log=False))

    async def run() -> None:
        async def announce() -> None:  # server.json once the port is bound, so clients find a live URL
            while not server.started:
                await asyncio.sleep(0.05)
            system.publish(url)
            on = f"; {replicas} replicas ({router} routing)" if system.llm is not llm else ""
            console.print(serve_config.banner(system.model_name, url, llm) + f"{on}; policy {policy}, "
                          f"home {system.home}", markup=False, highlight=False, soft_wrap=True)

        announcer = asyncio.create_task(announce())
        try:
            if operator:
                await system.start_operator()
            await server.serve(sockets=[sock])
        finally:
            announcer.cancel()
            await system.aclose()
            if llm is not None:
                llm.shutdown()

    # uvicorn drains in-flight requests on SIGINT/SIGTERM, then re-raises the signal to the
    # handler it found: a no-op here, so shutdown ends with exit status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    asyncio.run(run())


@app.command()
def models() -> None:
    """List the models llmos knows by name and where they are.

    Example: llmos models
    """
    from rich.table import Table

    from llmos.models.registry import available_models

    table = Table("name", "location")
    for name, location in available_models():
        table.add_row(name, location)
    console.print(table)
    console.print("[dim]Any GGUF file or Hugging Face model directory also works as --model PATH.[/]")


@bench_app.command("engine")
def bench_engine(
    quick: Annotated[bool, typer.Option(help="Shrink the work (the demo's form).")] = False,
    model: ModelOpt = "smollm2-135m-instruct",
    output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
    peers: Annotated[bool, typer.Option(help="Also run the peers (HF transformers).")] = True,
    workload: Annotated[str, typer.Option(help="C (CPU) or G (GPU, Qwen3-0.6B shape); auto picks.")]
    = "auto",
    profile: Annotated[bool, typer.Option(help="Add where a single-stream decode step's time goes.")]
    = False,
    quantization: QuantOpt = "auto",
) -> None:
    """llmos vs HF transformers on the same model and work, one after the other.

    On the CPU a single-stream table (prefill tok/s, decode ms/token, peak memory above `import torch`,
    greedy agreement with fp32) comes first. Example: llmos bench engine --quick --profile
    """
    from llmos.bench.engine import run_engine_bench

    with _user_errors():
            run_engine_bench(console, quick=quick, model=model, json_path=output, peers_too=peers,
                         workload=workload, profile=profile, quantization=quantization)


@bench_app.command("preemption")
def bench_preemption(
    quick: Annotated[bool, typer.Option(help="Shrink the work.")] = False,
    model: ModelOpt = "smollm2-135m-instruct",
    output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
) -> None:
    """Workload C in a quarter of its KV memory: recompute and swap must change no token.

    Example: llmos bench preemption --quick
    """
    from llmos.bench.memory import run_preemption_bench

    with _user_errors():
        run_preemption_bench(console, quick=quick, model=model, json_path=output)


@bench_app.command("prefix")
def bench_prefix(
    model: ModelOpt = "smollm2-135m-instruct",
    output: Annotated[str | None, typer.Option("--json", help="Where to write the JSON results.")] = None,
) -> None:
    """Requests sharing a 256-token prefix: how much the prefix cache serves.

    Example: llmos bench prefix
    """
    from llmos.bench.memory import run_prefix_bench

    with _user_errors():
        run_prefix_bench(console, model=model, json_path=output)


def _register_commands() -> None:
    """Let every module in llmos.commands add its sub-commands (each imports lazily)."""
    import importlib
    import pkgutil

    import llmos.commands

    for mod in pkgutil.iter_modules(llmos.commands.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"llmos.commands.{mod.name}").register(app, bench_app)


_register_commands()

if __name__ == "__main__":
    app()
