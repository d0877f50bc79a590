"""Value names for synthetic catalogs: languages, their countries, categories, maturity ratings.

Every name is a valid token of the filter language (no spaces, colons or parentheses).
"""

from __future__ import annotations

__all__ = ["LANGUAGES", "COUNTRIES", "LANGUAGE_COUNTRIES", "CATEGORIES", "MATURITY",
           "MATURITY_PROBS"]  # fmt: skip

# 30 languages, most popular first; each lists its countries, the most likely first. A country may
# belong to several languages (India: en, hi; Switzerland: de, fr).
LANGUAGE_COUNTRIES: dict[str, list[str]] = {
    "en": ["us", "gb", "ca", "au", "in", "ie", "nz", "za", "ng", "ph"],
    "es": ["mx", "es", "ar", "co", "cl", "pe", "ve", "ec"],
    "pt": ["br", "pt", "ao"],
    "hi": ["in"],
    "fr": ["fr", "ca", "be", "ch", "sn", "ci"],
    "de": ["de", "at", "ch"],
    "ar": ["eg", "sa", "ae", "ma", "dz", "iq", "jo"],
    "ja": ["jp"],
    "ru": ["ru", "by", "kz"],
    "ko": ["kr"],
    "id": ["id"],
    "it": ["it"],
    "tr": ["tr"],
    "zh": ["cn", "tw", "hk", "sg"],
    "vi": ["vn"],
    "th": ["th"],
    "pl": ["pl"],
    "nl": ["nl", "be"],
    "uk": ["ua"],
    "ms": ["my", "sg"],
    "bn": ["bd"],
    "sv": ["se"],
    "ro": ["ro", "md"],
    "el": ["gr", "cy"],
    "cs": ["cz"],
    "hu": ["hu"],
    "he": ["il"],
    "da": ["dk"],
    "fi": ["fi"],
    "no": ["no"],
}
LANGUAGES: list[str] = list(LANGUAGE_COUNTRIES)
COUNTRIES: list[str] = sorted({c for cs in LANGUAGE_COUNTRIES.values() for c in cs})

CATEGORIES: list[str] = [
    "news", "sports", "music", "movies", "gaming", "comedy", "education", "science", "technology",
    "travel", "food", "fashion", "beauty", "fitness", "health", "kids", "animals", "autos",
    "finance", "politics",
]  # fmt: skip

MATURITY: list[str] = ["G", "PG", "PG13", "R", "NC17"]
MATURITY_PROBS: list[float] = [0.30, 0.30, 0.25, 0.13, 0.02]
