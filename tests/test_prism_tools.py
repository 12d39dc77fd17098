"""`curate prism` end to end on real tool-calling data (τ-bench airline, LLaMA-Factory's glaive set) with a
tiny random model: every record routed, none quarantined, messages and tools kept, and the loss mask
on exactly the assistant turns the template renders (tool calls in, tool results out), under SmolLM2's
ChatML template (which ignores tools: curate's text form) and under the real Qwen3 and Llama-3.1
templates given with --chat-template."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from curate import chat
from curate.cli import main
from curate.formats.adapters import iter_normalized
from curate.io.readers import read_records
from curate.messages import compact_all, parse_tools

TOOLS_DATA = Path(__file__).resolve().parent / "data" / "tools"
TAU = TOOLS_DATA / "tau_bench_airline.lines1-12.jsonl"
TAU_TOOLS = TOOLS_DATA / "airline_tools.json"
GLAIVE = TOOLS_DATA / "glaive_toolcall.records1-30.json"


def trl_template(name: str) -> Path:
    trl = pytest.importorskip("trl")
    path = Path(os.path.dirname(trl.__file__)) / "chat_templates" / name
    if not path.exists():
        pytest.skip(f"this TRL has no {name}")
    return path


def read_partitions(out: Path) -> list[dict]:
    rows = []
    for part in ("sft", "rl"):
        for f in sorted((out / part).glob("*.arrow")):
            with pa.OSFile(str(f), "rb") as src:
                rows += pa.ipc.open_stream(src).read_all().to_pylist()
    return rows


def expected_records() -> dict[tuple[str, int], object]:
    """What ingest should make of each input record: adapters' normalisation, read independently."""
    tools = json.dumps(json.loads(TAU_TOOLS.read_text()), ensure_ascii=False, separators=(",", ":"))
    out = {}
    for path in (TAU, GLAIVE):
        for i, _, n in iter_normalized(path, read_records(path), "auto", tools):
            out[str(path), i] = n
    return out


