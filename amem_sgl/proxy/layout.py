"""The cache-stable prompt layout: where recalled memory goes in a request, and what stays frozen.

Order of a forwarded request: [tools][client system][memory block][history][newest turn].

* Tools and the client's system prompt are frozen per session: a later request whose tools/system
  are equal (by canonical JSON; tools as a set) gets the first-seen value back, byte for byte, so a
  client that rebuilds them in another key or list order still hits the cache.
* The memory block holds up to ``block_k`` chunks in insertion order (not by score), and is rebuilt
  only when the turn's top-k drifts past ``drift`` (the share of the top-k not in the block), or a
  chunk in it was forgotten.
* Recalled chunks not in the block go into the newest user turn (and the best ``focus`` ones even if
  the block has them, so the turn's best match sits next to the question); the exact text injected into each
  turn is kept in the session (keyed by the turn's position and content) and replayed when the client
  sends that turn again as history.
* Anthropic: ``cache_control`` breakpoints at the end of the memory block, the last stable turn and
  the end of the client's system prompt, in that priority, as many as fit under 4 with the client's own.
"""

from __future__ import annotations

import dataclasses

from amem_sgl.proxy.sessions import Session, canonical, digest

BLOCK_HEADER = "Relevant memory about the user (from earlier conversations):"
TURN_HEADER = "Also relevant from memory:"
MAX_BREAKPOINTS = 4


@dataclasses.dataclass
class Turn:
    """What the layout did to one request (reported in ``usage.amem``)."""

    block_ids: list[str]
    new_ids: list[str]
    rebuilt: bool
    drift: float
    replayed: int = 0
    breakpoints_client: int = 0
    breakpoints_added: int = 0

    @property
    def chunk_ids(self) -> list[str]:
        return self.block_ids + [c for c in self.new_ids if c not in self.block_ids]


def _bullets(header: str, chunks: list[dict]) -> str:
    return "\n".join([header, *(f"- {c['text'].strip()}" for c in chunks)])


def _ordered(chunks: list[dict]) -> list[dict]:
    return sorted(chunks, key=lambda c: (c.get("created", 0.0), c["id"]))


def turn_key(index: int, message: dict) -> str:
    return digest(index, message.get("role"), message.get("content"))[:32]


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def last_user(messages: list) -> int | None:
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            return i
    return None


def freeze(session: Session, name: str, value, as_set: bool = False):
    """The first-seen ``value`` while the client sends an equal one; a changed one replaces it."""
    if value is None:
        return None

    def key(v):
        return sorted(canonical(x) for x in v) if as_set and isinstance(v, list) else canonical(v)

    stored = session.frozen.get(name)
    if stored is not None and key(stored) == key(value):
        return stored
    session.frozen[name] = value
    return value


def plan_memory(session: Session, recalled: list[dict], known: dict[str, int], k: int,
                drift: float, focus: int = 0) -> tuple[Turn, list[dict]]:
    """Update the session's block from this turn's recall (best first, ``block_k`` long); returns
    the block and the chunks for the newest turn: the top-k ones the block lacks, plus the best
    ``focus`` ones even when the block has them (the turn's best match next to the question)."""
    if k < 1 or focus < 0:  # a negative count would slice from the end: the wrong chunks, silently
        raise ValueError(f"plan_memory needs k >= 1 and focus >= 0, got k={k}, focus={focus}")
    top = recalled[:k]
    stale = any(cid not in known for cid in session.block_ids)
    missing = [c for c in top if c["id"] not in session.block_ids]
    share = len(missing) / len(top) if top else 0.0
    rebuilt = False
    if recalled and (stale or not session.block_ids or share > drift):
        block = _ordered(recalled)
        session.block_ids, session.block_text = [c["id"] for c in block], _bullets(BLOCK_HEADER, block)
        session.rebuilds += 1
        rebuilt, missing = True, []
    elif stale:  # nothing recalled and a forgotten chunk in the block: drop the block
        session.block_ids, session.block_text, rebuilt = [], "", True
    best = top[:focus]  # last: nearest the question
    newest = _ordered([c for c in missing if c not in best]) + best
    return Turn(list(session.block_ids), [c["id"] for c in newest], rebuilt, share), newest


