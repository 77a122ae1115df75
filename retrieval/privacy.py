"""Personal data kept out at the door: detection and redaction in free text, keyed pseudonyms for
user ids that are e-mail addresses or phone numbers, and text from sellers cleared of prompt markup.

The detectors are our own patterns, offline and dependency-free. presidio-analyzer's pattern
recognisers come with spaCy (a language model to download, and its pins); scrubadub's name detector
needs downloaded corpora; their e-mail, phone and card patterns are what these do. Names are found
only where the text says a name follows ("my name is", "contact", "name:", "sincerely", ...): a
person's name in a title is usually a brand ("Paul Mitchell", "Mrs. Meyer's", "Miss Dior"), which must
stay. Street addresses need a number, capitalised words and a street type that ends the phrase.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections import Counter
from pathlib import Path

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}\b")
# Phones need phone-like grouping: a "+" and 8-15 digits, or the 3-3-4 groups of North America with
# separators. Bare digit runs are not phones (catalogue numbers, ISBNs, pack sizes).
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"
    r"|(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4})(?![\w])"
)
CARD = re.compile(r"(?<![\w])[2-6]\d{3}(?:[ -]?\d{4}){2}[ -]?\d{1,7}(?![\w])")
_STREET_TYPES = (r"Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Way"
                 r"|Parkway|Pkwy|Highway|Hwy|Square|Sq")
_UNITS = r"(?:Oz|Fl|Ml|Pack|Count|Ct|Pcs|Pieces?|Inch|Inches|In|Lbs?|Mg|Gram|Grams|Sheets?)\b"
ADDRESS = re.compile(
    rf"(?<![\w])\d{{1,5}}[A-Za-z]?\s+(?:(?!{_UNITS})[A-Z][a-z]+\.?\s+){{1,3}}(?:{_STREET_TYPES})\b\.?"
    r"(?:,?\s*(?:Apt|Suite|Unit|#)\.?\s*\w+)?(?=\s*(?:[,;\n]|$))"
)
NAME = re.compile(
    r"\b(?:[Mm]y name is|[Nn]ame:|[Cc]ontact|[Aa]ttn:?|[Ss]incerely,?|[Rr]egards,?|[Ss]hip to:?|[Cc]ustomer:)\s+"
    r"(?:(?:Mr|Mrs|Ms|Mx)\.?\s+)?[A-Z][a-z]+(?:[ -][A-Z][a-z]+){0,2}"
)
DETECTORS: dict[str, re.Pattern] = {"email": EMAIL, "card": CARD, "phone": PHONE, "address": ADDRESS, "name": NAME}


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        n = int(char)
        if position % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _is_finding(kind: str, text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    if kind == "card":  # 13 and 14 bare digits are barcodes (EAN-13, GTIN-14): only grouped ones count
        grouped = not text.isdigit()
        return (15 if not grouped else 13) <= len(digits) <= 19 and _luhn(digits)
    if kind == "phone":
        return 8 <= len(digits) <= 15 if text.startswith("+") else len(digits) == 10
    return True


def find_personal_data(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each personal datum found, non-overlapping, in text order."""
    found: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern in DETECTORS.items():  # in order of certainty: an e-mail is not also a name
        for match in pattern.finditer(text):
            start, end = match.span()
            if _is_finding(kind, match.group()) and not any(s < end and start < e for s, e in taken):
                found.append((kind, start, end))
                taken.append((start, end))
    return sorted(found, key=lambda f: f[1])


def redact(text: str, counts: Counter | None = None) -> str:
    """``text`` with each personal datum replaced by ``[kind]``; ``counts`` tallies them by kind."""
    out, last = [], 0
    for kind, start, end in find_personal_data(text):
        out += [text[last:start], f"[{kind}]"]
        last = end
        if counts is not None:
            counts[kind] += 1
    return "".join(out) + text[last:] if out else text


