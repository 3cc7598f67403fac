"""The prompt cleaner that runs before T5 tokenization (spec §4.2).

MAGI-1 was trained on captions passed through DeepFloyd IF's caption cleaner, applied twice
(``T5Embedder.text_preprocessing``), and the shipped pipeline always applies it. Prompts must be
cleaned the same way or the text encoder sees token sequences it never saw in training, so this
module reproduces that cleaner rule for rule, including its surprising effects on ordinary prose
("mat.It was" loses "mat.it", "epsilon" becomes "ilon"). Those are deliberate: fidelity to the
training distribution matters more here than tidiness.

Public API:
* ``clean_caption(text)``: one pass of the 37 rules of spec §4.2.
* ``preprocess_prompt(text)``: two passes; the text that is actually tokenized.

ftfy and BeautifulSoup are imported inside the cleaning function, so importing this module stays
cheap and side-effect free.
"""
from __future__ import annotations

import html
import re
import urllib.parse

__all__ = ["clean_caption", "preprocess_prompt"]

# Rules 4 and 5. The scheme alternative only eats the prefix ("https://"); the rest of a URL is
# taken by the domain alternative, which is why bare words like "mat.it" vanish too. The trailing
# (?!@) applies to the domain alternative only, so e-mail domains are left for rule 7.
_DOMAIN = r"[a-zA-Z0-9.\-]+\.(?:com|co|ru|net|org|edu|gov|it)[\w/\-]*\b/?(?!@)"
_URL_A = re.compile(r"\b(?:https?:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + r")")
_URL_B = re.compile(r"\b(?:www:(?:/{1,3}|[a-zA-Z0-9%])|" + _DOMAIN + r")")

