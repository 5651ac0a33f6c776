"""``prefix``: cache-aware placement; send a prompt where its prefix is probably cached.

llama-server keeps each slot's last prompt in its KV cache (``cache_prompt``, on by
default) and only prefills what differs. Sending a conversation's next turn, or a
request sharing a long system prompt, to the instance that was already sent that prefix
saves the prefill; sending it anywhere else pays it again. SGLang's gateway reports up
to 1.9x throughput from doing this. This policy keeps an approximate picture of what
each instance was sent (:class:`corral.scheduling.prefix_tree.PrefixTree`, one tree for
every model, its hash chains seeded by the model name) and routes by it, with a load
guard so that affinity never piles work on one instance while others idle.

The prompt key
--------------
What the server would tokenize as the prompt's prefix, as text (:func:`prompt_text`):
for chat (``messages``) the ``system`` field (Anthropic-style) and ``tools`` if present,
then every message's role and content in order (content as a string or a list of parts:
text parts by their text, other parts such as images by a digest of their JSON); for
completions, ``prompt`` (a string, a token list, or a list of either). Bodies with
neither get no key and go to the least busy instance. The key is cut into
``block_chars`` blocks hashed as a chain; only the first ``max_prompt_blocks`` count.

The rule (one place)
--------------------
Among the candidates (usable, with a free slot), with ``load = busy slots / slots``:

1. **Session**: a request carrying the session header goes to the instance that last
   served that session (per model), if it is a candidate and the load guard allows.
2. **Prefix**: otherwise, to the candidate with the longest *effective* match (matched
   blocks x that instance's reliability, see Feedback) if it reaches
   ``min_match_blocks`` or ``match_fraction`` of the prompt's blocks, and the load guard
   allows. Ties go to the least busy.
3. **Load guard** (SGLang's "max - min > 64 in flight and max > 1.5 x min", in slots):
   affinity is overruled when ``load(preferred) - load(least busy) > guard_margin`` and
   ``load(preferred) > guard_ratio x load(least busy)``; the request then goes to the
   least busy candidate.
4. **Least busy** otherwise: most free slots, then fewest in flight, then fewest served
   (the same order as ``least_busy``).

Whatever was chosen is then recorded as holding the prompt's blocks.

When the best-cached instance has no free slot it is not a candidate: ``choose`` can only
pick among the others (rules 2-4), and counts the decision as ``cached_full``. Before
that, the scheduler asks :meth:`PrefixPolicy.wait_advice` whether waiting for it is
cheaper: the prefill time of the blocks only it holds, at the learned prefill rate,
against its expected wait (``request_seconds / slots``). If so, the request waits in
the buffer for a slot on that instance only (counted ``wait_for_cache``), for at most
``min(saved prefill time, max_wait_s)``; requests behind it are not held up. When that
time is over it takes any free slot (``wait_expired``); when the instance leaves or
becomes unusable it stops waiting at once. With buffering off or the buffer full,
nothing waits.

Feedback and forgetting
-----------------------
The tree models what was *sent*, not what the server kept: llama-server reuses slots
and evicts. :meth:`PrefixPolicy.record_cached` takes what a response reported
(``timings.cache_n`` or ``usage.prompt_tokens_details.cached_tokens``, against
``prompt_tokens``) and compares it with the match predicted when the request was placed.
Each instance's reliability (an EWMA of actual / predicted, floored at
``reliability_floor``) scales its matches, so an instance whose recorded prefixes keep
turning out evicted attracts less. ``restart_misses`` predictions in a row that found
nothing cached mean the server lost everything (a restart nobody reported): its blocks
are forgotten. An instance is also forgotten when it reappears with a different URL or
process id, and through :meth:`PrefixPolicy.forget_instance`.

Defaults (:class:`PrefixSettings`)
----------------------------------
=====================  ========  ===================================================
setting                default   meaning
=====================  ========  ===================================================
block_chars            64        characters per hashed block (~16 tokens)
max_nodes              100000    blocks the tree keeps (LRU eviction above it)
max_prompt_blocks      4096      leading blocks of one prompt that count (256 KiB)
min_match_blocks       2         a match of this many blocks is worth following...
match_fraction         0.3       ...and so is one covering this share of the prompt
guard_margin           0.5       load guard: load difference (busy share of slots)...
guard_ratio            1.5       ...and ratio, both exceeded -> least busy
session_header         x-session-id  header naming a session (case-insensitive)
max_sessions           10000     sessions remembered (LRU)
chars_per_token        4.0       prompt characters per token until feedback teaches
prefill_tokens_per_s   1000.0    prefill speed until feedback teaches (per instance)
request_seconds        4.0       request duration until feedback teaches (per instance)
max_wait_s             5.0       most ``wait_advice`` ever suggests waiting
learn_rate             0.2       EWMA weight of each feedback sample
reliability_floor      0.1       an instance's matches never count less than this
restart_misses         3         zero-cache predictions in a row before forgetting
max_predictions        4096      placements remembered for feedback (LRU)
pin_slots              False     also pin each request to a slot (``pin_slots``)
=====================  ========  ===================================================

Slot pinning (``pin_slots``, off by default)
--------------------------------------------
llama-server runs a request on the slot named by ``id_slot`` in its body. With
``pin_slots`` the policy keeps, per instance and slot, the prompt it last pinned there,
and :meth:`PrefixPolicy.choose_slot` (called by the scheduler once the instance is
chosen) names the free slot whose prompt shares the longest prefix with this one, else
the least recently used free slot (never-used first). The scheduler's lease carries the
slot (free again when the response ends; 1.5 s later when the client left, since
llama-server may still be generating for it) and the gateway writes ``"id_slot": N``
into the forwarded body (response header ``X-Corral-Slot``). Only chat and completion
routes are pinned (``/v1/messages`` drops ``id_slot`` in llama-server's conversion), never
a body with its own ``id_slot``, and nothing is pinned on an instance running requests
corral did not pin (unpinned routes, other clients: ``foreign_busy``), because then
which slots are free is not known exactly. Counted as ``slot_match`` / ``slot_lru``.

Why it is off by default:

- Without a pin, llama-server (b11434, ``get_available_slot``) already runs a request on
  the idle slot whose cached prompt shares the longest prefix with it
  (``--slot-prompt-similarity``, 0.1 by default), and its RAM prompt cache
  (``--cache-ram``) saves a slot's prompt before the slot takes other work and restores
  it into whichever slot the prompt's next request gets. In ``bench multiturn`` the
  instance-level policy already gets every cached token a perfect oracle would, so a
  pin has no cached token left to win; what it saves is the RAM cache's save and
  restore when a conversation changes slot (``bench multiturn`` compares both). With
  ``--cache-ram 0`` llama-server b11434 reused no prompt at all in that workload (0.7%
  cached, with or without pins), so pins cannot make up for a missing RAM cache.
- A pin is safe only when the balancer knows every slot's occupancy. Two balancers over
  the same agents (high availability), or clients reaching llama-server directly,
  could both pin to a slot they think free, and one request would wait inside
  llama-server (``defer``), outside the buffer's timeouts, while another slot idles.
  Under ``corral serve`` corral is the one client: there it is safe.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from corral.fleet.state import Instance
from corral.scheduling.policies.base import Placement, Policy, WaitAdvice
from corral.scheduling.prefix_tree import PrefixTree, chain_hashes

log = logging.getLogger(__name__)

_RECORD = "\x1e"  # between messages
_UNIT = "\x1f"  # between a message's role and its content
_GROUP = "\x1d"  # around non-text parts, between prompts of a list


@dataclass(frozen=True)
class PrefixSettings:
    """The ``prefix`` policy's tunables; the module docstring's table explains each."""

    block_chars: int = 64
    max_nodes: int = 100_000
    max_prompt_blocks: int = 4096
    min_match_blocks: int = 2
    match_fraction: float = 0.3
    guard_margin: float = 0.5
    guard_ratio: float = 1.5
    session_header: str = "x-session-id"
    max_sessions: int = 10_000
    chars_per_token: float = 4.0
    prefill_tokens_per_s: float = 1000.0
    request_seconds: float = 4.0
    max_wait_s: float = 5.0
    learn_rate: float = 0.2
    reliability_floor: float = 0.1
    restart_misses: int = 3
    max_predictions: int = 4096
    pin_slots: bool = False


@dataclass(frozen=True)
class Decision:
    """Why the last request went where it went (for logs, stats and tests).

    ``reason``: ``session``, ``prefix``, ``guard`` (affinity overruled by load),
    ``cached_full`` (the best-cached instance had no free slot), ``least_busy`` (no
    match worth following) or ``no_prompt`` (the body has no prompt key).
    """

    reason: str
    instance_id: str
    matched_blocks: int = 0
    prompt_blocks: int = 0


@dataclass
class _InstanceStats:
    """What feedback taught about one instance."""

    reliability: float = 1.0
    misses: int = 0
    prefill_tokens_per_s: float | None = None
    request_seconds: float | None = None


# -- the prompt key ---------------------------------------------------------------------


def _stable_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _content_text(content: Any) -> str:
    """A message's content as text: strings as they are, text parts by their text, other
    parts (images, audio) by a short digest, so equal media still match."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces: list[str] = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                kind = part.get("type", "part") if isinstance(part, dict) else "part"
                pieces.append(f"{_GROUP}{kind}:{hash(_stable_json(part)):x}{_GROUP}")
        return "".join(pieces)
    return _stable_json(content)


