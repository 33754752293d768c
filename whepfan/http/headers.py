"""Linear-time parsing of the request header fields whepfan reads (RFC 9110 §5.6).

A header value is attacker-controlled text of up to aiohttp's ``max_field_size`` (8 KB).
A backtracking regular expression over it can take time quadratic in its length (an
If-Match of ``"a",`` and 4,000 times ``" \\t"`` then ``!"`` kept the old list regex
busy for 1.2 s of CPU per request), so every field parser here walks the value once with a
:class:`FieldScanner`: each step either consumes a character or ends the parse, and the
scanner counts its steps, which is what the tests assert (never the time).

Grammar pieces (RFC 9110 §5.6): ``OWS = *( SP / HTAB )``, ``token = 1*tchar``,
``quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE``, lists are
``#element = [ element ] *( OWS "," OWS [ element ] )`` with empty elements allowed
(§5.6.1.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from whepfan.errors import ParseError

# RFC 9110 §5.6.2: tchar.
TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_OWS = frozenset(" \t")


def _obs_text(char: str) -> bool:
    return "\x80" <= char <= "\xff"


def is_qdtext(char: str) -> bool:
    # RFC 9110 §5.6.4: HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text.
    return char in "\t !" or "\x23" <= char <= "\x5b" or "\x5d" <= char <= "\x7e" or _obs_text(char)


def is_etagc(char: str) -> bool:
    # RFC 9110 §8.8.3: %x21 / %x23-7E / obs-text.
    return char == "\x21" or "\x23" <= char <= "\x7e" or _obs_text(char)


class FieldScanner:
    """A forward-only cursor over one field value; ``steps`` counts characters examined
    (each loop iteration of every method examines one character and consumes it, or
    stops), so a parse built on it costs O(len(value))."""

    __slots__ = ("position", "steps", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0
        self.steps = 0

    def at_end(self) -> bool:
        return self.position >= len(self.text)

    def peek(self) -> str:
        """The next character, or "" at the end (not consumed)."""
        self.steps += 1
        return self.text[self.position] if self.position < len(self.text) else ""

    def accept(self, char: str) -> bool:
        """Consume ``char`` if it is next."""
        if self.peek() == char:
            self.position += 1
            return True
        return False

    def accept_text(self, text: str) -> bool:
        """Consume ``text`` (case-insensitive) if it is next."""
        end = self.position + len(text)
        self.steps += len(text)
        if self.text[self.position : end].lower() == text.lower():
            self.position = end
            return True
        return False

    def skip_ows(self) -> None:
        while self.peek() in _OWS:  # peek() is "" at the end, never in _OWS
            self.position += 1

    def take_token(self) -> str:
        start = self.position
        while not self.at_end() and self.peek() in TCHAR:
            self.position += 1
        return self.text[start : self.position]

    def take_while(self, predicate: Callable[[str], bool]) -> str:
        """Consume the run of characters for which ``predicate(char)`` is true."""
        start = self.position
        while not self.at_end() and predicate(self.peek()):
            self.position += 1
        return self.text[start : self.position]

    def take_quoted_string(self) -> str:
        """A quoted-string at the cursor (which must be DQUOTE), unescaped."""
        if not self.accept('"'):
            raise ParseError("expected a quoted-string")
        out: list[str] = []
        while not self.at_end():
            char = self.peek()
            self.position += 1
            if char == '"':
                return "".join(out)
            if char == "\\":
                if self.at_end():
                    break
                escaped = self.peek()
                self.position += 1
                if not (escaped in "\t " or "\x21" <= escaped <= "\x7e" or _obs_text(escaped)):
                    raise ParseError("bad quoted-pair in a quoted-string")
                out.append(escaped)
            elif is_qdtext(char):
                out.append(char)
            else:
                raise ParseError("control character in a quoted-string")
        raise ParseError("unterminated quoted-string")

    def rest(self, limit: int = 40) -> str:
        """What is left, shortened, for error messages."""
        return self.text[self.position : self.position + limit]


@dataclass(frozen=True, slots=True)
class MediaType:
    """A ``Content-Type`` value (RFC 9110 §8.3.1): ``type/subtype`` lower-cased, and its
    parameters (names lower-cased, values unquoted)."""

    essence: str
    parameters: tuple[tuple[str, str], ...] = ()

    def parameter(self, name: str) -> str | None:
        lowered = name.lower()
        return next((value for key, value in self.parameters if key == lowered), None)

    @classmethod
    def parse(cls, value: str) -> MediaType:
        return cls.scan(FieldScanner(value))

    @classmethod
    def scan(cls, scanner: FieldScanner) -> MediaType:
        """``media-type = type "/" subtype parameters``, ``parameters = *( OWS ";" OWS
        [ parameter ] )``, ``parameter = name "=" ( token / quoted-string )``."""
        scanner.skip_ows()
        kind = scanner.take_token()
        if not kind or not scanner.accept("/"):
            raise ParseError(f"{scanner.text[:40]!r} is not a media type")
        subtype = scanner.take_token()
        if not subtype:
            raise ParseError(f"{scanner.text[:40]!r} is not a media type")
        parameters: list[tuple[str, str]] = []
        while True:
            scanner.skip_ows()
            if scanner.at_end():
                break
            if not scanner.accept(";"):
                raise ParseError(f"unexpected {scanner.rest()!r} in a media type")
            scanner.skip_ows()
            if scanner.at_end() or scanner.peek() == ";":
                continue  # an empty parameter, allowed by the grammar
            name = scanner.take_token()
            if not name or not scanner.accept("="):
                raise ParseError(f"media type parameter {scanner.rest()!r} has no value")
            if scanner.peek() == '"':
                parameter = scanner.take_quoted_string()
            else:
                parameter = scanner.take_token()
            parameters.append((name.lower(), parameter))
        return cls(f"{kind}/{subtype}".lower(), tuple(parameters))


def media_type_essence(value: str | None) -> str | None:
    """The ``type/subtype`` of a Content-Type field, or None if absent or malformed."""
    if value is None:
        return None
    try:
        return MediaType.parse(value).essence
    except ParseError:
        return None
