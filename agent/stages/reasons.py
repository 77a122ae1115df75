"""Item reasons, grounded in provenance: each sentence cites only what a source actually found."""

from __future__ import annotations

from retrieval import Candidate, Product


def _short(title: str, limit: int = 48) -> str:
    return title if len(title) <= limit else title[: limit - 1].rsplit(" ", 1)[0] + "…"


def _again(evidence: str) -> str:
    """ "every 28 days" -> "You buy this about every 4 weeks"; "3 times" -> "You bought this 3 times"."""
    if evidence.startswith("every "):
        days = int(evidence.split()[1])
        if days >= 14:
            weeks = round(days / 7)
            return f"You buy this about every {weeks} weeks"
        return f"You buy this about every {days} day{'s' if days != 1 else ''}"
    return f"You bought this {evidence}"


def reason(candidate: Candidate | None, products: dict[str, Product]) -> str:
    if candidate is None or not candidate.provenance:
        return "Popular right now"
    best = max(candidate.provenance, key=lambda p: 1.0 / (1 + p.rank))  # its best-ranked source
    cited = products.get(best.because) if best.because else None
    if best.source == "covisit" and cited:
        return f"Often bought with {_short(cited.title)}, which you bought"
    if best.source == "semantic" and cited:
        return f"Similar to {_short(cited.title)}, which you bought"
    if best.source == "theme" and best.because:
        return f"Matches \u201c{best.because}\u201d, a theme picked from your history"
    if best.source == "buy_again" and best.because:
        return _again(best.because)
    if best.source == "similar_users":
        return "Popular with shoppers whose history is like yours"
    if best.source == "popularity" and best.because:
        return f"Popular in {best.because}"
    if best.source == "segment_popularity" and best.because:  # never the attributes themselves
        return f"Popular in {best.because} with shoppers like you"
    return "Popular right now"
