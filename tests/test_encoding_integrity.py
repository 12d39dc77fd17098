"""Encoding integrity.

1. Long records: `encode` locates the assistant turns of a long record in windows (curate/chat/spans.py
   `locate`), renders linear in its turns, with the ids and loss mask of the rule each turn is held to:
   checked against the naive rule (the conversation rendered up to each turn, `reference_encode`, on
   plain chats) and against the same rules applied to the whole conversation (`Layout.spans`: what
   encode did before windows) on random chats with tool calls, results and reasoning, under the real
   templates shipped with TRL. Timings are in benchmarks/encode_bench.py, not here.
2. One record on which the template or the tokenizer raises (a sandbox SecurityError, a TypeError, a
   RecursionError...) is quarantined with the exception's type, in every stage that renders records
   (tokenize, prefix, rollout, continuation) and in `curate prism`; the other records go on; errors
   that are not a record's (MemoryError, OSError) still stop the run.
"""

from __future__ import annotations

import copy
import json
import os
import random

import pyarrow as pa
import pytest

from curate import chat, generation, schema
from curate.chat import spans as spans_mod
from curate.chat.spans import Layout, locate
from curate.chat.templates import TemplateError, template_text
from curate.chat.tool_text import prepare_for
from tests.test_chat import reference_encode

WORDS = "the cat sat on a mat 42 <b> é 你好 \n . , ! x ok yes".split(" ")


def trl_template(name: str) -> str:
    trl = pytest.importorskip("trl")
    path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not shipped with this TRL")
    with open(path, encoding="utf-8") as f:
        return f.read()


def words(rng: random.Random, most: int = 7) -> str:
    if rng.random() < 0.15:  # repeated short replies: a turn's text is no landmark
        return rng.choice(["ok", "OK.", "yes"])
    return " ".join(rng.choices(WORDS, k=rng.randint(1, most))).strip() or "x"


def plain_record(rng: random.Random, exchanges: int, system: bool) -> list[dict]:
    out = [{"role": "system", "content": "Be brief."}] if system else []
    for _ in range(exchanges):
        out += [{"role": "user", "content": words(rng) + "?"}, {"role": "assistant", "content": words(rng) + "."}]
    return out


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def agent_record(rng: random.Random, exchanges: int, reasoning: bool) -> list[dict]:
    """Queries, each answered after 0-2 tool calls (content beside a call sometimes), reasoning on some
    turns (as a field, or a <think> block in the content)."""
    out = [{"role": "system", "content": "Be brief. " + words(rng)}] if rng.random() < 0.4 else []
    n = 0
    for _ in range(exchanges):
        out.append({"role": "user", "content": words(rng) + "?"})
        for _ in range(rng.choice([0, 0, 1, 2])):
            n += 1
            cid = f"call{n:05d}"  # 9 characters (Mistral's templates want them)
            turn = {"role": "assistant", "content": words(rng) if rng.random() < 0.3 else "",
                    "tool_calls": [{"id": cid, "type": "function",
                                    "function": {"name": "get_weather", "arguments": json.dumps({"city": words(rng, 1)})}}]}
            if reasoning and rng.random() < 0.4:
                turn["reasoning_content"] = "think " + words(rng)
            out += [turn, {"role": "tool", "content": "RESULT " + words(rng), "tool_call_id": cid, "name": "get_weather"}]
        reply = {"role": "assistant", "content": words(rng) + "."}
        if reasoning and rng.random() < 0.3:
            reply["reasoning_content"] = "think " + words(rng)
        if reasoning and rng.random() < 0.1:
            reply["content"] = f"<think>\nhmm {words(rng)}\n</think>\n\n{reply['content']}"
        out.append(reply)
    return out


def both_ways(tok, messages, tools=None, chat_template=None):
    """(windows, whole): the text and spans from `locate` and from `Layout.spans` on the whole
    conversation, or ("error", message) for a TemplateError."""
    template = template_text(tok, chat_template, tools)
    msgs, tools_, _, origin = prepare_for(tok, template, messages, tools)

    def run(f):
        try:
            return f()
        except TemplateError as e:
            return "error", str(e)

    def whole():
        layout = Layout(tok, template, tools_, msgs, origin)
        return layout.text, layout.spans()

    return run(lambda: locate(tok, template, tools_, msgs, origin)), run(whole)