def _prompt_item(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, list) and all(isinstance(t, int) for t in item):
        return "tokens:" + " ".join(str(t) for t in item)
    return _stable_json(item)


def prompt_text(body: Mapping[str, Any] | None) -> str | None:
    """The text a server would tokenize as this request's prompt prefix, or None.

    Chat (``messages``): ``system`` and ``tools`` when present (templates render them
    first), then each message's role, content and tool calls, in order, so an earlier
    turn's key is a prefix of every later turn's. Completions: ``prompt``.
    """
    if not isinstance(body, Mapping):
        return None
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        pieces: list[str] = []
        if body.get("system") is not None:
            pieces.append(f"{_RECORD}system{_UNIT}{_content_text(body['system'])}")
        if body.get("tools"):
            pieces.append(f"{_RECORD}tools{_UNIT}{_stable_json(body['tools'])}")
        for message in messages:
            if not isinstance(message, dict):
                pieces.append(f"{_RECORD}{_stable_json(message)}")
                continue
            text = _content_text(message.get("content"))
            if message.get("tool_calls"):
                text += _GROUP + _stable_json(message["tool_calls"])
            pieces.append(f"{_RECORD}{message.get('role', '')}{_UNIT}{text}")
        return "".join(pieces)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt or None
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) for t in prompt):
            return _prompt_item(prompt)
        return _GROUP.join(_prompt_item(item) for item in prompt)
    return None