_HANDLE = re.compile(r"@\w+")
# Rule 8: strokes, enclosed/compatibility CJK, ideographs and ext. A, hexagrams; kana stays.
_CJK_BLOCKS = re.compile("[\u31c0-\u9fff]+")
_DASH_RUN = re.compile(
    "["
    "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40"
    "\u301c\u3030\u30a0\ufe31\ufe32\ufe58\ufe63\uff0d"
    "]+"
)
_DOUBLE_QUOTE_LIKE = re.compile("[`\u00b4\u00ab\u00bb\u201c\u201d\u00a8]")
_SINGLE_QUOTE_LIKE = re.compile("[\u2018\u2019]")
_QUOT_ENTITY = re.compile(r"&quot;?")
# Only the name is removed, so "&amp;" leaves its ';' behind (as the reference does).
_AMP_ENTITY = re.compile(r"&amp")
_DOTTED_QUAD = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_TRAILING_CLOCK = re.compile(r"\d:\d\d\s+\Z")
_ESCAPED_NEWLINE = re.compile(r"\\n")
_SHORT_NUMBER_TAG = re.compile(r"#\d{1,3}\b")
_LONG_NUMBER_TAG = re.compile(r"#\d{5,}\b")
_LONG_NUMBER = re.compile(r"\b\d{6,}\b")
_EXTENSIONS = r"(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)"
_FILE_NAME = re.compile(r"\S+\." + _EXTENSIONS)
_QUOTE_RUN = re.compile(r"[\"']{2,}")
_ELLIPSIS = re.compile(r"\.{2,}")
_BAD_PUNCT_RUN = re.compile(r"[#®•©™&@·º½¾¿¡§~()\[\]{}|\\/*]+")
_LONE_PERIOD = re.compile(r"\s+\.\s+")
_DASH_OR_UNDERSCORE = re.compile(r"[-_]")
# Rule 22, applied in this order (the earlier forms change what the later ones see).
_CODE_WORDS = (
    re.compile(r"\b[a-zA-Z]{1,3}\d{3,15}\b"),
    re.compile(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b"),
    re.compile(r"\b\d+[a-zA-Z]+\d+\b"),
)
_SHIPPING = re.compile(r"(?:worldwide\s+)?(?:free\s+)?shipping")
_DOWNLOAD = re.compile(r"(?:free\s)?download(?:\sfree)?")
_CLICK_FOR = re.compile(r"\bclick\b\s(?:for|on)\s\w+")
_EXTENSION_WORD = re.compile(r"\b" + _EXTENSIONS + r"(?:\simages?)?")
_PAGE_NUMBER = re.compile(r"\bpage\s+\d+\b")
_MIXED_ID = re.compile(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b")
# U+0445 is Cyrillic "kha", which scraped captions use as a times sign.
_SIZE = re.compile(r"\b\d+\.?\d*[x\u0445\u00d7]\d+\.?\d*\b")
_SPACED_COLON = re.compile(r"\b\s+:\s+")
_TIGHT_PUNCT = re.compile(r"(\D[,./])\b")
_WHITESPACE_RUN = re.compile(r"\s+")
_QUOTED_WHOLE = re.compile(r"\A[\"']([\s\S]+)[\"']\Z")
_LEADING_JUNK = re.compile(r"\A['_,\-:;]")
_TRAILING_JUNK = re.compile(r"['_,\-:+]\Z")
_DOT_TOKEN = re.compile(r"\A\.\S+\Z")


def _html_text(text: str) -> str:
    from bs4 import BeautifulSoup

    # BeautifulSoup warns (MarkupResemblesLocatorWarning) when short markup looks like a URL or a
    # file name, which is routine for prompts. Overriding its two look-alike checks silences that
    # without warnings.catch_warnings, which is not thread-safe before Python 3.14. The checks only
    # warn, so the parse is unchanged; should bs4 rename them, the warnings merely come back.
    class _QuietSoup(BeautifulSoup):
        @classmethod
        def _markup_is_url(cls, markup: object) -> bool:
            return False

        @classmethod
        def _markup_resembles_filename(cls, markup: object) -> bool:
            return False

    return _QuietSoup(text, features="html.parser").text


def _ftfy_and_unescape(text: str) -> str:
    import ftfy

    text = ftfy.fix_text(text)
    # Twice, because scraped captions are often escaped twice ("&amp;amp;").
    return html.unescape(html.unescape(text)).strip()


def clean_caption(text: str) -> str:
    """One pass of the caption cleaner (spec §4.2, rules 1-37, in order)."""
    s = urllib.parse.unquote_plus(str(text))
    s = s.strip().lower()
    s = s.replace("<person>", "person")
    s = _URL_A.sub("", s)
    s = _URL_B.sub("", s)
    s = _html_text(s)
    s = _HANDLE.sub("", s)
    s = _CJK_BLOCKS.sub("", s)
    s = _DASH_RUN.sub("-", s)
    s = _DOUBLE_QUOTE_LIKE.sub('"', s)
    s = _SINGLE_QUOTE_LIKE.sub("'", s)
    s = _QUOT_ENTITY.sub("", s)
    s = _AMP_ENTITY.sub("", s)
    s = _DOTTED_QUAD.sub(" ", s)
    s = _TRAILING_CLOCK.sub("", s)
    s = _ESCAPED_NEWLINE.sub(" ", s)
    s = _SHORT_NUMBER_TAG.sub("", s)
    s = _LONG_NUMBER_TAG.sub("", s)
    s = _LONG_NUMBER.sub("", s)
    s = _FILE_NAME.sub("", s)
    s = _QUOTE_RUN.sub('"', s)
    s = _ELLIPSIS.sub(" ", s)
    s = _BAD_PUNCT_RUN.sub(" ", s)
    s = _LONE_PERIOD.sub(" ", s)
    if len(_DASH_OR_UNDERSCORE.findall(s)) > 3:
        s = _DASH_OR_UNDERSCORE.sub(" ", s)
    s = _ftfy_and_unescape(s)
    for pattern in _CODE_WORDS:
        s = pattern.sub("", s)
    s = _SHIPPING.sub("", s)
    s = _DOWNLOAD.sub("", s)
    s = _CLICK_FOR.sub("", s)
    s = _EXTENSION_WORD.sub("", s)
    s = _PAGE_NUMBER.sub("", s)
    s = _MIXED_ID.sub(" ", s)
    s = _SIZE.sub("", s)
    s = _SPACED_COLON.sub(": ", s)
    s = _TIGHT_PUNCT.sub(r"\1 ", s)
    # No strip after collapsing: the reference's strip here discards its result, and rules
    # 33-36 depend on the leading/trailing space it leaves.
    s = _WHITESPACE_RUN.sub(" ", s)
    s = _QUOTED_WHOLE.sub(r"\1", s)
    s = _LEADING_JUNK.sub("", s)
    s = _TRAILING_JUNK.sub("", s)
    s = _DOT_TOKEN.sub("", s)
    return s.strip()


def preprocess_prompt(text: str) -> str:
    """The text MAGI-1 tokenizes: ``clean_caption`` applied twice, as in training."""
    return clean_caption(clean_caption(text))