@pytest.fixture
def windows_used(monkeypatch):
    """Counts the blocks of turns located by a window and those located in the whole conversation."""
    count = {"window": 0, "whole": 0}
    real = spans_mod._Windows.block

    def block(self, k, j, cursor):
        got = real(self, k, j, cursor)
        count["window" if got is not None else "whole"] += 1
        return got

    monkeypatch.setattr(spans_mod._Windows, "block", block)
    return count


# ------------------------------------------------------------------------------- long records

def test_a_400_turn_record_has_the_per_turn_reference_mask(smol_tokenizer, windows_used):
    rng = random.Random(7)
    for system in (False, True):
        messages = plain_record(rng, 200, system)  # 400 (401) messages
        enc = chat.encode(smol_tokenizer, messages)
        assert (enc.input_ids, enc.loss_mask) == reference_encode(smol_tokenizer, messages)
    assert windows_used["window"] > 2 * 25 and windows_used["whole"] == 0


@pytest.mark.parametrize("name", ["qwen2_5.jinja", "llama3_1.jinja", "qwen3_training.jinja", "gemma3.jinja", "lfm2.jinja", "cohere.jinja"])
def test_long_plain_records_have_the_reference_mask_under_other_templates(smol_tokenizer, name, windows_used):
    tok = copy.copy(smol_tokenizer)
    tok.chat_template = trl_template(name)
    rng = random.Random(3)
    for exchanges, system in ((40, True), (61, False)):
        messages = plain_record(rng, exchanges, system)
        enc = chat.encode(tok, messages)
        assert (enc.input_ids, enc.loss_mask) == reference_encode(tok, messages), name
    assert windows_used["window"] > 0 and windows_used["whole"] == 0


def count_renders(monkeypatch):
    count = {"calls": 0, "messages": 0}
    real = spans_mod.render_template

    def counting(tokenizer, template, messages, tools, generation_prompt=False):
        count["calls"] += 1
        count["messages"] += len(messages)
        return real(tokenizer, template, messages, tools, generation_prompt)

    monkeypatch.setattr(spans_mod, "render_template", counting)
    return count