# Seller text that tries to speak to the model: chat-template role markers, fake system lines,
# instructions addressed to an assistant. Removed at ingest, before anything is embedded or prompted.
_MARKUP = re.compile(
    r"<\|[^|>]{0,40}\|>(?:\s*(?:system|user|assistant)\b)?|</?s>|\[/?INST\]|<<\s*/?SYS\s*>>|</?(?:system|assistant|user|im_start|im_end)>"
    r"|(?:^|(?<=[.!?]\s))(?:#{2,}\s*)?(?:system|assistant|user|instructions?)\s*:",
    re.IGNORECASE,
)
_TAIL = r"(?:[^.!?\n]{0,80}?\b(?:first|top|1st|#1|number one)\b|[^.!?\n]{0,80})[.!?]?"  # to "first", else the sentence
_INSTRUCTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b[^.!?\n]{0,60}?\b(?:above|previous|prior|earlier|instructions?|rules?)\b"
    + _TAIL
    + r"|\b(?:you\s+)?(?:always|must|should)\s+(?:always\s+)?(?:pick|put|rank|place|choose|list|show)\b" + _TAIL
    + r"|\b(?:pick|put|rank|place|choose|list|show)\s+(?:this|me|it)\b[^.!?\n]{0,40}\b(?:first|top|#?1)\b[.!?]?",
    re.IGNORECASE,
)
# a JSON object (two levels of nesting), a stray key, brace or backtick
_JSONISH = re.compile(r"\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"
                      r"|\"[^\"\n]{1,40}\"\s*:\s*(?=[\[{\"\d-]|true|false|null)|[{}`]")


def neutralise(text: str, counts: Counter | None = None) -> str:
    """Seller text with chat markup, instructions to the model and JSON punctuation taken out
    (``counts["injection"]`` counts texts changed). Ordinary product words are left as they are."""
    cleaned = _JSONISH.sub(" ", _INSTRUCTION.sub(" ", _MARKUP.sub(" ", text)))
    cleaned = " ".join(cleaned.split())
    if cleaned != " ".join(text.split()) and counts is not None:
        counts["injection"] += 1
    return cleaned


# -- ids ---------------------------------------------------------------------------------------------
PSEUDONYM_PREFIX = "anon-"
_WHOLE_EMAIL = re.compile(rf"^(?:{EMAIL.pattern})$")
_WHOLE_PHONE = re.compile(rf"^(?:{PHONE.pattern})$")


def personal_id_kind(value: str) -> str | None:
    """"email" or "phone" when an id is one (a phone needs a "+" or grouping: bare digit runs are
    common customer and product numbers), else None."""
    if _WHOLE_EMAIL.match(value):
        return "email"
    if _WHOLE_PHONE.match(value) and _is_finding("phone", value):
        return "phone"
    return None


KEY_FILE = "privacy/key"


class Privacy:
    """The keyed hash behind pseudonyms and the audit log. The key is the ``privacy_key`` setting,
    or one made at random on first use and kept in the main store (``<store>/privacy/key``, mode
    0600): without it a pseudonym cannot be recomputed from a guessed e-mail address."""

    def __init__(self, key: str | None, key_file: Path):
        self._key = key.encode() if key else None
        self.key_file = Path(key_file)

    @property
    def key(self) -> bytes:
        if self._key is None:
            if not self.key_file.exists():
                self.key_file.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_hex(32))
            self._key = self.key_file.read_text().strip().encode()
        return self._key

    def _hash(self, purpose: str, value: str) -> str:
        return hmac.new(self.key, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    def user_id(self, value: str) -> str:
        """The id as stored: an e-mail address or phone number becomes its keyed pseudonym (the
        same one every time, so joins hold); any other id is kept as written."""
        if personal_id_kind(value):
            return PSEUDONYM_PREFIX + self._hash("user", value)[:32]
        return value

    def stored_id(self, value: str) -> str | None:
        """``user_id`` without making a key: None for a personal id when no key exists yet (then
        no pseudonym was ever stored, and a lookup must not write one into the store)."""
        if personal_id_kind(value) and self._key is None and not self.key_file.exists():
            return None
        return self.user_id(value)

    def audit_subject(self, user_id: str) -> str:
        """What the audit log records for a user: a keyed hash unrelated to the stored pseudonym."""
        return self._hash("audit", user_id)[:32]
