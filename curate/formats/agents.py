"""Converters for agent episodes: text transcripts (ALFWorld-style) and action lists (WebShop-style)."""

from __future__ import annotations

from curate.formats.conversations import Converted
from curate.formats.records import BadRecord, first_key, message, require_list, require_str, type_name

TRANSCRIPT_KEYS = ("traj", "trace", "transcript", "text")
TASK_KEYS = ("problem", "instruction", "goal")


def _agent_line(line: str, after_prompt: bool) -> str | None:
    """The agent's text if `line` is an agent line, else None.

    Agent lines start with "> ". ADaPT traces also log the model's completion of a bare ">" prompt on
    a later line that starts with a space (" go to desk 1", " think: ..."), and open with such a line;
    so a "think:" line, or a space-led line right after a bare ">", is the agent's too. Observations
    in these datasets never start with a space.
    """
    if line.startswith(">"):
        return line[1:].strip()
    stripped = line.strip()
    if stripped.lower().startswith("think:") or (after_prompt and line[:1].isspace()):
        return stripped
    return None


def transcript_turns(text: str) -> list[tuple[str, str]]:
    """Split an episode into alternating (role, text) turns.

    Consecutive agent lines merge into one assistant turn and consecutive other lines into one user
    turn (the observation), so roles alternate, which chat templates and LLaMA-Factory require.
    Blank lines and bare ">" prompts are dropped.
    """
    turns: list[tuple[str, list[str]]] = []
    after_prompt = False
    for line in text.split("\n"):
        if not line.strip():
            continue
        if line.strip() == ">":
            after_prompt = True
            continue
        agent = _agent_line(line, after_prompt)
        after_prompt = False
        if agent == "":
            continue
        role, content = ("assistant", agent) if agent is not None else ("user", line)
        if turns and turns[-1][0] == role:
            turns[-1][1].append(content)
        else:
            turns.append((role, [content]))
    return [(role, "\n".join(lines)) for role, lines in turns]


def convert_transcript(raw: dict, notes: list[str]) -> Converted:
    """One text episode; text before the first agent line (after `problem`, if given) is the task."""
    key = first_key(raw, TRANSCRIPT_KEYS) or "traj"
    text = raw.get(key)
    if not isinstance(text, str):
        raise BadRecord(f"field '{key}' must be a string, got {type_name(text)}")
    turns = transcript_turns(text)
    if not any(role == "assistant" for role, _ in turns):
        raise BadRecord("transcript has no agent ('> ') line")
    if "problem" in raw:
        task = require_str(raw, "problem")
        if turns[0][0] == "user":
            turns[0] = ("user", f"{task}\n{turns[0][1]}")
        else:
            turns.insert(0, ("user", task))
    if turns[0][0] != "user":
        raise BadRecord("transcript has no task text before the first agent line")
    return [message(role, content) for role, content in turns], None


def convert_actions(raw: dict, notes: list[str]) -> Converted:
    """A task plus the list of actions taken (observations not recorded): one assistant turn."""
    actions = require_list(raw, "action_history")
    for i, action in enumerate(actions):
        if not isinstance(action, str):
            raise BadRecord(f"field 'action_history' item {i} must be a string, got {type_name(action)}")
    if not any(a.strip() for a in actions):
        raise BadRecord("field 'action_history' is empty")
    task = require_str(raw, first_key(raw, TASK_KEYS) or "problem")
    return [message("user", task), message("assistant", "\n".join(actions))], None
