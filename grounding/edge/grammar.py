"""The answer grammar as a token mask, in pure Python: what xgrammar does in the transformers
engine, without xgrammar (which needs torch).

A family's grammar is a regular expression (`grounding.families._grammar`: literals, escapes,
classes, ``(?:...)``, ``?``, ``*``, ``+``, ``{m,n}``, ``|``). It is compiled here into an NFA
over UTF-8 bytes, made deterministic lazily (a state = a set of NFA states). A token is allowed
in a state when its bytes walk the automaton without dying; special tokens never are; the stop
tokens only where the answer may end. The token bytes and the special and stop ids come from
xgrammar at export time (``grammar_vocab.json``), so both engines judge the same strings.
"""

from __future__ import annotations

import numpy as np

_ANY = frozenset(range(256))
_CONT = frozenset(range(0x80, 0xC0))


class _NFA:
    def __init__(self):
        self.eps: list[list[int]] = []
        self.moves: list[list[tuple[frozenset, int]]] = []

    def state(self) -> int:
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1


class _Parser:
    """Recursive descent over the regex subset; builds NFA fragments (start, end)."""

    def __init__(self, regex: str, nfa: _NFA):
        self.s, self.i, self.nfa = regex, 0, nfa
        self.dotall = False

    def peek(self):
        return self.s[self.i] if self.i < len(self.s) else None

    def take(self):
        c = self.s[self.i]
        self.i += 1
        return c

    def parse(self):
        ast = self.alt()
        if self.i != len(self.s):
            raise ValueError(f"unexpected {self.s[self.i]!r} at {self.i} in the grammar")
        return ast

    def alt(self):
        branches = [self.concat()]
        while self.peek() == "|":
            self.take()
            branches.append(self.concat())
        return ("alt", branches) if len(branches) > 1 else branches[0]

    def concat(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repeat())
        return ("cat", items)

    def repeat(self):
        atom = self.atom()
        while True:
            c = self.peek()
            if c == "?":
                self.take()
                atom = ("rep", atom, 0, 1)
            elif c == "*":
                self.take()
                atom = ("rep", atom, 0, None)
            elif c == "+":
                self.take()
                atom = ("rep", atom, 1, None)
            elif c == "{" and self._counted():
                self.take()
                lo = self._int()
                hi = lo
                if self.peek() == ",":
                    self.take()
                    hi = self._int() if self.peek() != "}" else None
                self.take()  # }
                atom = ("rep", atom, lo, hi)
            else:
                return atom

    def _counted(self) -> bool:
        j = self.s.find("}", self.i)
        body = self.s[self.i + 1:j] if j > 0 else ""
        return bool(body) and all(ch.isdigit() or ch == "," for ch in body) and body[0] != ","

    def _int(self) -> int:
        j = self.i
        while self.peek() is not None and self.peek().isdigit():
            self.take()
        return int(self.s[j:self.i])

    def atom(self):
        c = self.take()
        if c == "(":
            saved = self.dotall
            if self.s.startswith("?:", self.i):
                self.i += 2
            elif self.s.startswith("?s:", self.i):
                self.i += 3
                self.dotall = True
            inner = self.alt()
            if self.take() != ")":
                raise ValueError("unbalanced parenthesis in the grammar")
            self.dotall = saved
            return inner
        if c == "[":
            return ("set", *self._class())
        if c == ".":
            return ("set", frozenset() if self.dotall else frozenset("\n"), True)
        if c == "\\":
            return ("lit", self._escape(self.take()))
        return ("lit", c)

    @staticmethod
    def _escape(c: str) -> str:
        return {"n": "\n", "t": "\t", "r": "\r"}.get(c, c)

    def _class(self) -> tuple[frozenset, bool]:
        negate = self.peek() == "^"
        if negate:
            self.take()
        chars: set[str] = set()
        first = True
        while first or self.peek() != "]":
            first = False
            c = self.take()
            if c == "\\":
                c = self._escape(self.take())
            if self.peek() == "-" and self.s[self.i + 1] != "]":
                self.take()
                hi = self.take()
                if hi == "\\":
                    hi = self._escape(self.take())
                chars.update(chr(x) for x in range(ord(c), ord(hi) + 1))
            else:
                chars.add(c)
        self.take()  # ]
        return frozenset(chars), negate


