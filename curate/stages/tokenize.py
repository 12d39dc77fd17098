"""Stage `tokenize`: chat template + assistant-only loss mask, explicit left truncation.

The record's `tools` and every tool field of its messages go to the model's own chat template; a
record the template refuses is quarantined with the template's message (see curate/chat/), and so is
one on which the template or the tokenizer raises anything else (its type and message): one record
never stops the run."""

from __future__ import annotations

import pyarrow as pa
from tqdm.auto import tqdm

from curate import chat, models
from curate.messages import parse_tools
from curate.stages.base import TOKENIZER_LIBRARIES, Stage


class Tokenize(Stage):
    """Chat encoding per shard (module doc): input_ids (int32) and loss_mask (int8) of equal length and counts
    in tokens; `token_error` set for a record the template or tokenizer refuses (its ids empty) or that
    has no target token left."""

    name = "tokenize"
    libraries = TOKENIZER_LIBRARIES
    version = {"encoding": chat.ENCODING_VERSION}
    reads = ("messages", "tools")
    writes = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                        ("n_tokens", pa.int64()), ("n_loss_tokens", pa.int64()), ("truncated", pa.bool_()),
                        ("token_error", pa.string()), ("tool_rendering", pa.string()),
                        ("unrendered", pa.list_(pa.string()))])

    def tokenizer(self):
        """The model's tokenizer (cached per process); ModelError when it has no chat template and no
        --chat-template is given."""
        ref = models.resolve(self.config.model, self.config.trust_remote_code)
        return models.load_tokenizer(ref, require_template=self.config.chat_template is None)

    def describe(self) -> dict:
        """The template that produced the tokens (its sha256, and whether it came from --chat-template)
        and how it renders tool calls: what the manifest's `chat_template` reports."""
        tok, own = self.tokenizer(), self.config.chat_template
        out = {"sha256": chat.template_sha256(tok, own), "source": "--chat-template" if own else "tokenizer",
               "tool_support": chat.tool_support(tok, own)}
        if own is None and isinstance(tok.chat_template, dict):
            # named templates: transformers renders a record with tools by `tool_use`, others by `default`
            out["named"] = {name: {"sha256": chat.template_sha256(tok, name), "tool_support": chat.tool_support(tok, name)}
                            for name in sorted(tok.chat_template)}
        return {"chat_template": out}

    def run(self, shard: pa.Table) -> pa.Table:
        tok = self.tokenizer()
        rows = {k: [] for k in self.writes.names}
        tools = shard.column("tools").to_pylist() if "tools" in shard.column_names else [None] * shard.num_rows
        for messages, record_tools in tqdm(zip(shard.column("messages").to_pylist(), tools), total=shard.num_rows,
                                           desc="tokenize", unit="ex", leave=False):
            error = None
            try:
                enc = chat.encode(tok, messages, self.config.max_length, tools=parse_tools(record_tools),
                                  chat_template=self.config.chat_template)
                if enc.n_loss_tokens == 0:  # truncation keeps the last assistant tokens (--max-length >= 2)
                    error = "no assistant tokens after the chat template"
            except chat.NOT_RECORD_ERRORS:  # the machine's or the files', not this record's: stop the run
                raise
            except Exception as e:  # noqa: BLE001 - anything the template or tokenizer raises on this record
                # (a sandbox SecurityError, TypeError, RecursionError, ...) quarantines it, the run goes on
                enc = chat.Encoded([], [], False)
                error = chat.record_error(e)  # "chat template: TYPE: ..." / "tokenizer: TYPE: ..."
            rows["input_ids"].append(enc.input_ids)
            rows["loss_mask"].append(enc.loss_mask)
            rows["n_tokens"].append(len(enc.input_ids))
            rows["n_loss_tokens"].append(enc.n_loss_tokens)
            rows["truncated"].append(enc.truncated)
            rows["token_error"].append(error)
            rows["tool_rendering"].append(enc.tool_rendering)
            rows["unrendered"].append(list(enc.unrendered) or None)
        return self.check(shard, pa.table(rows))
