"""A small reader for the project's Dockerfile: instructions with their build stage, exec-form commands and
ENV pairs (enough for the checks in tests/deploy; hadolint parses it fully)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    stage: str  # the stage's name (FROM ... AS name), "" before the first FROM
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined
    line: int


def parse(path: Path) -> list[Instruction]:
    instructions: list[Instruction] = []
    stage = ""
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines too
        if not pending:
            start = number
        continued = line.endswith("\\")
        pending.append(line[:-1].strip() if continued else line)
        if continued:
            continue
        text = " ".join(pending)
        pending = []
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            stage = words[2] if len(words) >= 3 and words[1].upper() == "AS" else ""
        instructions.append(Instruction(stage, keyword, args.strip(), start))
    assert not pending, f"{path} ends inside a continued instruction"
    return instructions


def exec_form(args: str) -> list[str]:
    """A CMD / ENTRYPOINT / HEALTHCHECK command in exec (JSON) form."""
    try:
        command = json.loads(args)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not in exec form (a JSON list): {args}") from exc
    assert isinstance(command, list) and all(isinstance(w, str) for w in command), args
    return command


def env_pairs(args: str) -> dict[str, str]:
    """ENV K=V K2=V2 (the legacy `ENV K V` form is not used)."""
    pairs = {}
    for word in shlex.split(args):
        key, sep, value = word.partition("=")
        assert sep, f"ENV in the legacy `ENV key value` form: {args}"
        pairs[key] = value
    return pairs


def stage_env(instructions: list[Instruction], stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.stage == stage and ins.keyword == "ENV":
            env.update(env_pairs(ins.args))
    return env


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            name, _, value = ins.args.partition("=")
            defaults[name] = value.strip('"')
    return defaults
