"""The pages a user reads stay true: the README's config loads, and the configuration reference is current."""

from __future__ import annotations

import re
from pathlib import Path

from tunepipe.tasks.runtime import config_reference
from tunepipe.tasks.runtime.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_loads(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    own = readme.split("## Your own data and model", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", own, re.DOTALL).group(1)
    path = tmp_path / "my.yaml"
    path.write_text(block)
    cfg = load_config(path)
    assert (cfg.name, cfg.train.mode, cfg.ollama.model_name) == ("my-extractor", "lora", "my-extractor")
    assert set(cfg.gate.rules) == {"valid_json_rate", "field_accuracy"}


def test_configuration_reference_is_current() -> None:
    committed = ROOT / "docs" / "configuration.md"
    assert committed.read_text() == config_reference.render(), (
        f"docs/configuration.md is stale: run `{config_reference.COMMAND}`"
    )


def test_configuration_reference_names_every_field() -> None:
    page = config_reference.render()
    for key in (
        "`data.train`",
        "`train.preference.beta`",
        "`gate.rules.<metric>.min`",
        "`retrain.plan[].lora_r`",
        "`eval.judge.model`",
        "`rag.columns.question`",
        "`retry.backoff_s`",
    ):
        assert f"| {key} |" in page, key


def _anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_docs_links_resolve() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), f"{page.name}: broken link {target}"
            if anchor:
                assert anchor in _anchors(linked), f"{page.name}: no heading #{anchor} in {target or page.name}"
