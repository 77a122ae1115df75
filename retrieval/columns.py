"""Column mapping: which source column holds which field.

Defaults match the Amazon Beauty files under ``data/``; any other catalogue maps its own names
(``HOMEPAGE_CATALOGUE_COLUMNS='{"item_id": "sku", "price": "price_eur"}'``).
"""

from pydantic import BaseModel, ConfigDict, Field


class CatalogueColumns(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: str = Field("item_id", description="unique product id (required)")
    title: str = Field("title", description="product title (required)")
    title_fallback: str = Field(
        "title_dhr", description="second title column used where the first is empty (optional column)"
    )
    category: str = Field("category_path", description="category path, levels joined by ' > '")
    brand: str = Field("brand", description="brand name (optional)")
    price: str = Field("price_usd", description="price as a number (optional)")
    description: str = Field("description", description="long description (optional column)")
    stock: str = Field("stock", description="units in stock (optional column; absent means in stock)")


class EventColumns(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field("user_id", description="user id (required)")
    item_id: str = Field("item_id", description="product id, must exist in the catalogue")
    timestamp: str = Field("timestamp", description="unix seconds or ISO 8601 (this or seq_pos)")
    seq_pos: str = Field("seq_pos", description="position in the user's sequence, 0 = oldest")
    event_type: str = Field("event_type", description="view, cart, purchase, review, ... (default: view)")


class UserColumns(BaseModel):
    """A users file (``homepage ingest --users``): who each shopper is, where the shop knows it."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field("user_id", description="user id, as in the events file (required)")
    attributes: list[str] | None = Field(
        None, description="attribute columns to keep (age band, region, membership, ...); unset: every other "
        "column. Attributes are personal data: forget erases them; prompts never show them")