@pytest.fixture(scope="module")
def routed(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("tools") / "routed"
    assert main(["prism", "--input", str(TAU), str(GLAIVE), "--tools", str(TAU_TOOLS), "--out", str(out),
                 "--model", tiny_model_dir, "--max-length", "1024", "--shard-size", "16"]) == 0
    return out


def test_every_record_is_routed_and_none_quarantined(routed):
    m = json.loads((routed / "manifest.json").read_text())
    c = m["counts"]
    assert c["input"] == 12 + 30 and c["quarantined"] == 0
    assert c["sft"] + c["rl"] + c["duplicates"] == c["input"]
    # SmolLM2's ChatML template ignores tool calls and tools: every tool record used the text form
    assert m["chat_template"]["source"] == "tokenizer" and len(m["chat_template"]["sha256"]) == 64
    assert m["chat_template"]["tool_support"]["tool_calls"] is False
    with_tools = [r for r in read_partitions(routed)
                  if r["tools"] or any(x["role"] == "tool" or x["tool_calls"] for x in r["messages"])]
    assert m["chat_template"]["tool_rendering"] == {"text": len(with_tools)} and len(with_tools) > 12
    assert m["ingest_notes"] == {} and m["chat_template"]["unrendered"] == {}


def test_routed_rows_keep_messages_and_tools(routed):
    expected = expected_records()
    rows = read_partitions(routed)
    assert len(rows) == len({r["id"] for r in rows})
    for row in rows:
        n = expected[row["source"], row["source_index"]]
        assert compact_all(row["messages"]) == n.messages
        assert row["tools"] == n.tools
        first_reply = next(i for i, m in enumerate(n.messages) if m["role"] == "assistant")
        assert compact_all(row["prompt"]) == n.messages[:first_reply]  # system turn included
    tau = [r for r in rows if r["source"] == str(TAU)]
    assert len(tau) == 12 and all(json.loads(r["tools"]) == json.loads(TAU_TOOLS.read_text()) for r in tau)


def masked_runs(tokenizer, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded text of each run of consecutive target tokens."""
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def tool_results(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "tool" and len(m["content"]) > 8]


def sample_records() -> list[tuple[list[dict], list[dict] | None]]:
    tools = json.loads(TAU_TOOLS.read_text())
    tau = [json.loads(line) for line in TAU.read_text().splitlines()[:3]]
    glaive = [r for r in json.loads(GLAIVE.read_text()) if '"function_call"' in json.dumps(r)][:3]
    out = [(n.messages, parse_tools(n.tools) if n.tools else None)
           for _, _, n in iter_normalized(TAU, enumerate(tau), "auto", json.dumps(tools))]
    out += [(n.messages, parse_tools(n.tools)) for _, _, n in iter_normalized(GLAIVE, enumerate(glaive))]
    return out


def test_chatml_mask_is_the_assistant_turns_in_text_form(smol_tokenizer):
    """SmolLM2's template: each assistant turn renders as its content, then each call as a <tool_call>
    block, then <|im_end|>; the independent expectation below is built from the messages alone."""
    for messages, tools in sample_records():
        enc = chat.encode(smol_tokenizer, messages, tools=tools)
        assert enc.tool_rendering == "text"
        runs = masked_runs(smol_tokenizer, enc.input_ids, enc.loss_mask)
        want = []
        for m in messages:
            if m["role"] != "assistant":
                continue
            calls = [chat.tool_call_text(c) for c in m.get("tool_calls", [])]
            want.append("\n".join(([m["content"]] if m["content"] else []) + calls) + "<|im_end|>")
        assert runs == want
        text = "".join(runs)
        assert not any(result in text for result in tool_results(messages))


def test_qwen3_mask_equals_transformers_assistant_mask(smol_tokenizer):
    """TRL's `{% generation %}` edition of Qwen3's template, given to curate as a plain template: curate's
    mask (found by rendering) against the mask transformers reads from the markers, an independent
    computation, on tool calls, tool results and schemas."""
    training = trl_template("qwen3_training.jinja").read_text()
    for messages, tools in sample_records():
        enc = chat.encode(smol_tokenizer, messages, tools=tools, chat_template=training)
        assert enc.tool_rendering == "template"
        # arguments as the strings they are: Qwen3 writes a string as given (as a trainer reading our
        # exported messages renders it)
        ref = smol_tokenizer.apply_chat_template(compact_all(messages), tools=tools, chat_template=training,
                                                 tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert enc.input_ids == list(ref["input_ids"])
        # the one designed difference: TRL's edition also trains the newline after <|im_end|>, which the
        # model never generates (it stops at <|im_end|>); curate leaves trailing whitespace out
        theirs = [0 if m and smol_tokenizer.decode([t]).isspace() and k and ids_end(smol_tokenizer, enc.input_ids, k)
                  else m for k, (t, m) in enumerate(zip(ref["input_ids"], ref["assistant_masks"]))]
        assert enc.loss_mask == theirs and sum(theirs) > 0


def ids_end(tokenizer, ids: list[int], k: int) -> bool:
    return tokenizer.decode([ids[k - 1]]) == "<|im_end|>"


def test_qwen3_history_rewrite_masks_what_it_renders(smol_tokenizer):
    """Qwen3's own template drops the reasoning of turns before the last user query: those turns are
    masked as rendered (no reasoning), the last turn with its reasoning; calls in, results out."""
    template = trl_template("qwen3.jinja").read_text()
    for messages, tools in sample_records():
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        messages = [{**m, "reasoning_content": f"thought {i}."} if m["role"] == "assistant" else m
                    for i, m in enumerate(messages)]
        enc = chat.encode(smol_tokenizer, messages, tools=tools, chat_template=template)
        assert enc.tool_rendering == "template"
        runs = masked_runs(smol_tokenizer, enc.input_ids, enc.loss_mask)
        assert len(runs) == len(replies)
        text = smol_tokenizer.decode(enc.input_ids)
        last_query = max(i for i, m in enumerate(messages) if m["role"] == "user")
        for run, i in zip(runs, replies):
            m = messages[i]
            assert run.endswith("<|im_end|>") and m["content"] in run
            for c in m.get("tool_calls", []):
                assert f'"name": "{c["function"]["name"]}"' in run
            kept = i > last_query
            assert (f"<think>\nthought {i}.\n</think>" in run) == kept
            assert (f"thought {i}." in text) == kept
        assert not any(result in "".join(runs) for result in tool_results(messages))


def test_llama31_mask_holds_the_calls_and_not_the_results(smol_tokenizer):
    template = trl_template("llama3_1.jinja").read_text()
    for messages, tools in sample_records():
        enc = chat.encode(smol_tokenizer, messages, tools=tools, chat_template=template)
        runs = masked_runs(smol_tokenizer, enc.input_ids, enc.loss_mask)
        replies = [m for m in messages if m["role"] == "assistant"]
        assert len(runs) == len(replies)
        for run, m in zip(runs, replies):
            # SmolLM2's tokenizer does not know Llama's special tokens, so a token may run past the end
            assert "<|eot_id|>" in run[-14:] or "<|eom_id|>" in run[-14:]
            for c in m.get("tool_calls", []):  # Llama-3.1 writes {"name": ..., "parameters": ...}
                assert f'"name": "{c["function"]["name"]}"' in run and '"parameters"' in run
            if m["content"]:
                assert m["content"] in run
        assert not any(result in "".join(runs) for result in tool_results(messages))


@pytest.mark.parametrize("name", ["qwen3.jinja", "llama3_1.jinja"])
def test_prism_with_a_real_template_routes_everything(tmp_path, tiny_model_dir, name):
    out = tmp_path / "routed"
    template = trl_template(name)
    assert main(["prism", "--input", str(TAU), str(GLAIVE), "--tools", str(TAU_TOOLS), "--out", str(out),
                 "--model", tiny_model_dir, "--chat-template", str(template), "--max-length", "512",
                 "--shard-size", "64", "--prefix", "none"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["quarantined"] == 0 and m["counts"]["sft"] + m["counts"]["rl"] > 0
    assert m["chat_template"]["source"] == "--chat-template"
    assert set(m["chat_template"]["tool_rendering"]) == {"template"}
    # Llama-3.1 writes a call turn's JSON only, not the text beside it (τ-bench has such turns): said so
    lost = m["chat_template"]["unrendered"]
    assert lost == ({"content beside tool calls": lost["content beside tool calls"]} if name == "llama3_1.jinja" else {})


def test_a_template_that_refuses_a_record_quarantines_it(tmp_path, tiny_model_dir):
    """Gemma's template raises on a system turn: that record is quarantined with the template's words,
    the other is routed, the run exits 0."""
    template = trl_template("gemma.jinja")
    data = tmp_path / "in.jsonl"
    ok = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    refused = {"messages": [{"role": "system", "content": "Be brief."}, *ok["messages"]]}
    data.write_text(json.dumps(ok) + "\n" + json.dumps(refused) + "\n")
    out = tmp_path / "routed"
    assert main(["prism", "--input", str(data), "--out", str(out), "--model", tiny_model_dir,
                 "--chat-template", str(template), "--prefix", "none"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["quarantined"] == 1 and m["counts"]["sft"] + m["counts"]["rl"] == 1
    bad = [json.loads(line) for line in (out / "quarantine" / "part-00000.jsonl").read_text().splitlines()]
    assert bad[0]["source_index"] == 1 and bad[0]["reason"].startswith("chat template: ")


def test_drift_and_irft_quarantine_a_record_the_template_refuses(tmp_path, tiny_model_dir):
    """The generator's template (Gemma's) refuses a system turn: that record is quarantined with the
    template's words; the other is generated from; both jobs exit 0 with counts that reconcile."""
    import shutil

    model = tmp_path / "gemma-templated"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text(trl_template("gemma.jinja").read_text())
    ok = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "ground_truth": "4"}
    refused = {**ok, "messages": [{"role": "system", "content": "Be brief."}, *ok["messages"]]}
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(ok) + "\n" + json.dumps(refused) + "\n")
    for job, extra in (("irft", []), ("drift", ["--verifier", "exact", "--samples", "1", "--turns", "1"])):
        out = tmp_path / job
        assert main([job, "--input", str(data), "--out", str(out), "--model", str(model),
                     "--max-new-tokens", "4", *extra]) == 0
        bad = [json.loads(x) for x in (out / "quarantine" / "part-00000.jsonl").read_text().splitlines()]
        assert [(b["source_index"], b["reason"]) for b in bad] == [(1, "chat template: System role not supported")]


