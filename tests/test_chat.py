import os

import pytest

from curate import chat
from curate.chat import encode, prompt_messages

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes.\nVery sure."}]


def masked_text(tok, enc):
    return tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask) if m])


def test_mask_covers_every_assistant_turn_and_its_end_token(smol_tokenizer):
    enc = encode(smol_tokenizer, CONV)
    assert masked_text(smol_tokenizer, enc) == "It is 4.<|im_end|>Yes.\nVery sure.<|im_end|>"
    full = smol_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert smol_tokenizer.decode(enc.input_ids) == full  # exactly the tokens a trainer sees
    assert not enc.truncated


def test_left_truncation_keeps_the_last_turns(smol_tokenizer):
    full = encode(smol_tokenizer, CONV)
    cut = encode(smol_tokenizer, CONV, max_length=12)
    # the template's newline after the last <|im_end|> predicts nothing a loss counts: it goes before the start
    end = len(full.input_ids) - 1
    assert full.loss_mask[end - 1] == 1 and full.loss_mask[end:] == [0]
    assert cut.truncated and len(cut.input_ids) == 12
    assert cut.input_ids == full.input_ids[:end][-12:] and cut.loss_mask == full.loss_mask[:end][-12:]
    assert masked_text(smol_tokenizer, cut).endswith("Very sure.<|im_end|>")


def test_truncation_drops_what_follows_the_last_reply_before_the_context(smol_tokenizer):
    # a conversation ending in a long tool result or user turn: the tail predicts nothing the loss counts
    long_tail = CONV + [{"role": "user", "content": " ".join(["more"] * 200)}]
    reply = encode(smol_tokenizer, CONV)
    cut = encode(smol_tokenizer, long_tail, max_length=len(reply.input_ids))
    assert sum(cut.loss_mask) == sum(reply.loss_mask)
    assert cut.input_ids == reply.input_ids[:-1]  # all of it up to the last reply's <|im_end|>, no context cut
    assert not cut.truncated  # the scores are those of the whole conversation
    assert masked_text(smol_tokenizer, cut) == "It is 4.<|im_end|>Yes.\nVery sure.<|im_end|>"


def test_prompt_is_everything_before_the_first_answer():
    assert prompt_messages(CONV) == CONV[:2]


def test_prompt_column_equals_prompt_messages_row_by_row():
    import random

    import pyarrow as pa

    from curate.schema import MESSAGES

    rng = random.Random(0)
    rows = [[{"role": rng.choice(["system", "user", "assistant", "tool"]), "content": f"m{i}-{k}"}
             for k in range(rng.randint(0, 6))] for i in range(300)]
    arr = pa.array(rows, type=MESSAGES)
    for table in (arr, arr.slice(7, 200), pa.chunked_array([arr.slice(0, 100), arr.slice(100)])):
        expected = [chat.prompt_messages(m) for m in table.to_pylist()]
        assert chat.prompt_column(table).to_pylist() == expected


# ------------------------------------------------------------------------------ plain chats, errors

def reference_encode(tok, messages):
    """The rendering-by-prefixes rule every plain chat is held to (curate's encode before tool support):
    turn i spans from the end of the generation prompt after messages[:i] to the end of messages[:i+1]
    rendered (trailing whitespace stripped); a token is a target when it starts inside a span."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            upto = tok.apply_chat_template(messages[:i + 1], tokenize=False)
            assert text.startswith(head) and text.startswith(upto)
            spans.append((len(head), len(upto.rstrip())))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= a < e for s, e in spans) and b > a) for a, b in enc["offset_mapping"]]
    return enc["input_ids"], mask


def plain_chats(seed: int, n: int):
    import random

    rng = random.Random(seed)
    words = "the cat sat on a mat 42 <b> é 你好 \n . , ! x".split(" ")
    for _ in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 4)):
            messages.append({"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 6)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 8))) + "."})
        yield messages


def test_plain_chats_keep_the_prefix_rendering_mask(smol_tokenizer):
    for messages in plain_chats(0, 40):
        enc = encode(smol_tokenizer, messages)
        assert (enc.input_ids, enc.loss_mask) == reference_encode(smol_tokenizer, messages)
        assert enc.tool_rendering is None


def test_plain_chats_keep_the_prefix_rendering_mask_under_other_templates(smol_tokenizer):
    import copy

    trl = pytest.importorskip("trl")
    folder = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
    for name in ("qwen2_5.jinja", "llama3_1.jinja", "qwen3_training.jinja"):
        tok = copy.copy(smol_tokenizer)
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            tok.chat_template = f.read()
        for messages in plain_chats(1, 10):
            enc = encode(tok, messages)
            assert (enc.input_ids, enc.loss_mask) == reference_encode(tok, messages), name
            # the same template passed as an argument gives the same result
            other = encode(smol_tokenizer, messages, chat_template=tok.chat_template)
            assert (other.input_ids, other.loss_mask) == (enc.input_ids, enc.loss_mask)


def test_null_fields_from_arrow_are_dropped(smol_tokenizer):
    rows = [{"role": m["role"], "content": m["content"], "tool_calls": None, "tool_call_id": None, "name": None,
             "reasoning_content": None} for m in CONV]
    a, b = encode(smol_tokenizer, CONV), encode(smol_tokenizer, rows)
    assert (a.input_ids, a.loss_mask, a.tool_rendering) == (b.input_ids, b.loss_mask, None)


def test_template_errors_become_template_error(smol_tokenizer):
    raising = "{% for m in messages %}{{ raise_exception('No ' + m['role'] + ' here') }}{% endfor %}"
    broken = "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}"
    with pytest.raises(chat.TemplateError) as e:
        encode(smol_tokenizer, CONV, chat_template=raising)
    assert str(e.value) == "chat template: No system here" and isinstance(e.value, ValueError)
    with pytest.raises(chat.TemplateError, match=r"^chat template: TypeError: "):
        encode(smol_tokenizer, CONV, chat_template=broken)
    with pytest.raises(chat.TemplateError, match=r"^chat template: TemplateSyntaxError: "):
        encode(smol_tokenizer, CONV, chat_template="{% for m in messages %}")


def test_an_empty_reply_is_refused(smol_tokenizer):
    messages = [CONV[1], {"role": "assistant", "content": ""}, CONV[3], CONV[4]]
    with pytest.raises(chat.TemplateError, match=r"^chat template: assistant turn 1 renders no tokens$"):
        encode(smol_tokenizer, messages)


def test_template_sha256_names_the_template_used(smol_tokenizer):
    import hashlib

    own = chat.template_sha256(smol_tokenizer)
    assert own == hashlib.sha256(smol_tokenizer.chat_template.encode("utf-8")).hexdigest()
    assert chat.template_sha256(smol_tokenizer, "{{ messages }}") == hashlib.sha256(b"{{ messages }}").hexdigest()
