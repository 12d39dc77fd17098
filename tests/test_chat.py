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
    assert cut.truncated and len(cut.input_ids) == 12
    assert cut.input_ids == full.input_ids[-12:] and cut.loss_mask == full.loss_mask[-12:]
    assert masked_text(smol_tokenizer, cut).endswith("Very sure.<|im_end|>")


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