def test_tools_option_errors_are_usage_errors_naming_the_option(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "in"
    data.mkdir()
    (data / "tau.jsonl").write_text(TAU.read_text().splitlines()[0] + "\n")
    (data / "tools.json").write_text(TAU_TOOLS.read_text())
    base = ["prism", "--out", str(tmp_path / "o"), "--model", tiny_model_dir]
    for tools in (tmp_path, tmp_path / "missing.json"):  # a folder, a missing file
        assert main([*base, "--input", str(data), "--tools", str(tools)]) == 2
        assert f"--tools {tools}" in capsys.readouterr().err
    # the tools file given as the only input is not silently an empty run
    assert main([*base, "--input", str(data / "tools.json"), "--tools", str(data / "tools.json")]) == 2
    assert "no input file besides the --tools file" in capsys.readouterr().err


def test_repeated_input_options_read_every_input(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    assert main(["prism", "--input", str(TAU), "--input", str(GLAIVE), "--tools", str(TAU_TOOLS), "--out", str(out),
                 "--model", tiny_model_dir, "--max-length", "256", "--prefix", "none"]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["input"] == 12 + 30


def test_named_templates_are_each_in_the_manifest(tmp_path, tiny_model_dir):
    """A tokenizer with named templates renders records with tools by `tool_use` (transformers' rule):
    the manifest names both, so the tool rows' template is on record too."""
    import shutil

    model = tmp_path / "named"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    default = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").unlink()
    cfg["chat_template"] = [{"name": "default", "template": default},
                            {"name": "tool_use", "template": trl_template("qwen3.jinja").read_text()}]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    assert main(["prism", "--input", str(GLAIVE), "--out", str(out), "--model", str(model), "--max-length", "256",
                 "--prefix", "none"]) == 0
    m = json.loads((out / "manifest.json").read_text())["chat_template"]
    assert set(m["named"]) == {"default", "tool_use"} and m["named"]["default"]["sha256"] == m["sha256"]
    assert m["named"]["tool_use"]["tool_support"]["tool_calls"] and not m["tool_support"]["tool_calls"]
    assert m["tool_rendering"] == {"template": m["tool_rendering"]["template"]}  # tool rows: Qwen3's own form
