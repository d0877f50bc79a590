"""Request and response bodies (pydantic): these define ``/openapi.json``.

Range checks that depend on the server or the artifact (``k`` against ``max_k``, vector width,
value-weight count, filter syntax) happen in the routes and answer 400 naming the field; type and
shape errors answer 422 (pydantic's message names the field's location).
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FeatureValues", "RetrieveRequest", "RetrievedItem", "RetrieveResponse", "ItemUpsert",
    "UpsertRequest", "UpdateResponse", "PatchAttributesRequest", "LoadRequest", "LoadResponse",
    "CompactResponse", "ErrorResponse",
]

# feature name -> its raw values; a single string is one value
FeatureValues = dict[str, Union[list[str], str]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RetrieveRequest(_Strict):
    user: FeatureValues = Field(
        description="user features by raw value, e.g. {\"user_id\": \"196\", \"gender\": \"M\"}; "
                    "unknown features/values map to out-of-vocabulary",
        examples=[{"user_id": "196", "age_bucket": "45-49", "gender": "M"}])
    k: int = Field(10, description="results wanted, 1..max_k (400 outside)")
    filter: Optional[str] = Field(None, description="eligibility expression over item attributes, "
                                  "e.g. 'genre:Comedy AND NOT decade:1990s' (400 with the position "
                                  "when it does not parse)")
    value_weights: Optional[Union[dict[str, float], list[float]]] = Field(
        None, description="value-model weights: one per task (list in task order, or task -> weight)")
    nprobe: Optional[int] = Field(None, description="clusters to probe (default: the artifact's)")


class RetrievedItem(BaseModel):
    id: str
    title: str
    score: float = Field(description="composite (value-model) score")
    task_scores: dict[str, float] = Field(description="per-task probability")
    retrieval_score: float = Field(description="ANN similarity from the index")


class RetrieveResponse(BaseModel):
    items: list[RetrievedItem]
    version: str = Field(description="artifact version that answered")
    generation: int = Field(description="index generation the answer read")
    warnings: list[str] = Field(default_factory=list, description="e.g. unknown filter values")


class ItemUpsert(_Strict):
    id: str = Field(description="raw item id; a new id is added, an existing one updated in place")
    features: Optional[FeatureValues] = Field(
        None, description="item features by raw value (the item tower computes the vector)")
    vector: Optional[list[float]] = Field(None, description="precomputed item vector (D floats)")
    attributes: Optional[dict[str, list[str]]] = Field(
        None, description="eligibility attributes (default: taken from features)")
    title: Optional[str] = None


class UpsertRequest(_Strict):
    items: list[ItemUpsert]


class UpdateResponse(BaseModel):
    ids: list[str]
    generation: int = Field(description="index generation after the update")
    seq: int = Field(description="update-log sequence number of the last record (durable)")


class PatchAttributesRequest(_Strict):
    attributes: dict[str, list[str]]


class LoadRequest(_Strict):
    path: str = Field(description="artifact path on the server's filesystem")


class LoadResponse(BaseModel):
    version: str
    previous_version: str
    generation: int
    replayed: int = Field(description="update-log records replayed for this artifact's state")


class CompactResponse(BaseModel):
    started: bool
    generation: int
    detail: str


class ErrorResponse(BaseModel):
    detail: str
