"""The guard every library patch asks first: version check and off switch, on the CPU."""

import importlib.metadata
import logging

import pytest

from tunepipe.tasks import patches


@pytest.fixture(autouse=True)
def fresh_guard(monkeypatch):
    monkeypatch.delenv(patches.OFF_SWITCH, raising=False)
    patches.enabled.cache_clear()
    yield
    patches.enabled.cache_clear()


def installed_as(monkeypatch, versions: dict[str, str]) -> None:
    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(patches.importlib.metadata, "version", version)


def test_proven_version_is_on_without_a_word(monkeypatch, caplog):
    installed_as(monkeypatch, {"torch": "2.11.0+cu130"})
    with caplog.at_level(logging.WARNING, logger="tunepipe.patches"):
        assert patches.enabled("torch", ">=2.11,<2.14")
    assert caplog.records == []


def test_other_version_turns_off_with_one_line_once(monkeypatch, caplog):
    installed_as(monkeypatch, {"unsloth": "2026.11.2"})
    with caplog.at_level(logging.WARNING, logger="tunepipe.patches"):
        assert not patches.enabled("unsloth", "==2026.10.5")
        assert not patches.enabled("unsloth", "==2026.10.5")
    [record] = caplog.records
    assert "unsloth 2026.11.2" in record.getMessage() and "==2026.10.5" in record.getMessage()
    assert "\n" not in record.getMessage()


@pytest.mark.parametrize(
    "switch, off", [("off", True), ("prefect", True), ("unsloth, Prefect", True), ("unsloth", False), ("", False)]
)
def test_off_switch(monkeypatch, caplog, switch, off):
    installed_as(monkeypatch, {"prefect": "3.9.1"})
    monkeypatch.setenv(patches.OFF_SWITCH, switch)
    with caplog.at_level(logging.WARNING, logger="tunepipe.patches"):
        assert patches.enabled("prefect", "==3.9.1") is not off
    assert len(caplog.records) == int(off)


def test_absent_library_has_nothing_to_patch(monkeypatch, caplog):
    installed_as(monkeypatch, {})
    assert not patches.enabled("unsloth", "==2026.10.5")
    assert caplog.records == []
