"""``[serve]`` config: TOML + overrides + flags, strict keys, impossible values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.config import load_serve_config
from silvertorch.config import ConfigError


def test_shipped_config_loads_and_layers_overrides_then_flags(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    cfg = load_serve_config(root / "configs" / "serve.toml", ["max_batch_size=8", "serve.max_k=20"], port=0)
    assert (cfg.max_batch_size, cfg.max_k, cfg.port) == (8, 20, 0)
    assert load_serve_config(None).max_wait_ms == 2.0


@pytest.mark.parametrize("override, key", [("bogus=1", "serve.bogus"), ("port=70000", "serve.port"),
                                           ("max_batch_size=0", "serve.max_batch_size"),
                                           ("max_wait_ms='fast'", "serve.max_wait_ms")])
def test_bad_keys_and_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_serve_config(None, [override])