def _build(nfa: _NFA, ast) -> tuple[int, int]:
    kind = ast[0]
    if kind == "lit":
        return _bytes_path(nfa, ast[1].encode())
    if kind == "cat":
        start = cur = nfa.state()
        for item in ast[1]:
            a, b = _build(nfa, item)
            nfa.eps[cur].append(a)
            cur = b
        return start, cur
    if kind == "alt":
        start, end = nfa.state(), nfa.state()
        for br in ast[1]:
            a, b = _build(nfa, br)
            nfa.eps[start].append(a)
            nfa.eps[b].append(end)
        return start, end
    if kind == "rep":
        _, inner, lo, hi = ast
        start = cur = nfa.state()
        for _ in range(lo):
            a, b = _build(nfa, inner)
            nfa.eps[cur].append(a)
            cur = b
        end = nfa.state()
        nfa.eps[cur].append(end)
        if hi is None:
            a, b = _build(nfa, inner)
            nfa.eps[cur].append(a)
            nfa.eps[b].append(cur)
        else:
            for _ in range(hi - lo):
                a, b = _build(nfa, inner)
                nfa.eps[cur].append(a)
                nfa.eps[b].append(end)
                cur = b
        return start, end
    if kind == "set":
        return _char_set(nfa, ast[1], ast[2])
    raise AssertionError(kind)


def _bytes_path(nfa: _NFA, data: bytes) -> tuple[int, int]:
    start = cur = nfa.state()
    for byte in data:
        nxt = nfa.state()
        nfa.moves[cur].append((frozenset([byte]), nxt))
        cur = nxt
    return start, cur


def _char_set(nfa: _NFA, chars: frozenset, negate: bool) -> tuple[int, int]:
    """One character of a class, as UTF-8 bytes. A negated class excludes only ASCII
    characters here (as in every family grammar) and takes any multi-byte character."""
    start, end = nfa.state(), nfa.state()
    if not negate:
        for ch in chars:
            a, b = _bytes_path(nfa, ch.encode())
            nfa.eps[start].append(a)
            nfa.eps[b].append(end)
        return start, end
    if any(ord(c) > 0x7F for c in chars):
        raise ValueError("negated classes with non-ASCII characters are not supported")
    ascii_ok = frozenset(range(0x80)) - {ord(c) for c in chars}
    nfa.moves[start].append((ascii_ok, end))
    for lead, n in ((range(0xC2, 0xE0), 1), (range(0xE0, 0xF0), 2), (range(0xF0, 0xF5), 3)):
        cur = nfa.state()
        nfa.moves[start].append((frozenset(lead), cur))
        for k in range(n):
            nxt = end if k == n - 1 else nfa.state()
            nfa.moves[cur].append((_CONT, nxt))
            cur = nxt
    return start, end


