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

import re
from dataclasses import dataclass

from whepfan.errors import ParseError, PreconditionFailed, PreconditionRequired

# RFC 9110 §8.8.3: entity-tag = [ weak ] opaque-tag; opaque-tag = DQUOTE *etagc DQUOTE,
# etagc = %x21 / %x23-7E / obs-text.
_ENTITY_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*')
# One list member and its separator (RFC 9110 §5.6.1; empty members are allowed). Some
# clients drop the quotes: an unquoted run of etagc without commas is that opaque tag.
_LIST_MEMBER = re.compile(
    r'[ \t]*(?:(W/)?"([\x21\x23-\x7e\x80-\xff]*)"|([\x21\x23-\x2b\x2d-\x7e\x80-\xff]+))?'
    r"[ \t]*(?:,|$)"
)


@dataclass(frozen=True, slots=True)
class EntityTag:
    opaque: str
    weak: bool = False

    @classmethod
    def parse(cls, value: str) -> EntityTag:
        """One ``entity-tag`` (RFC 9110 §8.8.3), weak or strong."""
        match = _ENTITY_TAG.fullmatch(value)
        if match is None:
            raise ParseError(f"{value.strip()[:40]!r} is not an entity-tag")
        return cls(match.group(2), weak=match.group(1) is not None)

    def __str__(self) -> str:
        return ('W/"' if self.weak else '"') + self.opaque + '"'


@dataclass(frozen=True, slots=True)
class IfMatch:
    """A parsed If-Match field value: ``*`` or a list of entity-tags."""

    wildcard: bool
    tags: tuple[EntityTag, ...] = ()

    @classmethod
    def parse(cls, value: str) -> IfMatch:
        """RFC 9110 §13.1.1: ``If-Match = "*" / #entity-tag``; ``"*"`` (quoted, as the
        WHEP examples write it) is read as the wildcard too."""
        stripped = value.strip()
        if stripped in ("*", '"*"'):
            return cls(wildcard=True)
        tags: list[EntityTag] = []
        position = 0
        # Scan member by member: an opaque-tag may itself contain commas.
        while position < len(stripped):
            match = _LIST_MEMBER.match(stripped, position)
            if match is None or match.end() == position:
                rest = stripped[position:].strip()[:40]
                raise ParseError(f"If-Match member {rest!r} is not an entity-tag")
            quoted, bare = match.group(2), match.group(3)
            if quoted is not None:
                tags.append(EntityTag(quoted, weak=match.group(1) is not None))
            elif bare is not None:
                tags.append(EntityTag(bare))
            position = match.end()
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