def injections(session: Session, messages: list, newest: int | None, new_chunks: list[dict],
               known: dict[str, int]) -> tuple[dict[int, str], int]:
    """The text to put into each user message: replayed for turns seen before (re-rendered without
    chunks forgotten since), fresh for the newest one. Records the newest one's in the session."""
    out, replayed = {}, 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        key = turn_key(i, message)
        if i == newest and key not in session.turns:
            session.turns[key] = {"ids": [c["id"] for c in new_chunks],
                                  "text": _bullets(TURN_HEADER, new_chunks) + "\n\n" if new_chunks else ""}
        entry = session.turns.get(key)
        if entry is None:
            continue
        if any(cid not in known for cid in entry["ids"]):
            entry["ids"], entry["text"] = [], ""  # a forgotten chunk is never sent again
        if entry["text"]:
            out[i] = entry["text"]
            replayed += i != newest
    return out, replayed


def _prepend(content, text: str, as_blocks: bool):
    if isinstance(content, str):
        return [{"type": "text", "text": text + content}] if as_blocks else text + content
    if isinstance(content, list):
        return [{"type": "text", "text": text}, *content]
    return content


def openai_layout(body: dict, session: Session, turn: Turn, inject: dict[int, str], namespace_hash: str) -> dict:
    messages = body["messages"]
    lead = 0
    while lead < len(messages) and isinstance(messages[lead], dict) and messages[lead].get("role") in ("system", "developer"):
        lead += 1
    out = dict(body)
    system = freeze(session, "system", messages[:lead] or None) or []
    rest = [dict(m, content=_prepend(m.get("content"), inject[i], False)) if i in inject else m
            for i, m in enumerate(messages) if i >= lead]
    block = [{"role": "system", "content": session.block_text}] if session.block_text else []
    out["messages"] = [*system, *block, *rest]
    if "tools" in body:
        out["tools"] = freeze(session, "tools", body["tools"], as_set=True)
    out.setdefault("prompt_cache_key", namespace_hash)
    return out


def _blocks(content) -> list:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def count_breakpoints(body: dict) -> int:
    def marked(items) -> int:
        return sum(1 for x in items if isinstance(x, dict) and x.get("cache_control") is not None)

    system = body.get("system")
    n = marked(body.get("tools") or []) + (marked(system) if isinstance(system, list) else 0)
    for m in body.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            n += marked(m["content"])
    return n


def anthropic_layout(body: dict, session: Session, turn: Turn, inject: dict[int, str], ttl: str) -> dict:
    """Every string content becomes one text block (same tokens, and a place for ``cache_control``)."""
    out = dict(body)
    turn.breakpoints_client = count_breakpoints(body)
    if "tools" in body:
        out["tools"] = freeze(session, "tools", body["tools"], as_set=True)
    client_system = [dict(b) for b in _blocks(freeze(session, "system", body.get("system")))]
    block = [{"type": "text", "text": session.block_text}] if session.block_text else []
    messages = []
    for i, m in enumerate(body["messages"]):
        content = _prepend(m.get("content"), inject[i], True) if i in inject else _blocks(m.get("content"))
        messages.append(dict(m, content=[dict(b) if isinstance(b, dict) else b for b in content]))
    newest = last_user(body["messages"])
    stable = messages[newest - 1]["content"] if newest else []
    spots = [block[-1:], stable[-1:], client_system[-1:] if block else []]
    marker = {"type": "ephemeral", **({"ttl": ttl} if ttl != "5m" else {})}
    budget = MAX_BREAKPOINTS - turn.breakpoints_client
    for spot in spots:
        if budget <= 0:
            break
        if spot and isinstance(spot[0], dict) and spot[0].get("cache_control") is None and spot[0].get("type") == "text":
            spot[0]["cache_control"] = dict(marker)
            budget -= 1
            turn.breakpoints_added += 1
    if client_system or block:
        out["system"] = client_system + block
    out["messages"] = messages
    return out