class TokenGrammar:
    """Allowed-token masks of one regex over one vocabulary, state by state.

    ``tokens``: each token id's bytes; ``special``: ids never allowed; ``stop``: ids allowed
    only where the whole answer matches (they end it)."""

    def __init__(self, regex: str, tokens: list[bytes], special: set[int], stop: set[int]):
        self.nfa = _NFA()
        start, self.accept = _build(self.nfa, _Parser(regex, self.nfa).parse())
        self.tokens = tokens
        self.special, self.stop = set(special), set(stop)
        self.start = self._closure({start})
        self._step: dict[tuple[frozenset, int], frozenset] = {}
        self._masks: dict[frozenset, np.ndarray] = {}
        # The ordinary tokens (neither stop, special nor empty) sorted by their bytes, for
        # `mask`'s prefix walk.
        ordinary = sorted((data, i) for i, data in enumerate(tokens)
                          if data and i not in self.stop and i not in self.special)
        self._sorted = [d for d, _ in ordinary]
        self._sorted_ids = np.asarray([i for _, i in ordinary], dtype=np.int64)

    def _closure(self, states) -> frozenset:
        todo, seen = list(states), set(states)
        while todo:
            for n in self.nfa.eps[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return frozenset(seen)

    def step(self, state: frozenset, byte: int) -> frozenset:
        key = (state, byte)
        if key not in self._step:
            nxt = {t for s in state for bs, t in self.nfa.moves[s] if byte in bs}
            self._step[key] = self._closure(nxt) if nxt else frozenset()
        return self._step[key]

    def walk(self, state: frozenset, data: bytes) -> frozenset:
        for b in data:
            state = self.step(state, b)
            if not state:
                break
        return state

    def accepting(self, state: frozenset) -> bool:
        return self.accept in state

    def mask(self, state: frozenset) -> np.ndarray:
        """Boolean mask over token ids: True where the token may come next (cached per state).

        A prefix walk over the tokens sorted by their bytes: the automaton states of the
        previous token's prefixes are reused for the bytes it shares with the next, and once a
        prefix dies, every token that starts with it is skipped at once (a bisect). On a
        151k-token Qwen vocabulary most tokens die on their first byte or two in most states;
        walking every token from the start is `mask_by_walking_each_token`."""
        if state not in self._masks:
            m = np.zeros(len(self.tokens), dtype=bool)
            ok = np.zeros(len(self._sorted), dtype=bool)
            toks = self._sorted
            stack = [state]          # stack[k]: the state after the first k bytes of `prev`
            prev = b""
            j = 0
            while j < len(toks):
                data = toks[j]
                k = 0
                top = min(len(prev), len(data), len(stack) - 1)
                while k < top and prev[k] == data[k]:
                    k += 1
                del stack[k + 1:]
                s = stack[k]
                while k < len(data):
                    s = self.step(s, data[k])
                    k += 1
                    if not s:
                        break
                    stack.append(s)
                if s:
                    ok[j] = True
                    prev = data
                    j += 1
                else:  # data[:k] is dead: skip every token that starts with it
                    dead = data[:k]
                    prev = data[:k - 1]
                    j = _skip_prefix(toks, dead, j)
            m[self._sorted_ids[ok]] = True
            for i in self.stop:
                if i < len(m):
                    m[i] = self.accepting(state)
            self._masks[state] = m
        return self._masks[state]

    def mask_by_walking_each_token(self, state: frozenset) -> np.ndarray:
        """`mask` computed the plain way, every token walked from ``state`` (uncached): what
        the prefix walk must equal (tests/grounding/test_edge_grammar.py)."""
        m = np.zeros(len(self.tokens), dtype=bool)
        for i, data in enumerate(self.tokens):
            if i in self.stop:
                m[i] = self.accepting(state)
            elif data and i not in self.special:
                m[i] = bool(self.walk(state, data))
        return m

    def advance(self, state: frozenset, token_id: int) -> frozenset:
        """The state after ``token_id`` (a stop token leaves it as is)."""
        return state if token_id in self.stop else self.walk(state, self.tokens[token_id])


def _skip_prefix(toks: list[bytes], prefix: bytes, j: int) -> int:
    """The first index after ``j`` in the sorted ``toks`` whose token does not start with
    ``prefix`` (all from ``j`` up to it do)."""
    import bisect

    bound = prefix.rstrip(b"\xff")
    if not bound:  # only 0xff bytes: every later token starts with it... or is larger
        while j < len(toks) and toks[j].startswith(prefix):
            j += 1
        return j
    upper = bound[:-1] + bytes([bound[-1] + 1])  # the least string above every prefix+...
    return bisect.bisect_left(toks, upper, lo=j + 1)
