"""The operator's action vocabulary: the only things it can ever ask to do.

An action is a typed value (one pydantic model per kind); `ACTION_SCHEMA` is
its JSON schema, which constrained decoding enforces on the model's answer, so
an LLM proposal parses into exactly one of these by construction. What an
action may touch is decided later, outside the model, by the guardrails.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SETTINGS = ("policy", "quantum", "max_running", "kv_blocks")
POLICIES = ("fifo", "rr", "priority", "fair", "sjf", "las")
_Reason = Annotated[str, Field(max_length=80, description="why, in a few words")]


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reason: _Reason = ""

    @property
    def destructive(self) -> bool:
        """Destroys state that cannot be given back (a process, an agent, files)."""
        return False

    def target(self) -> str:
        """What the action touches, as one key for rate and blast-radius accounting."""
        return ""


class KillProcess(_Action):
    kind: Literal["kill_process"] = "kill_process"
    pid: int = Field(ge=0)

    @property
    def destructive(self) -> bool:
        return True

    def target(self) -> str:
        return f"pid:{self.pid}"


class ReniceProcess(_Action):
    kind: Literal["renice_process"] = "renice_process"
    pid: int = Field(ge=0)
    nice: int = Field(ge=0, le=19)

    def target(self) -> str:
        return f"pid:{self.pid}"


class SuspendAgent(_Action):
    kind: Literal["suspend_agent"] = "suspend_agent"
    pid: int = Field(ge=0)

    def target(self) -> str:
        return f"agent:{self.pid}"


class KillAgent(_Action):
    kind: Literal["kill_agent"] = "kill_agent"
    pid: int = Field(ge=0)

    @property
    def destructive(self) -> bool:
        return True

    def target(self) -> str:
        return f"agent:{self.pid}"


class SetSetting(_Action):
    kind: Literal["set_setting"] = "set_setting"
    name: Literal["policy", "quantum", "max_running", "kv_blocks"]
    value: int | str

    def target(self) -> str:
        return f"setting:{self.name}"


class RemoveFiles(_Action):
    kind: Literal["remove_files"] = "remove_files"
    path: str = Field(min_length=1, max_length=4096)

    @property
    def destructive(self) -> bool:
        return True

    def target(self) -> str:
        return f"path:{self.path}"


class NoAction(_Action):
    kind: Literal["none"] = "none"


Action = Annotated[
    KillProcess | ReniceProcess | SuspendAgent | KillAgent | SetSetting | RemoveFiles | NoAction,
    Field(discriminator="kind"),
]
ACTION_KINDS = ("kill_process", "renice_process", "suspend_agent", "kill_agent", "set_setting",
                "remove_files", "none")
_ADAPTER: TypeAdapter[Any] = TypeAdapter(Action)


def _decoding_order(schema: dict[str, Any]) -> dict[str, Any]:
    """Every field required, `kind` first and `reason` last: constrained decoding writes
    properties in schema order, so the model commits to a kind before it explains."""
    for d in schema["$defs"].values():
        props = d["properties"]
        order = ["kind", *[k for k in props if k not in ("kind", "reason")], "reason"]
        d["properties"] = {k: props[k] for k in order}
        d["required"] = order
    return schema


ACTION_SCHEMA: dict[str, Any] = _decoding_order(_ADAPTER.json_schema())


class ActionError(ValueError):
    """A proposal that is not one action of the vocabulary (names what was wrong)."""


def parse_action(data: str | dict[str, Any]) -> _Action:
    """An action from JSON text or a dict; anything else is an ActionError naming the fault."""
    try:
        if isinstance(data, str):
            return _ADAPTER.validate_json(data)
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "action"
        raise ActionError(f"not a valid action: {where}: {first['msg']}") from None


def action_schema(kinds: tuple[str, ...] = ACTION_KINDS, pids: list[int] | None = None,
                  agents: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]:
    """ACTION_SCHEMA narrowed to the kinds and targets that make sense now.

    A small model then cannot even write a pid it was not shown; the guardrails
    still check everything, narrowing only spares wasted proposals.
    """
    unknown = set(kinds) - set(ACTION_KINDS)
    if unknown:
        raise ActionError(f"unknown action kinds: {sorted(unknown)}")
    schema = copy.deepcopy(ACTION_SCHEMA)
    defs = schema["$defs"]
    by_kind = {d["properties"]["kind"]["const"]: name for name, d in defs.items()}
    keep = [k for k in kinds if not _empty_target(k, pids, agents, paths)] or ["none"]
    schema["oneOf"] = [{"$ref": f"#/$defs/{by_kind[k]}"} for k in keep]
    schema["discriminator"]["mapping"] = {k: f"#/$defs/{by_kind[k]}" for k in keep}
    for kind, values, field in (("kill_process", pids, "pid"), ("renice_process", pids, "pid"),
                                ("suspend_agent", agents, "pid"), ("kill_agent", agents, "pid"),
                                ("remove_files", paths, "path")):
        if values is not None:
            defs[by_kind[kind]]["properties"][field]["enum"] = list(values)
    for name in list(defs):
        if name not in {by_kind[k] for k in keep}:
            del defs[name]
    return schema


def _empty_target(kind: str, pids, agents, paths) -> bool:
    values = {"kill_process": pids, "renice_process": pids, "suspend_agent": agents, "kill_agent": agents,
              "remove_files": paths}.get(kind)
    return values is not None and len(values) == 0
