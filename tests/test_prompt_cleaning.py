"""Parity of the T5 prompt cleaner with the reference (golden prompt_cleaning.json, spec §4.2).

Every golden case is checked for one pass (``clean_once``) and for the two passes that are
tokenized (``output``), with exact string equality. Parametrized by case id, so a failure names
the case; the hand-written cases below come from the spec text and run without the golden folder.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from magi_server.models.caption_cleaning import clean_caption, preprocess_prompt
from tests.golden_utils import GOLDEN_DIR

GOLDEN_FILE = "prompt_cleaning.json"


def _golden_case_ids() -> list[int]:
    # Collection must not fail when the golden folder is absent; the `golden` fixture then skips.
    path = GOLDEN_DIR / GOLDEN_FILE
    if not path.is_file():
        return [0]
    return [case["id"] for case in json.loads(path.read_text(encoding="utf-8"))["cases"]]


@pytest.fixture(scope="module")
def golden_cases(golden: Path) -> dict[int, dict]:
    data = json.loads((golden / GOLDEN_FILE).read_text(encoding="utf-8"))
    return {case["id"]: case for case in data["cases"]}


@pytest.mark.parametrize("case_id", _golden_case_ids())
def test_golden_case(golden_cases: dict[int, dict], case_id: int) -> None:
    case = golden_cases[case_id]
    once = clean_caption(case["input"])
    assert once == case["clean_once"], f"case {case_id} ({case['category']}): one pass differs"
    assert preprocess_prompt(case["input"]) == case["output"], (
        f"case {case_id} ({case['category']}): two passes differ"
    )


def test_golden_all_cases(golden_cases: dict[int, dict]) -> None:
    """Aggregate view: lists every failing case id at once."""
    assert len(golden_cases) == 350
    bad_once = [i for i, c in golden_cases.items() if clean_caption(c["input"]) != c["clean_once"]]
    bad_output = [i for i, c in golden_cases.items() if preprocess_prompt(c["input"]) != c["output"]]
    assert not bad_once and not bad_output, f"clean_once fails: {bad_once}; output fails: {bad_output}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The domain rule fires inside prose (spec §4.2 rule 4).
        ("The cat sat on the mat.It was warm.", "the cat sat on the was warm."),
        ("A dog.Comes home", "a home"),
        # Extension words lose their prefix (rule 26); file names go entirely (rule 16).
        ("epsilon", "ilon"),
        ("a webpage", "a age"),
        ("report.pdfx", "x"),
        # Only the scheme prefix goes in the first pass; the second pass removes the leftover ".".
        ("check out HTTPS://EXAMPLE.NET/Gallery/Index.html now", "check out html now"),
        ("shippingshipping", ""),
        ("downloaded", "ed"),
        ("<person> waves", "person waves"),
        ("", ""),
        (" \t\n ", ""),
    ],
)
def test_spec_examples(text: str, expected: str) -> None:
    assert preprocess_prompt(text) == expected


def test_second_pass_still_changes_text() -> None:
    text = "check out HTTPS://EXAMPLE.NET/Gallery/Index.html now"
    assert clean_caption(text) == "check out . html now"
    assert clean_caption(clean_caption(text)) == preprocess_prompt(text) == "check out html now"


@pytest.mark.parametrize("text", ["index.html", "https://example.net", "notes.txt"])
def test_no_beautifulsoup_locator_warning(text: str) -> None:
    # Prompts that look like a URL or a file name are ordinary input, not a user mistake.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preprocess_prompt(text)
