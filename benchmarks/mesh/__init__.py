"""The multi-service baseline SilverTorch replaces (issue 7 part 1): orchestrator -> user-tower
service -> ANN + eligibility service (faiss-cpu) -> scoring service, each its own process on
loopback, HTTP/1.1 keep-alive with binary tensor payloads. See ``docs/mesh.md``."""
