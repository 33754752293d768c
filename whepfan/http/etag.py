"""Entity-tags of WHIP/WHEP sessions and the If-Match rules for PATCH.

A session's ETag names its current ICE credentials (WHEP draft-03 §4.4.1, RFC 9725 §4.3.1).
Decision table (spec notes §2.3):

==========================  ===============================  ==================================
request                     If-Match                         outcome
==========================  ===============================  ==================================
trickle or restart          the current ETag                 processed
trickle or restart          ``*`` or ``"*"``                 processed (RFC 9110 §13.1.1: ``*``
                                                             matches any current representation)
trickle or restart          another ETag (or W/ only)        412 Precondition Failed
trickle or restart          absent                           processed; 428 in strict mode
                                                             (RFC 6585 §3)
DELETE                      anything                         ignored (WHEP §4.4.1)
==========================  ===============================  ==================================

Real clients bend this (reference/clients.md): some send ``ETag:`` instead of ``If-Match``
(read as If-Match here), some quote the star, several never send If-Match at all, which
is why a missing header is accepted unless strict mode is configured.
"""

from __future__ import annotations

from dataclasses import dataclass

from whepfan.errors import ParseError, PreconditionFailed, PreconditionRequired
from whepfan.http.headers import FieldScanner, is_etagc


def _is_bare_etagc(char: str) -> bool:
    # An unquoted tag (a client that dropped the quotes) cannot contain a comma.
    return char != "," and is_etagc(char)


@dataclass(frozen=True, slots=True)
class EntityTag:
    opaque: str
    weak: bool = False

    @classmethod
    def parse(cls, value: str) -> EntityTag:
        """One ``entity-tag`` (RFC 9110 §8.8.3), weak or strong, with optional OWS."""
        scanner = FieldScanner(value)
        scanner.skip_ows()
        tag = cls.scan(scanner)
        scanner.skip_ows()
        if tag is None or not scanner.at_end():
            raise ParseError(f"{value.strip()[:40]!r} is not an entity-tag")
        return tag

    @classmethod
    def scan(cls, scanner: FieldScanner) -> EntityTag | None:
        """``entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE`` at the cursor, or None (the
        cursor unmoved) when none starts there."""
        start = scanner.position
        weak = scanner.accept_text("W/")
        if not scanner.accept('"'):
            scanner.position = start
            return None
        opaque = scanner.take_while(is_etagc)
        if not scanner.accept('"'):
            raise ParseError(f"entity-tag {scanner.text[start : start + 40]!r} is not closed")
        return cls(opaque, weak=weak)

    def __str__(self) -> str:
        return ('W/"' if self.weak else '"') + self.opaque + '"'


@dataclass(frozen=True, slots=True)
class IfMatch:
    """A parsed If-Match field value: ``*`` or a list of entity-tags."""

    wildcard: bool
    tags: tuple[EntityTag, ...] = ()

    @classmethod
    def parse(cls, value: str) -> IfMatch:
        return cls.scan(FieldScanner(value))

    @classmethod
    def scan(cls, scanner: FieldScanner) -> IfMatch:
        """RFC 9110 §13.1.1: ``If-Match = "*" / #entity-tag``; ``"*"`` (quoted, as the
        WHEP examples write it) is read as the wildcard too. One pass over the value
        (see ``headers.py``): each member is OWS, an entity-tag or a bare opaque tag or
        nothing, OWS, then a comma or the end."""
        scanner.skip_ows()
        start = scanner.position
        if scanner.accept("*") or scanner.accept_text('"*"'):
            scanner.skip_ows()
            if scanner.at_end():
                return cls(wildcard=True)
            scanner.position = start  # e.g. "*x": read it as a list
        tags: list[EntityTag] = []
        while not scanner.at_end():
            scanner.skip_ows()
            tag = EntityTag.scan(scanner)
            if tag is None:
                bare = scanner.take_while(_is_bare_etagc)
                if bare:
                    tag = EntityTag(bare)
            if tag is not None:
                tags.append(tag)
            scanner.skip_ows()
            if not scanner.accept(",") and not scanner.at_end():
                raise ParseError(f"If-Match member {scanner.rest()!r} is not an entity-tag")
        if not tags:
            raise ParseError("empty If-Match")
        return cls(wildcard=False, tags=tuple(tags))

    def matches(self, current: str) -> bool:
        """Strong comparison against the current (strong, quoted) ETag, as RFC 9110
        §13.1.1 requires for If-Match: a weak tag never matches."""
        if self.wildcard:
            return True
        current_tag = EntityTag.parse(current)
        return any(
            not tag.weak and not current_tag.weak and tag.opaque == current_tag.opaque
            for tag in self.tags
        )


def check_if_match(
    *, if_match: str | None, etag_header: str | None, current: str, strict: bool
) -> None:
    """Apply the decision table above; raise 412/428 (as whepfan errors) or return.

    ``etag_header`` is a request ``ETag:`` field, used only when If-Match is absent.
    """
    value = if_match if if_match is not None else etag_header
    if value is None or not value.strip():
        if strict:
            raise PreconditionRequired(
                "this PATCH needs If-Match with the session's ETag (RFC 6585 §3)"
            )
        return
    try:
        condition = IfMatch.parse(value)
    except ParseError as exc:
        raise PreconditionFailed(f"If-Match does not parse: {exc.detail}") from None
    if not condition.matches(current):
        raise PreconditionFailed("If-Match does not match the session's current ETag")
