"""`llmos serve` settings from a file, its listening socket, and its startup banner.

Like a service's unit file, `llmos serve --config FILE` reads the command's
options from YAML or TOML: keys are the long options (`max-model-len` or
`max_model_len`); an `engine` table holds engine settings (EngineConfig
fields), the form `llmos tune` writes, so `llmos serve --config
~/.llmos/tuned.toml` runs with the tuned settings. Options given on the
command line win over the file; an unknown key is refused, naming it.

The port is bound before the model loads, so a port already in use is a
one-line error at once, not after a minute of loading.
"""

from __future__ import annotations

import dataclasses
import socket
import tomllib
from pathlib import Path
from typing import Any

import yaml

from llmos.engine.config import EngineConfig


class ServeConfigError(ValueError):
    """A config file, option or port that `llmos serve` cannot use; the message says which."""


ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(serve options, engine settings) from a .toml, .yaml or .yml file."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise ServeConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ServeConfigError(f"config file {path} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError) as e:
        if isinstance(e, ServeConfigError):
            raise
        raise ServeConfigError(f"config file {path} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ServeConfigError(f"config file {path} must hold a table of options")
    engine = data.pop("engine", {}) or {}
    if not isinstance(engine, dict):
        raise ServeConfigError(f"config file {path}: 'engine' must be a table")
    unknown = sorted(set(engine) - ENGINE_FIELDS)
    if unknown:
        raise ServeConfigError(f"config file {path}: unknown engine settings {', '.join(unknown)}; "
                               f"known: {', '.join(sorted(ENGINE_FIELDS))}")
    return {k.replace("-", "_"): v for k, v in data.items()}, engine


def merge(given: dict[str, Any], explicit: set[str], options: dict[str, Any], path: str) -> dict[str, Any]:
    """The options to run with: the file's, except those given explicitly on the command line."""
    unknown = sorted(set(options) - set(given) - {"config"})
    if unknown:
        raise ServeConfigError(f"config file {path}: unknown options {', '.join(unknown)}")
    return {k: (v if k in explicit or k not in options else options[k]) for k, v in given.items()}


def chat_template(value: str) -> str:
    """A template given as a file path or inline (jinja text), as vLLM's --chat-template."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ServeConfigError(f"--chat-template {value!r} is neither a file nor a jinja template")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound now: a port in use fails before anything loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeConfigError(f"cannot listen on {host}:{port}: {e.strerror} "
                               "(is another server running? choose another --port)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def banner(model: str, url: str, llm: Any = None) -> str:
    """The startup line: model, context length and KV capacity (embedded engine), and where it listens."""
    if llm is None:
        return f"llmos serving {model} on {url} (OpenAI: {url}/v1)"
    engine = llm.engine
    kv_tokens = engine.blocks.num_blocks * engine.config.block_size
    return (f"llmos serving {model} on {url} (OpenAI: {url}/v1): context {engine.max_model_len} tokens, "
            f"KV cache {kv_tokens:,} tokens, up to {engine.config.max_num_seqs} sequences")
