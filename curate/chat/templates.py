"""The chat template itself: which text is used, its identity, and rendering with every error turned
into TemplateError (a ValueError whose message starts with "chat template: ")."""

from __future__ import annotations

import hashlib


class TemplateError(ValueError):
    """The chat template refused the record (its own message follows), or an assistant turn cannot be
    found in, or renders nothing of its own in, the rendered text. str(e) starts with "chat template: "."""


class TokenizerError(ValueError):
    """The tokenizer refused the rendered text of the record (e.g. a lone surrogate, which is not
    Unicode text). str(e) starts with "tokenizer: ", then the exception's type and message."""


# Exceptions that are never one record's fault, so never a quarantine reason: the machine's
# (MemoryError) and the files' (OSError: the model folder, the disk). Anything else a template or a
# tokenizer raises on one record (jinja2's SecurityError from the sandbox, UndefinedError, TypeError,
# KeyError, IndexError, RecursionError from a template recursing on the input, UnicodeError...) is
# about that record: it becomes the record's reason and the run goes on. KeyboardInterrupt and
# SystemExit are not Exceptions: `except Exception` never catches them.
NOT_RECORD_ERRORS = (MemoryError, OSError)


def record_error(e: Exception) -> str:
    """The quarantine reason for an exception raised while rendering or tokenising one record: a
    TemplateError's or TokenizerError's own message, else "chat template: TYPE: message" (the record
    is being prepared for, or rendered by, the template)."""
    if isinstance(e, (TemplateError, TokenizerError)):
        return str(e)
    return str(template_error(e))


def template_text(tokenizer, chat_template: str | None = None, tools: list[dict] | None = None) -> str:
    """The template text `apply_chat_template` would use: `chat_template` (a template, or the name of one
    of the tokenizer's named templates) or the tokenizer's own. TemplateError when there is none."""
    try:
        return tokenizer.get_chat_template(chat_template, tools or None)
    except NOT_RECORD_ERRORS:
        raise
    except Exception as e:  # noqa: BLE001 - transformers says why in a ValueError
        raise template_error(e) from e


def template_sha256(tokenizer, chat_template: str | None = None) -> str:
    """Hex sha256 of the template text used (UTF-8): what a manifest records to identify it."""
    return hashlib.sha256(template_text(tokenizer, chat_template).encode("utf-8")).hexdigest()


def render_template(tokenizer, template: str, messages: list[dict], tools: list[dict] | None,
            generation_prompt: bool = False) -> str:
    """apply_chat_template on messages already in template form; every error becomes TemplateError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except NOT_RECORD_ERRORS:  # not the record's fault (see NOT_RECORD_ERRORS)
        raise
    except Exception as e:  # noqa: BLE001 - a template can raise anything (raise_exception, TypeError, ...)
        raise template_error(e) from e


def template_error(e: Exception) -> TemplateError:
    """`e` as a TemplateError ("chat template: ..."): a TemplateError as it is, jinja2's `raise_exception`
    error by its own message, anything else as "TYPE: message"."""
    import jinja2

    if isinstance(e, TemplateError):
        return e
    # raise_exception(...) in a template raises jinja2's base TemplateError with the template's words
    message = str(e) if type(e) is jinja2.exceptions.TemplateError else f"{type(e).__name__}: {e}"
    return TemplateError(f"chat template: {message}")


def check_template(text: str, where: str) -> None:
    """Refuse a template text Jinja cannot compile, before any record is rendered with it: ValueError
    "--chat-template WHERE: not a valid Jinja template (line N: message)". Compiled as transformers
    compiles chat templates (sandboxed, trim_blocks, lstrip_blocks, loop controls, its
    `{% generation %}` tag), so unknown tags, unclosed blocks and unknown filters are caught."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # transformers' {% generation %} ... {% endgeneration %}, parsed only
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    try:
        env.compile(text)
    except jinja2.TemplateSyntaxError as e:  # TemplateAssertionError (an unknown filter) included
        if isinstance(e, jinja2.TemplateAssertionError) and _transformers_compiles(text):
            return  # a filter or test transformers adds (it adds only `tojson` today, which Jinja has)
        raise ValueError(f"--chat-template {where}: not a valid Jinja template (line {e.lineno}: {e.message})") from None


def _transformers_compiles(text: str) -> bool:
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return False
    try:
        _compile_jinja_template(text)
    except Exception:  # noqa: BLE001 - any failure: it does not compile there either
        return False
    return True
