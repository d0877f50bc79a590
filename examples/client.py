"""A minimal SilverTorch serving client (standard library only; copy it into your project).

    python examples/client.py http://127.0.0.1:8000          # against a running `silvertorch serve`

Every method returns the decoded JSON answer or raises :class:`ApiError` with the server's status
and message (which names the field that was wrong). See docs/serving.md for the API.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any


class ApiError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status}: {detail}")


class SilverTorchClient:
    """``base_url`` like ``http://127.0.0.1:8000``; ``timeout`` in seconds."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            try:
                detail = json.loads(err.read()).get("detail", "")
            except ValueError:
                detail = err.reason
            raise ApiError(err.code, str(detail)) from None

    def retrieve(self, user: dict[str, Any], k: int = 10, filter: str | None = None,
                 value_weights: dict[str, float] | list[float] | None = None,
                 nprobe: int | None = None) -> dict[str, Any]:
        """Top-``k`` items for ``user`` (raw feature values): ``{"items", "version", "generation"}``."""
        body: dict[str, Any] = {"user": user, "k": k}
        for key, value in (("filter", filter), ("value_weights", value_weights), ("nprobe", nprobe)):
            if value is not None:
                body[key] = value
        return self._call("POST", "/v1/retrieve", body)

    def upsert(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Items ``{"id", "features" | "vector", "attributes"?, "title"?}``; durable when it returns."""
        return self._call("PUT", "/v1/items", {"items": items})

    def delete(self, item_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/items/{urllib.request.quote(item_id, safe='')}")

    def patch_attributes(self, item_id: str, attributes: dict[str, list[str]]) -> dict[str, Any]:
        return self._call("PATCH", f"/v1/items/{urllib.request.quote(item_id, safe='')}/attributes",
                          {"attributes": attributes})

    def compact(self) -> dict[str, Any]:
        return self._call("POST", "/v1/admin/compact")

    def load(self, path: str) -> dict[str, Any]:
        """Hot swap to the artifact at ``path`` (on the server's filesystem)."""
        return self._call("POST", "/v1/admin/load", {"path": path})

    def info(self) -> dict[str, Any]:
        return self._call("GET", "/v1/info")


def main(argv: list[str]) -> int:
    client = SilverTorchClient(argv[1] if len(argv) > 1 else "http://127.0.0.1:8000")
    user = {"user_id": "196", "gender": "M", "occupation": "writer"}
    for flt in (None, "genre:Comedy AND NOT decade:1990s"):
        answer = client.retrieve(user, k=5, filter=flt)
        print(f"filter {flt!r} (version {answer['version']}, generation {answer['generation']}):")
        for item in answer["items"]:
            print(f"  {item['id']:>6}  {item['title'][:50]:<50} {item['score']:.3f}")
    print(client.upsert([{"id": "example-1", "title": "Example Movie (2026)",
                          "features": {"genre": ["Comedy"], "decade": "1990s", "year": "1995-1999"}}]))
    print(client.delete("example-1"))
    try:
        client.retrieve(user, k=0)
    except ApiError as err:
        print(f"refused as expected: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
