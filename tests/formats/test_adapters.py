"""Adapters on real records: every shared dataset folder normalises, in the expected format.

A few source records are genuinely unusable (an empty episode, an empty final reply, an empty model
response); they must come out as BadRecord with the right reason, and everything else must not.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from curate.formats.adapters import BadRecord, Normalized, iter_normalized, normalize
from curate.io.readers import list_input_files, read_records

EMPTY = "message 1: content is empty"
# folder -> (format of every record, {file name: {reason: count}} of the source's own bad records)
EXPECTED = {
    "alfworld_adapt_traces": ("transcript", {
        "alfworld_adapt_davinci003_even.jsonl": {"transcript has no agent ('> ') line": 4}}),  # empty trace
    "alfworld_knowagent_trajs": ("transcript", {}),
    "glaive_toolcall": ("sharegpt", {}),
    "gsm8k": ("question_answer", {}),
    "hh_rlhf_harmless": ("hh", {  # the chosen final reply is empty
        "harmless-base.test.shared_prompt_groups.jsonl": {EMPTY: 2, "message 3: content is empty": 1}}),
    "math500": ("question_answer", {}),
    "self_instruct_seed_tasks": ("alpaca", {}),
    "tau_bench_airline": ("messages", {}),
    "self_instruct_user_oriented": (None, {  # the model's response is "" (31) or " " (1)
        "davinci-t0-ft_predictions.lines1-126.jsonl": {EMPTY: 32}}),
    "webshop_adapt_episodes": ("actions", {}),
    "webshop_human_sessions": ("webshop_session", {}),
}


def normalized(path: Path) -> list[tuple[int, dict | str, Normalized | BadRecord]]:
    return list(iter_normalized(path, read_records(path)))


def good(path: Path) -> list[tuple[int, dict, Normalized]]:
    return [(i, raw, n) for i, raw, n in normalized(path) if isinstance(n, Normalized)]


def test_every_real_dataset_folder_is_covered(data_dir):
    assert {p.name for p in data_dir.iterdir() if p.is_dir()} == set(EXPECTED)


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_whole_folder_normalises(data_dir, folder):
    fmt, expected_bad = EXPECTED[folder]
    # τ-bench ships its tool schemas beside the trajectories: they are given with --tools, not read as data
    files = [f for f in list_input_files([data_dir / folder]) if f.name != "airline_tools.json"]
    assert files and all(f.suffix in (".jsonl", ".json") for f in files)  # SOURCE.md is skipped
    for path in files:
        results = normalized(path)
        bad = Counter(str(r) for _, _, r in results if isinstance(r, BadRecord))
        assert dict(bad) == expected_bad.get(path.name, {}), path
        formats = {r.format for _, _, r in results if isinstance(r, Normalized)}
        # self_instruct_user_oriented: the instructions file is alpaca, the model predictions prompt/completion
        expected = fmt or ("prompt_completion" if "predictions" in path.parts else "alpaca")
        assert formats == {expected}, path
        assert [i for i, _, _ in results] == sorted(i for i, _, _ in results)


def test_gsm8k_ground_truth(data_dir):
    records = good(data_dir / "gsm8k" / "train.lines1-2000.jsonl")
    _, raw, first = records[0]
    assert first.ground_truth == "72"
    assert first.messages == [{"role": "user", "content": raw["question"]},
                              {"role": "assistant", "content": raw["answer"]}]
    assert first.reward is None
    assert all(n.ground_truth and n.ground_truth == raw["answer"].split("####")[-1].strip() for _, raw, n in records)


def test_math500_ground_truth_is_the_answer_field(data_dir):
    for _, raw, n in good(data_dir / "math500" / "math500.lines1-250.jsonl"):
        assert n.ground_truth == raw["answer"]
        assert [m["role"] for m in n.messages] == ["user", "assistant"]


def test_knowagent_first_record(data_dir):
    _, _, first = good(data_dir / "alfworld_knowagent_trajs" / "KnowAgentALFWorld_llama-2-13b_D0.even_tasks.jsonl")[0]
    assert first.reward == 1.0
    assert first.messages[0]["role"] == "user"
    assert "Your task is to: put some keychain on drawer." in first.messages[0]["content"]
    assert first.messages[1]["role"] == "assistant"
    assert first.messages[1]["content"].startswith("Think: To solve the task")
    assert "> " not in first.messages[1]["content"]
    assert first.messages[2] == {"role": "user", "content": "On the shelf 8, you see a remotecontrol 3."}


def test_knowagent_d1_integer_zero_result_is_failure(data_dir):
    records = good(data_dir / "alfworld_knowagent_trajs" / "KnowAgentALFWorld_llama-2-13b_D1.even_tasks.jsonl")
    zeros = [n for _, raw, n in records if raw["result"] == 0 and raw["result"] is not False]
    assert zeros and all(n.reward == 0.0 for n in zeros)
    assert {n.reward for _, _, n in records} == {0.0, 1.0}
    assert sum(n.reward for _, _, n in records) == 95  # SOURCE.md: D1 95/255 succeeded


@pytest.mark.parametrize("folder", ["alfworld_knowagent_trajs", "alfworld_adapt_traces"])
def test_transcript_roles_alternate(data_dir, folder):
    for path in list_input_files([data_dir / folder]):
        for _, _, n in good(path):
            roles = [m["role"] for m in n.messages]
            assert roles[0] == "user" and "assistant" in roles
            assert all(a != b for a, b in zip(roles, roles[1:])), path
            assert all(m["content"] == m["content"].strip() for m in n.messages if m["role"] == "assistant")


def test_adapt_alfworld_trace(data_dir):
    records = good(data_dir / "alfworld_adapt_traces" / "alfworld_adapt_davinci003_even.jsonl")
    _, raw, first = records[0]
    assert first.messages[0] == {"role": "user", "content": raw["problem"]}
    assert first.messages[1]["content"] == "think: To solve the task, I need to find and take a mug from desk."
    assert first.messages[2] == {"role": "user", "content": "OK."}
    # " go to desk 1" completes a bare ">" prompt two blank lines earlier: an action, not an observation
    assert {"role": "assistant", "content": "go to desk 1"} in first.messages
    assert first.messages[-2:] == [
        {"role": "assistant", "content": "put mug 1 in/on desk 1"},
        {"role": "user", "content": "You put the mug 1 in/on the desk 1."},
    ]
    assert first.reward == 1.0
    assert {n.reward for _, raw, n in records if raw["reward"] in (False, 0)} == {0.0}


def test_hh_chosen_dialogue(data_dir):
    _, raw, first = good(data_dir / "hh_rlhf_harmless" / "harmless-base.test.shared_prompt_groups.jsonl")[0]
    roles = [m["role"] for m in first.messages]
    assert roles[0] == "user" and roles[-1] == "assistant"
    assert all(a != b for a, b in zip(roles, roles[1:]))
    assert first.messages[-1]["content"] == raw["chosen"].rsplit("\n\nAssistant:", 1)[1].strip()
    assert first.reward is None and first.ground_truth is None


def test_self_instruct_seed_tasks_use_first_instance(data_dir):
    records = good(data_dir / "self_instruct_seed_tasks" / "seed_tasks.lines1-100.jsonl")
    _, raw, first = records[0]
    assert first.messages == [
        {"role": "user", "content": raw["instruction"]},
        {"role": "assistant", "content": raw["instances"][0]["output"]},
    ]
    _, raw, with_input = next(r for r in records if r[1]["instances"][0]["input"].strip())
    instance = raw["instances"][0]
    assert with_input.messages[0]["content"] == raw["instruction"] + "\n\n" + instance["input"]


def test_self_instruct_predictions_are_prompt_response(data_dir):
    path = data_dir / "self_instruct_user_oriented" / "predictions" / "text-davinci-003_predictions.lines1-126.jsonl"
    for _, raw, n in good(path):
        assert n.messages == [{"role": "user", "content": raw["prompt"]},
                              {"role": "assistant", "content": raw["response"]}]


def test_webshop_adapt_actions(data_dir):
    for _, raw, n in good(data_dir / "webshop_adapt_episodes" / "webshop_adapt_gpt35_fixed0-49.jsonl"):
        assert n.reward == raw["score"]
        assert n.messages == [
            {"role": "user", "content": raw["problem"]},
            {"role": "assistant", "content": "\n".join(raw["action_history"])},
        ]


def test_webshop_human_sessions_one_record_per_file(data_dir):
    rewards = []
    for path in list_input_files([data_dir / "webshop_human_sessions"]):
        results = good(path)
        assert len(results) == 1 and results[0][0] == 0
        _, raw, n = results[0]
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert raw["pages"] == lines
        assert n.messages[0] == {"role": "user", "content": lines[0]["goal"]["instruction_text"]}
        assert n.messages[-1] == {"role": "assistant", "content": "click[Buy Now]"}
        assert [m["role"] for m in n.messages[1:]] == ["assistant", "user"] * (len(n.messages) // 2 - 1) + ["assistant"]
        rewards.append(round(n.reward, 3))
        # what the conversation does not hold is in metadata: the reward's breakdown and the whole goal (the
        # target asin, attributes, options and price bound a verifier needs)
        assert json.loads(n.metadata) == {"reward_info": lines[-1]["reward_info"], "goal": lines[0]["goal"],
                                          "purchase": lines[-1]["content"]}
        assert n.notes == ()
    assert rewards == [0.5, 0.5, 0.75, 1.0, 0.5, 0.667]  # SOURCE.md


def test_webshop_human_session_actions(data_dir):
    (_, _, n), = good(data_dir / "webshop_human_sessions" / "20220427_1_15.jsonl")
    actions = [m["content"] for m in n.messages if m["role"] == "assistant"]
    assert actions == ["search[teen girl pink loafers size eight]", "click[B0868KF3ZB]", "click[8]", "click[z2-pink]",
                       "click[Buy Now]"]
    assert n.messages[2]["content"].startswith("search results (page 1): B098K1FSYS, B0868KF3ZB")
    (_, _, n), = good(data_dir / "webshop_human_sessions" / "20220427_1_12.jsonl")
    actions = [m["content"] for m in n.messages if m["role"] == "assistant"]
    assert actions == ["search[living room furniture]", "click[Back to Search]",
                       "search[living room and kitchen furniture]", "click[B09LYLKLVX]", "click[Buy Now]"]


def test_a_self_instruct_task_with_several_instances_keeps_them_all():
    raw = {"id": "t1", "instruction": "Classify the sentiment.",
           "instances": [{"input": "I love it", "output": "positive"}, {"input": "I hate it", "output": "negative"}]}
    n = normalize(raw)
    assert n.messages == [{"role": "user", "content": "Classify the sentiment.\n\nI love it"},
                          {"role": "assistant", "content": "positive"}]
    assert json.loads(n.metadata) == {"id": "t1", "instances": raw["instances"]}
    assert n.notes and "several instances" in n.notes[0]
    one = normalize({**raw, "instances": raw["instances"][:1]})  # all of it read: nothing to keep, no note
    assert json.loads(one.metadata) == {"id": "t1"} and one.notes == ()


def test_fields_of_a_tool_call_or_a_function_call_turn_that_are_not_kept_are_noted():
    call = {"id": "c1", "type": "function", "index": 0,
            "function": {"name": "search", "arguments": "{}", "strict": True}}
    n = normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                                {"role": "tool", "tool_call_id": "c1", "content": "r"}, {"role": "assistant", "content": "a"}]})
    assert n.messages[1]["tool_calls"] == [{"id": "c1", "type": "function",
                                            "function": {"name": "search", "arguments": "{}"}}]
    assert n.notes == ("tool call fields ['index', 'function.strict'] not kept",)
    turns = [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f", "arguments": {}}', "weight": 0},
             {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]
    assert normalize({"conversations": turns}).notes == ("message field 'weight' not kept",)
