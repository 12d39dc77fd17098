"""WebShop human session logs: one JSONL line per page visited -> one demonstration per session.

The web app logged page states, not actions, so each action is inferred from two consecutive pages
(the WebShop action space: search[...], click[<asin>], click[<option>], click[< Prev], click[Next >],
click[Back to Search], click[<sub-page>], click[Buy Now]). Between actions, a short user turn
summarises the page the action led to; the conversation ends with the purchase.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from urllib.parse import unquote, urlparse

from curate.formats.records import BadRecord, as_outcome, message, type_name

PAGE_TYPES = ("index", "search_results", "item_page", "item_sub_page", "done")
_PATH_PAGES = PAGE_TYPES[1:]  # the index page's URL path is just the session id


def is_page_visit(raw: dict) -> bool:
    """Whether a raw line is one logged WebShop page visit: a string `page`, and `url` and `goal` fields."""
    return isinstance(raw.get("page"), str) and "url" in raw and "goal" in raw


def session_key(visit: dict, default: str) -> str:
    """The session id from the visit's URL ("/<page>/<session>/..." or "/<session>"); `default` when the
    URL has none or cannot be parsed (the visit's own conversion then says what is wrong with it)."""
    try:
        parts = [p for p in urlparse(str(visit.get("url", ""))).path.split("/") if p]
    except ValueError:  # e.g. "Invalid IPv6 URL": grouping must not fail, it runs outside any one record
        return default
    if parts and parts[0] in _PATH_PAGES:
        parts = parts[1:]
    return parts[0] if parts else default


def group_sessions(items: Iterable[tuple[int, dict]], default: str) -> Iterator[tuple[int, dict]]:
    """Consecutive page visits of one session -> (index of the first visit, {session_id, pages}).

    A session ends when the session id changes or after its `done` page.
    """
    group: list[dict] = []
    start, key = 0, None
    for index, visit in items:
        this_key = session_key(visit, default)
        if group and this_key != key:
            yield start, {"session_id": key, "pages": group}
            group = []
        if not group:
            start, key = index, this_key
        group.append(visit)
        if visit.get("page") == "done":
            yield start, {"session_id": key, "pages": group}
            group = []
    if group:
        yield start, {"session_id": key, "pages": group}


def _content(visit: dict) -> dict:
    content = visit.get("content")
    return content if isinstance(content, dict) else {}


def _options(content: dict) -> dict:
    options = content.get("options")
    return options if isinstance(options, dict) else {}


def _page_number(content: dict) -> int:
    """Search results page; logged as an int on result pages and as a string on item pages."""
    try:
        return int(content.get("page", 1))
    except (TypeError, ValueError):
        return 1


def _sub_page(visit: dict) -> str:
    """Item sub-pages (Description, Features, Reviews...) are named in the URL after the keywords."""
    name = _content(visit).get("sub_page")
    if not name:
        parts = [p for p in urlparse(str(visit.get("url", ""))).path.split("/") if p]
        name = unquote(parts[4]) if len(parts) > 4 else None
    if not name:
        raise BadRecord("webshop session: cannot tell which item sub-page was opened")
    return str(name)


def _action(prev: dict | None, visit: dict) -> str | None:
    """The action that led from `prev` to `visit`; None when nothing was done (a reload)."""
    page, before = visit["page"], (prev or {}).get("page", "index")
    now, then = _content(visit), _content(prev or {})
    if page == "done":
        return "click[Buy Now]"
    if page == "index":
        return None if before == "index" else "click[Back to Search]"
    if page == "search_results":
        if before in ("item_page", "item_sub_page"):
            return "click[< Prev]"
        if before == "search_results" and now.get("keywords") == then.get("keywords"):
            return "click[Next >]" if _page_number(now) > _page_number(then) else "click[< Prev]"
        keywords = now.get("keywords") or []
        return f"search[{' '.join(map(str, keywords)) if isinstance(keywords, list) else keywords}]"
    if page == "item_sub_page":
        return f"click[{_sub_page(visit)}]"
    if before == "item_sub_page":
        return "click[< Prev]"
    if before == "item_page" and now.get("asin") == then.get("asin"):
        old = _options(then)
        changed = [v for k, v in _options(now).items() if old.get(k) != v]
        return f"click[{changed[0]}]" if changed else None
    return f"click[{now.get('asin')}]"


def _observation(visit: dict) -> str:
    c, page = _content(visit), visit["page"]
    if page == "search_results":
        asins = c.get("search_result_asins")
        asins = asins if isinstance(asins, list) else []
        return f"search results (page {_page_number(c)}): " + ", ".join(map(str, asins))
    if page in ("item_page", "item_sub_page"):
        options = ", ".join(f"{k}: {v}" for k, v in _options(c).items())
        where = f"item {c.get('asin')}" + (f" ({_sub_page(visit)})" if page == "item_sub_page" else "")
        return where + (f", selected {options}" if options else "")
    return "search page"


# The fields of a page visit the conversation is made from; any other (the done page's reward_info, say) is kept
_VISIT_FIELDS = frozenset(("page", "url", "goal", "content", "reward"))


def convert_webshop_session(raw: dict, notes: list[str]) -> tuple[list[dict], str | None, float, dict]:
    """A grouped session {session_id, pages} (or one page visit) -> (messages, None, reward, kept): `kept` holds
    what the conversation does not, for the record's metadata: the whole goal (the task's asin, attributes,
    options and price bound beside its instruction text), the purchase (the done page's content: asin,
    options, price) and the done page's other fields (reward_info: the reward's breakdown). Other fields of
    earlier visits are named in `notes`."""
    pages = raw["pages"] if "pages" in raw else [raw]
    if not isinstance(pages, list) or not all(isinstance(p, dict) and p.get("page") in PAGE_TYPES for p in pages):
        raise BadRecord(f"webshop session: pages must be page-visit objects with 'page' in {list(PAGE_TYPES)}")
    goal = pages[0].get("goal")
    task = goal.get("instruction_text") if isinstance(goal, dict) else goal
    if not isinstance(task, str) or not task.strip():
        raise BadRecord(f"webshop session: goal has no instruction_text (goal is {type_name(goal)})")
    messages, prev, unread = [message("user", task)], None, set()
    for visit in pages:
        action = _action(prev, visit)
        if action is not None:
            messages.append(message("assistant", action))
            if visit["page"] == "done":
                kept = {k: v for k, v in visit.items() if k not in _VISIT_FIELDS}
                if isinstance(visit.get("content"), dict):  # what was bought: asin, options and its price
                    kept["purchase"] = visit["content"]
                if isinstance(goal, dict) and goal.keys() - {"instruction_text"}:
                    kept["goal"] = goal
                if unread:
                    notes.append(f"webshop page-visit fields {sorted(unread)} before the done page not kept")
                return messages, None, as_outcome("reward", visit.get("reward")), kept
            messages.append(message("user", _observation(visit)))
        unread |= visit.keys() - _VISIT_FIELDS
        prev = visit
    raise BadRecord("webshop session has no 'done' page (session not finished)")