def _least_busy_key(instance: Instance) -> tuple[int, int, int, str]:
    """The ``least_busy`` order: most free slots, fewest in flight, fewest served."""
    return (-instance.free_slots, instance.in_flight, instance.served, instance.id)


def _load(instance: Instance) -> float:
    """The busy share of an instance's slots (0 for an instance reporting none)."""
    return instance.busy_slots / instance.total_slots if instance.total_slots > 0 else 0.0


class PrefixPolicy(Policy):
    """Cache-aware placement with a load guard, session affinity and feedback."""

    name = "prefix"
    advises_waits = True
    learns = True

    def __init__(self, settings: PrefixSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or PrefixSettings()
        self.tree = PrefixTree(self.settings.max_nodes)
        self.decisions: Counter[str] = Counter()
        """How many placements each :class:`Decision` reason took."""
        self.last_decision: Decision | None = None
        self._sessions: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._predictions: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._stats: dict[str, _InstanceStats] = {}
        self._seen: dict[str, tuple[str, int | None, float]] = {}
        self._chars_per_token = self.settings.chars_per_token
        self._slots: dict[str, dict[int, tuple[list[int], int]]] = {}
        """Per instance, per slot: the block chain last pinned there and when (a tick)."""
        self._tick = 0
        self._last_blocks: tuple[Placement, list[int]] | None = None

    # -- placement ------------------------------------------------------------------------

    def choose(self, candidates: Sequence[Instance], request: Placement) -> Instance | None:
        """Pick a candidate by session, then prefix, under the load guard (module doc)."""
        if not candidates:
            return None
        self._notice(candidates)
        least = min(candidates, key=_least_busy_key)
        blocks = self.blocks(request.model, request.body)
        self._last_blocks = (request, blocks)
        session = self._session_key(request)
        chosen: Instance | None = None
        reason = "no_prompt" if not blocks else "least_busy"
        depths: dict[str, int] = {}
        if session is not None:
            by_id = {c.id: c for c in candidates}
            previous = by_id.get(self._sessions.get(session, ""))
            if previous is not None and not self._overloaded(previous, least):
                chosen, reason = previous, "session"
        if blocks:
            depths = self.tree.match(blocks)
        if chosen is None and depths:
            preferred = self._best_match(candidates, depths, len(blocks))
            if preferred is not None:
                if self._overloaded(preferred, least):
                    reason = "guard"
                else:
                    chosen, reason = preferred, "prefix"
            if chosen is None and reason == "least_busy":
                ids = {c.id for c in candidates}
                best_id = max(depths, key=lambda h: self._effective(h, depths[h]))
                if best_id not in ids and self._worth_following(
                    self._effective(best_id, depths[best_id]), len(blocks)
                ):
                    reason = "cached_full"
        if chosen is None:
            chosen = least
        matched = depths.get(chosen.id, 0)
        self._record(request, session, blocks, chosen, matched)
        decision = Decision(reason, chosen.id, matched, len(blocks))
        self.last_decision = decision
        self.last_reason = reason
        self.decisions[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "prefix placement model=%s instance=%s reason=%s matched=%d/%d",
                request.model,
                chosen.id,
                reason,
                matched,
                len(blocks),
            )
        return chosen

    def wait_advice(self, pool: Sequence[Instance], request: Placement) -> WaitAdvice | None:
        """Whether to hold ``request`` for its best-cached instance, which is full.

        ``pool``: the model's usable instances, full or not. Advice comes only when the
        best match worth following is on an instance with no free slot and re-prefilling
        what only it holds would take longer than its expected wait (``request_seconds``,
        learned per instance, over its slot count). The scheduler then holds the
        request for that instance for at most ``max_wait_s`` and otherwise places it as
        usual (see :meth:`corral.scheduling.scheduler.Scheduler.acquire`). Pure:
        records nothing.
        """
        blocks = self.blocks(request.model, request.body)
        if not blocks or not pool:
            return None
        depths = self.tree.match(blocks)
        holder = self._best_match(pool, depths, len(blocks))
        if holder is None or holder.free_slots > 0:
            return None
        free = [i for i in pool if i.free_slots > 0]
        elsewhere = max((self._effective(i.id, depths.get(i.id, 0)) for i in free), default=0.0)
        saved_blocks = self._effective(holder.id, depths[holder.id]) - elsewhere
        if saved_blocks <= 0:
            return None
        stats = self._stats.get(holder.id, _InstanceStats())
        tokens = saved_blocks * self.settings.block_chars / self._chars_per_token
        rate = stats.prefill_tokens_per_s or self.settings.prefill_tokens_per_s
        saved_s = tokens / rate
        duration = stats.request_seconds or self.settings.request_seconds
        wait_s = duration / max(1, holder.total_slots)
        if saved_s <= wait_s:
            return None
        return WaitAdvice(holder.id, wait_s, saved_s, min(saved_s, self.settings.max_wait_s))

    def choose_slot(self, instance: Instance, request: Placement) -> int | None:
        """The slot of ``instance`` to pin ``request`` to, or None (see "Slot pinning").

        Only with ``pin_slots``, for a pinnable route with a prompt key and no
        ``id_slot`` of the client's own, and only while every busy slot there is one of
        this balancer's pinned requests (so the free ones are known exactly). Among the
        free slots: the one whose last pinned prompt shares the longest prefix with this
        one, else the one used least recently (never-used first).
        """
        if not self.settings.pin_slots or not request.pinnable:
            return None
        body = request.body
        if body is None or "id_slot" in body:
            return None
        if instance.unpinned or instance.foreign_busy or instance.total_slots <= 0:
            return None
        free = [s for s in range(instance.total_slots) if s not in instance.pinned_slots]
        if not free:
            return None
        cached = self._last_blocks
        if cached is not None and cached[0] is request:
            blocks = cached[1]
        else:
            blocks = self.blocks(request.model, body)
        if not blocks:
            return None
        held = self._slots.setdefault(instance.id, {})

        def rank(slot: int) -> tuple[int, int]:
            """Blocks shared with what the slot last held, then least recently used."""
            chain, used = held.get(slot, ([], -1))
            shared = next(
                (i for i, (a, b) in enumerate(zip(blocks, chain, strict=False)) if a != b),
                min(len(blocks), len(chain)),
            )
            return shared, -used

        best = max(free, key=rank)  # ties: the lowest free slot
        matched = rank(best)[0]
        self._tick += 1
        held[best] = (blocks, self._tick)
        if len(held) > instance.total_slots:  # the server came back with fewer slots
            for gone in [s for s in held if s >= instance.total_slots]:
                del held[gone]
        self.decisions["slot_match" if matched else "slot_lru"] += 1
        return best

    # -- feedback ---------------------------------------------------------------------------

    def record_cached(
        self,
        instance_id: str,
        model: str,
        body: Mapping[str, Any] | None,
        cached_tokens: int,
        prompt_tokens: int,
        *,
        prompt_seconds: float | None = None,
        total_seconds: float | None = None,
    ) -> None:
        """Learn from what a response reported about a request this policy placed.

        ``cached_tokens``: ``timings.cache_n`` or ``usage.prompt_tokens_details.
        cached_tokens``; ``prompt_tokens``: ``usage.prompt_tokens`` (cached ones
        included). ``prompt_seconds`` (``timings.prompt_ms / 1000``) teaches the prefill
        rate and ``total_seconds`` (the response's duration) the request duration that
        :meth:`wait_advice` weighs. ``model`` is the name the request was placed under.
        """
        if prompt_tokens <= 0:
            return
        cached_tokens = max(0, min(cached_tokens, prompt_tokens))
        text = prompt_text(body)
        stats = self._stats.setdefault(instance_id, _InstanceStats())
        rate = self.settings.learn_rate
        uncached = prompt_tokens - cached_tokens
        if prompt_seconds is not None and prompt_seconds > 0 and uncached >= 16:
            sample = uncached / prompt_seconds
            old = stats.prefill_tokens_per_s
            stats.prefill_tokens_per_s = sample if old is None else old + rate * (sample - old)
        if total_seconds is not None and total_seconds > 0:
            old = stats.request_seconds
            stats.request_seconds = (
                total_seconds if old is None else old + rate * (total_seconds - old)
            )
        if not text:
            return
        sample_cpt = len(text) / prompt_tokens
        if 0.5 <= sample_cpt <= 16:  # outside: not text worth learning from (e.g. images)
            self._chars_per_token += rate * (sample_cpt - self._chars_per_token)
        blocks = self._chain(model, text)
        if not blocks:
            return
        predicted = self._predictions.pop((instance_id, blocks[-1]), None)
        if not predicted:
            return
        # the server's cached share of the prompt, in our blocks (its template adds
        # tokens of its own, so this is an estimate; one block of slack absorbs it)
        actual = math.floor(cached_tokens / prompt_tokens * len(text) / self.settings.block_chars)
        ratio = 1.0 if actual >= predicted - 1 else actual / predicted
        stats.reliability = max(
            self.settings.reliability_floor, stats.reliability + rate * (ratio - stats.reliability)
        )
        stats.misses = stats.misses + 1 if cached_tokens == 0 and predicted >= 2 else 0
        if stats.misses >= self.settings.restart_misses:
            log.info(
                "prefix policy forgets instance=%s: %d placements in a row found nothing cached",
                instance_id,
                stats.misses,
            )
            self.forget_instance(instance_id)

    def forget_instance(self, instance_id: str) -> None:
        """Drop all that is known about ``instance_id`` (it restarted, or left): its
        blocks, sessions, pending predictions and learned figures."""
        self.tree.forget(instance_id)
        self._stats.pop(instance_id, None)
        self._slots.pop(instance_id, None)
        for session in [k for k, v in self._sessions.items() if v == instance_id]:
            del self._sessions[session]
        for placed in [k for k in self._predictions if k[0] == instance_id]:
            del self._predictions[placed]

    def reliability(self, instance_id: str) -> float:
        """How far this instance's matches are trusted (1.0 until feedback says less)."""
        stats = self._stats.get(instance_id)
        return stats.reliability if stats is not None else 1.0

    # -- helpers -----------------------------------------------------------------------------

    def blocks(self, model: str, body: Mapping[str, Any] | None) -> list[int]:
        """The prompt's chain of block hashes under ``model`` (empty: no usable key)."""
        text = prompt_text(body)
        return self._chain(model, text) if text else []

    def _chain(self, model: str, text: str) -> list[int]:
        return chain_hashes(
            text,
            seed=model,
            block_chars=self.settings.block_chars,
            max_blocks=self.settings.max_prompt_blocks,
        )

    def _effective(self, instance_id: str, depth: int) -> float:
        return depth * self.reliability(instance_id)

    def _worth_following(self, effective: float, prompt_blocks: int) -> bool:
        return effective > 0 and (
            effective >= self.settings.min_match_blocks
            or effective >= self.settings.match_fraction * prompt_blocks
        )

    def _best_match(
        self, instances: Sequence[Instance], depths: Mapping[str, int], prompt_blocks: int
    ) -> Instance | None:
        """The instance with the longest effective match worth following (ties: least
        busy), or None."""
        best: Instance | None = None
        best_key: tuple[float, tuple[int, int, int, str]] | None = None
        for instance in instances:
            effective = self._effective(instance.id, depths.get(instance.id, 0))
            if not self._worth_following(effective, prompt_blocks):
                continue
            key = (-effective, _least_busy_key(instance))
            if best_key is None or key < best_key:
                best, best_key = instance, key
        return best

    def _overloaded(self, preferred: Instance, least: Instance) -> bool:
        """The load guard: is ``preferred`` too much busier than the least busy?"""
        if preferred is least:
            return False
        mine, lowest = _load(preferred), _load(least)
        return (
            mine - lowest > self.settings.guard_margin and mine > self.settings.guard_ratio * lowest
        )

    def _session_key(self, request: Placement) -> tuple[str, str] | None:
        wanted = self.settings.session_header.lower()
        for name, value in request.headers.items():
            if name.lower() == wanted and value:
                return request.model, value[:256]
        return None

    def _notice(self, candidates: Sequence[Instance]) -> None:
        """Forget instances that came back as a different server (new URL or process)."""
        for instance in candidates:
            fingerprint = (instance.url, instance.pid, instance.started_at)
            known = self._seen.get(instance.id)
            if known != fingerprint:
                if known is not None:
                    log.info("prefix policy forgets restarted instance=%s", instance.id)
                    self.forget_instance(instance.id)
                self._seen[instance.id] = fingerprint

    def _record(
        self,
        request: Placement,
        session: tuple[str, str] | None,
        blocks: list[int],
        chosen: Instance,
        matched: int,
    ) -> None:
        if blocks:
            self.tree.insert(blocks, chosen.id)
            key = (chosen.id, blocks[-1])
            self._predictions[key] = matched
            self._predictions.move_to_end(key)
            while len(self._predictions) > self.settings.max_predictions:
                self._predictions.popitem(last=False)
        if session is not None:
            self._sessions[session] = chosen.id
            self._sessions.move_to_end(session)
            while len(self._sessions) > self.settings.max_sessions:
                self._sessions.popitem(last=False)


__all__ = ["Decision", "PrefixPolicy", "PrefixSettings", "WaitAdvice", "prompt_text"]
