"""Plain records shared by the retrieval package."""

from __future__ import annotations

from dataclasses import dataclass, field


def brand_key(brand: str | None) -> str | None:
    """A brand as every brand rule compares it: case folded (``ß`` = ``SS``) and runs of spaces
    collapsed, so "TIGI", "Tigi" and " tigi" are one brand. The one brand normalisation."""
    key = " ".join((brand or "").split()).casefold()
    return key or None


@dataclass(frozen=True)
class Product:
    item_id: str
    title: str
    category_path: tuple[str, ...] = ()
    brand: str | None = None
    price: float | None = None
    description: str | None = None
    stock: int | None = None  # None: the catalogue does not track stock; treated as available

    @property
    def in_stock(self) -> bool:
        return self.stock is None or self.stock > 0

    @property
    def brand_key(self) -> str | None:
        return brand_key(self.brand)

    @property
    def category(self) -> str:
        """The most specific category below the root ("Beauty > Skin Care > Face" -> "Face")."""
        return self.category_path[-1] if self.category_path else "Other"

    @property
    def department(self) -> str:
        """The second level, the unit merchandisers think in ("Skin Care", "Makeup")."""
        if len(self.category_path) >= 2:
            return self.category_path[1]
        return self.category_path[0] if self.category_path else "Other"

    def text(self) -> str:
        """What gets embedded: title, brand, category path, price band."""
        parts = [self.title]
        if self.brand:
            parts.append(f"Brand: {self.brand}")
        if self.category_path:
            parts.append("Category: " + " > ".join(self.category_path))
        if self.description:
            parts.append(self.description[:300])
        return ". ".join(parts)


@dataclass(frozen=True)
class Event:
    user_id: str
    item_id: str
    timestamp: float | None = None
    seq_pos: int | None = None
    event_type: str = "view"


@dataclass(frozen=True)
class Provenance:
    """Why a candidate is here: the source, its score there, and the evidence (an item id or a
    category) that a reason can cite."""

    source: str
    score: float
    rank: int
    because: str | None = None


@dataclass
class Candidate:
    item_id: str
    score: float
    provenance: list[Provenance] = field(default_factory=list)

    @property
    def source(self) -> str:
        return max(self.provenance, key=lambda p: p.score).source if self.provenance else "unknown"