def test_renders_grow_linearly_with_the_turns(smol_tokenizer, monkeypatch):
    def renders(turns: int) -> dict:
        count = count_renders(monkeypatch)
        messages = plain_record(random.Random(turns), turns // 2, False)
        chat.encode(smol_tokenizer, messages)
        return dict(count)

    small, large = renders(200), renders(800)
    for turns, r in ((200, small), (800, large)):
        assert r["calls"] <= 2 * turns and r["messages"] <= 30 * turns, (turns, r)
    assert large["messages"] <= 4.5 * small["messages"]  # 4x the turns: 4x the work, not 16x
    # the counter sees what the whole-conversation rule costs: quadratic
    monkeypatch.setattr(spans_mod, "WINDOW_FROM", 1 << 30)
    assert renders(200)["messages"] >= 200 * 200 // 4


AGENT_TEMPLATES = [None, "qwen2_5.jinja", "qwen3.jinja", "qwen3_training.jinja", "qwen3_5_think.jinja",
                   "llama3_1.jinja", "deepseek_r1_distill.jinja", "deepseekv3.jinja", "gptoss.jinja", "gemma3.jinja",
                   "glm4moe.jinja", "phi3.jinja", "gemma4.jinja", "mistral"]


@pytest.mark.parametrize("name", AGENT_TEMPLATES)
def test_windows_give_the_spans_of_the_whole_conversation(smol_tokenizer, name, monkeypatch, windows_used):
    """Random agent chats, every turn in a window of its own or of a few turns (windows from the first
    message on): the same text and spans, or the same error, as the rules on the whole conversation."""
    from tests.test_chat_tools import MISTRAL

    text = MISTRAL if name == "mistral" else trl_template(name) if name else None
    monkeypatch.setattr(spans_mod, "WINDOW_FROM", 0)
    rng = random.Random(11)
    for r in range(8):
        monkeypatch.setattr(spans_mod, "BLOCK", rng.choice([1, 2, 3, 5]))
        messages = agent_record(rng, rng.randint(3, 7), reasoning=r % 2 == 1)
        tools = WEATHER if rng.random() < 0.6 else None
        windows, whole = both_ways(smol_tokenizer, messages, tools, text)
        assert windows == whole, (name, r)
    assert windows_used["window"] > 0


def test_long_agent_records_under_rewriting_templates(smol_tokenizer, windows_used):
    """Qwen3 drops the reasoning of turns before the last query and GPT-OSS ends the last reply apart:
    long records with the default windows, spans as on the whole conversation."""
    rng = random.Random(5)
    for name in ("qwen3.jinja", "gptoss.jinja"):
        messages = agent_record(rng, 30, reasoning=name == "qwen3.jinja")
        windows, whole = both_ways(smol_tokenizer, messages, WEATHER, trl_template(name))
        assert windows == whole and windows[0] != "error", name
    assert windows_used["window"] > 0


# ------------------------------------------------------------------ one record's failure, quarantined

# Raises, for one message content each: a sandbox violation (SecurityError), a TypeError, a RecursionError.
EVIL = ("{% macro deeper(n) %}{{ deeper(n + 1) }}{% endmacro %}"
        "{% for m in messages %}"
        "{% if m.content == 'escape the sandbox' %}{{ ''.__class__.__mro__[1].__subclasses__() }}{% endif %}"
        "{% if m.content == 'add a number' %}{{ m.content + 1 }}{% endif %}"
        "{% if m.content == 'recurse' %}{{ deeper(0) }}{% endif %}"
        "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
REASONS = {"escape the sandbox": "chat template: SecurityError: access to attribute '__class__' of 'str' object is unsafe.",
           "add a number": "chat template: TypeError: can only concatenate str (not \"int\") to str",
           "recurse": "chat template: RecursionError: maximum recursion depth exceeded"}
PROMPTS = ["What is 2+2?", "escape the sandbox", "add a number", "What is 3+3?", "recurse"]


def chats(prompts=PROMPTS) -> list[list[dict]]:
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": "It is 4."}] for p in prompts]


def messages_table(prompts=PROMPTS) -> pa.Table:
    return pa.table({"messages": pa.array(chats(prompts), type=schema.MESSAGES), "tools": pa.array([None] * len(prompts), pa.string())})


def expected_reason(prompt: str) -> str | None:
    return REASONS.get(prompt)


def assert_reason(got: str | None, prompt: str):
    want = expected_reason(prompt)
    if want is None:
        assert got is None, (prompt, got)
    else:
        assert got is not None and got.startswith(want), (prompt, got)


def test_encode_names_the_exception_of_the_template_and_of_the_tokenizer(smol_tokenizer):
    for prompt, messages in zip(PROMPTS, chats()):
        if prompt in REASONS:
            with pytest.raises(chat.TemplateError) as e:
                chat.encode(smol_tokenizer, messages, chat_template=EVIL)
            assert str(e.value).startswith(REASONS[prompt]) and chat.record_error(e.value) == str(e.value)
        else:
            assert chat.encode(smol_tokenizer, messages, chat_template=EVIL).n_loss_tokens > 0
    # a lone surrogate renders, but is not text the tokenizer takes
    with pytest.raises(chat.TokenizerError, match=r"^tokenizer: UnicodeEncodeError: .*surrogates not allowed"):
        chat.encode(smol_tokenizer, [{"role": "user", "content": "a\ud800b"}, {"role": "assistant", "content": "ok"}])
    assert chat.record_error(KeyError("function")) == "chat template: KeyError: 'function'"


def tokenize_stage(monkeypatch, tok, chat_template=EVIL):
    from curate.stages.tokenize import Tokenize
    from curate.stages.configs import TokenizeConfig

    stage = Tokenize(TokenizeConfig(chat_template=chat_template))
    monkeypatch.setattr(stage, "tokenizer", lambda: tok)
    return stage


def test_tokenize_stage_quarantines_only_the_records_the_template_raises_on(smol_tokenizer, monkeypatch):
    out = tokenize_stage(monkeypatch, smol_tokenizer).run(messages_table()).to_pylist()
    for prompt, row in zip(PROMPTS, out):
        assert_reason(row["token_error"], prompt)
        assert (row["n_tokens"] > 0 and row["n_loss_tokens"] > 0) == (prompt not in REASONS)
    # the good records are tokenised exactly as without the bad ones beside them
    good = [p for p in PROMPTS if p not in REASONS]
    alone = tokenize_stage(monkeypatch, smol_tokenizer).run(messages_table(good)).to_pylist()
    assert alone == [row for p, row in zip(PROMPTS, out) if p not in REASONS]


def raising_tokenizer(tok, trigger: str, error: BaseException):
    """A copy of `tok` that raises `error` when asked to tokenise a text holding `trigger`."""
    class Raising(type(tok)):
        def __call__(self, text, *args, **kwargs):
            if isinstance(text, str) and trigger in text:
                raise error
            return super().__call__(text, *args, **kwargs)

    out = copy.copy(tok)
    out.__class__ = Raising
    return out


def test_tokenize_stage_quarantines_a_record_the_tokenizer_raises_on(smol_tokenizer, monkeypatch):
    tok = raising_tokenizer(smol_tokenizer, "What is 3+3?", IndexError("index out of range in the vocabulary"))
    out = tokenize_stage(monkeypatch, tok, chat_template=None).run(messages_table()).to_pylist()
    errors = [row["token_error"] for row in out]
    assert errors[3] == "tokenizer: IndexError: index out of range in the vocabulary"
    assert [e for i, e in enumerate(errors) if i != 3] == [None] * 4


@pytest.mark.parametrize("error", [MemoryError(), OSError("model file unreadable"), KeyboardInterrupt()])
def test_errors_that_are_not_the_records_stop_the_run(smol_tokenizer, monkeypatch, error):
    from curate.stages.prefix import Prefix
    from curate.stages.configs import PrefixConfig

    tok = raising_tokenizer(smol_tokenizer, "What is 3+3?", error)
    with pytest.raises(type(error)):
        tokenize_stage(monkeypatch, tok, chat_template=None).run(messages_table())
    tok = raising_tokenizer(smol_tokenizer, "It is 4.", error)  # prefix tokenises the reply alone
    monkeypatch.setattr("curate.models.load_tokenizer", lambda ref, require_template=True: tok)
    with pytest.raises(type(error)):
        Prefix(PrefixConfig()).run(messages_table())


def test_prefix_stage_goes_on_past_a_record_the_template_raises_on(smol_tokenizer, monkeypatch):
    from curate.stages.prefix import Prefix
    from curate.stages.configs import PrefixConfig

    monkeypatch.setattr("curate.models.load_tokenizer", lambda ref, require_template=True: smol_tokenizer)
    out = Prefix(PrefixConfig(chat_template=EVIL)).run(messages_table()).to_pylist()
    for prompt, row in zip(PROMPTS, out):
        assert row["demo"] == (None if prompt in REASONS else "It is 4."), (prompt, row)


@pytest.fixture(scope="module")
def evil_model_dir(tmp_path_factory, tiny_model_dir) -> str:
    """The tiny random model, its chat template EVIL: what drift and irft generate with."""
    import shutil

    folder = tmp_path_factory.mktemp("evil") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(EVIL)
    for name in ("tokenizer_config.json",):  # the template file wins only when the config has none
        cfg = json.loads((folder / name).read_text())
        cfg.pop("chat_template", None)
        (folder / name).write_text(json.dumps(cfg))
    return str(folder)


def records_table(prompts=PROMPTS) -> pa.Table:
    rows = [{"id": f"r{i}", "source": "x", "source_index": i, "format": "messages", "ground_truth": "4", "reward": None,
             "messages": m, "tools": None} for i, m in enumerate(chats(prompts))]
    return pa.Table.from_pylist(rows, schema=schema.arrow_schema(schema.RECORD))


def fake_generation(monkeypatch, reply_for_seed):
    """No model: each generated row's text is reply_for_seed(its seed)."""
    monkeypatch.setattr(generation, "_generate_hf", lambda ref, ids, seeds, cfg: [reply_for_seed(s) for s in seeds])


def test_rollout_quarantines_a_record_the_template_raises_on_before_and_during_generation(evil_model_dir, monkeypatch):
    from curate.stages.rollout import Rollout
    from curate.stages.configs import RolloutConfig

    gen = generation.GenerationConfig(model=evil_model_dir, device="cpu", max_new_tokens=4)
    # record r3's first reply makes its conversation one the template raises on at turn 2
    turn1_r3 = {generation.row_seed(gen.seed, "r3", k, 1) for k in range(2)}
    fake_generation(monkeypatch, lambda s: "add a number" if s in turn1_r3 else "5")
    cfg = RolloutConfig(gen, samples=2, turns=2, verifier="tests.test_drift:never", feedback="No.")
    out = Rollout(cfg).run(records_table()).to_pylist()
    for i, (prompt, row) in enumerate(zip(PROMPTS, out)):
        if prompt in REASONS:
            assert_reason(row["rollout_error"], prompt)
            assert row["trajectories"] is None
        elif i == 3:
            assert row["rollout_error"].startswith(REASONS["add a number"])
            assert row["rollout_error"].endswith("(turn 2 of sample 0, after the policy's replies)")
            assert row["trajectories"] is None
        else:
            assert row["rollout_error"] is None and len(row["trajectories"]) == 2
            assert [m["content"] for m in row["trajectories"][0]] == [prompt, "5", "No.", "5"]


def test_a_model_folder_that_cannot_be_loaded_stops_the_run(tmp_path):
    from curate import models
    from curate.stages.continuation import Continuation
    from curate.stages.configs import ContinuationConfig
    from curate.stages.rollout import Rollout
    from curate.stages.configs import RolloutConfig

    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    gen = generation.GenerationConfig(model=str(broken), device="cpu")
    with pytest.raises(models.ModelError):  # the files' fault: not a reason given to every record
        Rollout(RolloutConfig(gen, samples=1, turns=1, verifier="exact")).run(records_table())
    with pytest.raises(models.ModelError):
        Continuation(ContinuationConfig(gen)).run(records_table())


def test_continuation_quarantines_a_record_the_template_raises_on(evil_model_dir, monkeypatch):
    from curate.stages.continuation import Continuation
    from curate.stages.configs import ContinuationConfig

    fake_generation(monkeypatch, lambda s: "5")
    gen = generation.GenerationConfig(model=evil_model_dir, device="cpu", max_new_tokens=4)
    out = Continuation(ContinuationConfig(gen)).run(records_table()).to_pylist()
    for prompt, row in zip(PROMPTS, out):
        assert_reason(row["pair_error"], prompt)
        assert row["rejected_text"] == (None if prompt in REASONS else "5")


def test_prism_quarantines_the_records_the_template_raises_on_and_routes_the_others(tmp_path, tiny_model_dir):
    from curate.cli import main

    template = tmp_path / "evil.jinja"
    template.write_text(EVIL)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats()))
    out = tmp_path / "routed"
    assert main(["prism", "--input", str(data), "--out", str(out), "--model", tiny_model_dir,
                 "--chat-template", str(template)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["quarantined"] == 3 and m["counts"]["sft"] + m["counts"]["rl"] == 2
    bad = [json.loads(line) for line in (out / "quarantine" / "part-00000.jsonl").read_text().splitlines()]
    assert len(bad) == 3
    for b in bad:
        prompt = PROMPTS[b["source_index"]]
        assert b["reason"].startswith(REASONS[prompt]), b


def test_encode_bench_runs_and_both_ways_agree(capsys):
    """benchmarks/encode_bench.py (timings are its output, not asserted here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import encode_bench

    assert encode_bench.main(["--turns", "40", "80", "--repeat", "1", "--whole"]) == 0
    out = json.loads(capsys.readouterr().out)
    for row in out["results"]:
        assert row["whole"]["same_ids_and_mask"] and row["tokens"] == row["whole"]["tokens"] > 0
        assert row["messages_rendered"] < row["whole"]["messages_rendered"]
